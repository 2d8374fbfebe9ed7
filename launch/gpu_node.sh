#!/usr/bin/env bash
# Runs one command as ONE process that drives all local GPUs of this node (or --gpus).
#
#   launch/gpu_node.sh [--dry_run] [--gpus=0,1,2,3] -- \
#     python -m xft_jax.train --config=configs/mistral_7b.py --workdir=/data/runs/run1
#
# One process sees every local GPU as a device of the mesh (--config.mesh.* picks the
# layout); no jax.distributed start-up is needed on a single node.
#
# Env: MEM_FRACTION (XLA_PYTHON_CLIENT_MEM_FRACTION, default 0.90); RUN_ENV (extra
# VAR=value words placed before the command); DRY_RUN=1 (same as --dry_run).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/_common.sh"

GPUS=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry_run) DRY_RUN=1; shift ;;
    --gpus=*) GPUS="${1#--gpus=}"; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
[[ $# -gt 0 ]] || die "no command given; usage: $0 [--dry_run] [--gpus=0,1] -- python -m xft_jax.train ..."
[[ -z "$GPUS" || "$GPUS" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus=$GPUS: expected e.g. 0,1,2,3"

ENVS=(XLA_PYTHON_CLIENT_MEM_FRACTION="${MEM_FRACTION:-0.90}")
[[ -n "$GPUS" ]] && ENVS+=(CUDA_VISIBLE_DEVICES="$GPUS")
if [[ -n "${RUN_ENV:-}" ]]; then
  read -r -a EXTRA <<< "$RUN_ENV"
  ENVS+=("${EXTRA[@]}")
fi
if [[ "$DRY_RUN" != "1" ]] && command -v nvidia-smi > /dev/null; then
  echo "gpu_node: $(nvidia-smi -L | wc -l) GPU(s) on $(hostname)${GPUS:+, using $GPUS}" >&2
fi
run env "${ENVS[@]}" "$@"
