#!/usr/bin/env bash
# Runs one command on every worker of a Cloud TPU VM pod (one process per host).
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b [PROJECT=my-proj] \
#     launch/tpu_pod.sh [--dry_run] [--skip_install] -- \
#     python -m xft_jax.train --config=configs/mistral_7b.py --workdir=gs://bucket/run1
#
# Steps: pack this working tree (git-tracked and untracked, not ignored files), copy it to
# all workers, `pip install` it there with jax[tpu] (unless --skip_install), then run the
# command in it on all workers at once. Each process calls xft_jax.distributed.initialize(),
# which detects the pod (jax.distributed.initialize() with no arguments).
#
# Env: TPU_NAME, ZONE (required); PROJECT; REMOTE_DIR (default xft_jax, under the worker's
# home); JAX_TPU (default 'jax[tpu]>=0.10,<0.12'); PIP_EXTRA (more pip arguments);
# RUN_ENV (literal VAR=value words exported before the command, e.g. "LIBTPU_INIT_ARGS=..");
# FORWARD_ENV (names of local variables to pass on, e.g. "HF_TOKEN": their values never
# appear on a command line, where any user of either machine could read them in the
# process list; they go into a 0600 file, copied to the workers, read and deleted there
# before the command starts); DRY_RUN=1 (same as --dry_run: print, run nothing).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
source "$HERE/_common.sh"

INSTALL=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry_run) DRY_RUN=1; shift ;;
    --skip_install) INSTALL=0; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
[[ $# -gt 0 ]] || die "no command given; usage: $0 [--dry_run] [--skip_install] -- python -m xft_jax.train ..."
[[ -n "${TPU_NAME:-}" ]] || die "TPU_NAME is not set (the TPU VM pod to run on)"
[[ -n "${ZONE:-}" ]] || die "ZONE is not set (the TPU VM pod's zone)"
REMOTE_DIR="${REMOTE_DIR:-xft_jax}"
JAX_TPU="${JAX_TPU:-jax[tpu]>=0.10,<0.12}"
TARBALL="${TMPDIR:-/tmp}/xft_jax_src_${TPU_NAME}.tgz"

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE" --worker=all)
[[ -n "${PROJECT:-}" ]] && WHERE+=(--project="$PROJECT")

if [[ "$INSTALL" == "1" ]]; then
  # The source travels as a tarball of what git would ship (no runs/, caches, .git).
  if [[ "$DRY_RUN" == "1" ]]; then
    printf '+ (cd %s && git ls-files -co --exclude-standard | tar -czf %s -T -)\n' \
      "$(quote "$REPO")" "$(quote "$TARBALL")"
  else
    (cd "$REPO" && git ls-files -co --exclude-standard | tar -czf "$TARBALL" -T -)
  fi
  run "${GCLOUD[@]}" scp "$TARBALL" "$TPU_NAME:/tmp/xft_jax_src.tgz" "${WHERE[@]}"
  # Extracted over any earlier copy (never rm -rf: a run directory may live inside it).
  INSTALL_CMD="mkdir -p $(quote "$REMOTE_DIR") && tar -xzf /tmp/xft_jax_src.tgz -C $(quote "$REMOTE_DIR") && python3 -m pip install -U pip && python3 -m pip install $(quote "$JAX_TPU") -e $(quote "$REMOTE_DIR")${PIP_EXTRA:+ $PIP_EXTRA}"
  [[ "$DRY_RUN" == "1" ]] && echo "#   install on every worker: $INSTALL_CMD"
  run "${GCLOUD[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --command="$INSTALL_CMD"
fi

EXPORTS=()
if [[ -n "${RUN_ENV:-}" ]]; then read -r -a EXPORTS <<< "$RUN_ENV"; fi
FORWARD=()
for name in ${FORWARD_ENV:-}; do
  [[ "$name" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "FORWARD_ENV: $name is not a variable name"
  [[ -n "${!name+x}" ]] || die "FORWARD_ENV: $name is not set here"
  FORWARD+=("$name")
done
RUN_CMD=""
if [[ ${#FORWARD[@]} -gt 0 ]]; then
  # The values travel in a file only its owner can read (mktemp makes it 0600; scp keeps
  # the mode), never in an argument.
  if [[ "$DRY_RUN" == "1" ]]; then
    ENV_FILE="$(mktemp -u "${TMPDIR:-/tmp}/xft_jax_env.XXXXXXXX")"
    echo "#   ${FORWARD[*]}: values written to $ENV_FILE (mode 0600), not shown"
  else
    ENV_FILE="$(mktemp "${TMPDIR:-/tmp}/xft_jax_env.XXXXXXXX")"
    trap 'rm -f "$ENV_FILE"' EXIT
    for name in "${FORWARD[@]}"; do
      printf 'export %s=%s\n' "$name" "$(quote "${!name}")" >> "$ENV_FILE"
    done
  fi
  REMOTE_ENV="/tmp/$(basename "$ENV_FILE")"
  run "${GCLOUD[@]}" scp "$ENV_FILE" "$TPU_NAME:$REMOTE_ENV" "${WHERE[@]}"
  RUN_CMD+="trap $(quote "rm -f $REMOTE_ENV") EXIT && . $REMOTE_ENV && rm -f $REMOTE_ENV && "
fi
RUN_CMD+="cd $(quote "$REMOTE_DIR") && "
[[ ${#EXPORTS[@]} -gt 0 ]] && RUN_CMD+="export $(quote "${EXPORTS[@]}") && "
RUN_CMD+="$(quote "$@")"
[[ "$DRY_RUN" == "1" ]] && echo "#   run on every worker: $RUN_CMD"
run "${GCLOUD[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --command="$RUN_CMD"
