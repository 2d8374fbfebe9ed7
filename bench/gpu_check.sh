#!/usr/bin/env bash
# The GPU check in one command (bench/README.md, "On a lent GPU"):
#
#   bash bench/gpu_check.sh OUT_DIR [--size=gpu|gpu_smoke] [--wheels=DIR] [--skip_install]
#        [bench/gpu_check.py flags: --budget_s=480 --only=... --max_tokens=... --commit=...]
#
# For a machine whose python3 already has the GPU stack (jax with the CUDA plugin, flax,
# optax, orbax-checkpoint, torch, transformers, peft, safetensors, tqdm, absl-py) and no
# network: installs the wheels of bench/gpu_wheels.txt from DIR (default .whl, filled here
# by bench/gpu_wheels.sh) into a target directory, installs xft_jax itself with
# `pip install --no-deps -e .` (no index, no build isolation), then runs
# bench/gpu_check.py, which writes the checkpoint, runs every benchmark in its own process
# and leaves gpu_check.json, RESULTS.md and gpu_check.log in OUT_DIR.
# --skip_install (CI's dry run) installs nothing and imports xft_jax from this checkout.
# PYTHON overrides the interpreter (default python3); XFT_BENCH_CACHE, where the
# checkpoint goes (default /var/tmp/xft_jax_bench_cache: local disk, not a tmpfs, so that
# the cold loads read storage).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-python3}"
usage="usage: bash bench/gpu_check.sh OUT_DIR [--size=gpu|gpu_smoke] [--wheels=DIR] [--skip_install] [gpu_check.py flags]"
if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
  echo "$usage" >&2
  exit 2
fi
out="$1"
shift
size=gpu
wheels="$repo/.whl"
install=1
pass=()
for arg in "$@"; do
  case "$arg" in
    --size=*) size="${arg#--size=}" ;;
    --wheels=*) wheels="${arg#--wheels=}" ;;
    --skip_install) install=0 ;;
    *) pass+=("$arg") ;;
  esac
done
mkdir -p "$out"
export XFT_BENCH_CACHE="${XFT_BENCH_CACHE:-/var/tmp/xft_jax_bench_cache}"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

if [ "$install" = 1 ]; then
  mapfile -t reqs < <(grep -v '^\s*\(#\|$\)' "$repo/bench/gpu_wheels.txt")
  files=()
  for req in "${reqs[@]}"; do
    name="$(echo "${req%%==*}" | tr 'A-Z' 'a-z' | sed 's/[-_.]\+/_/g')"
    found=("$wheels/${name}-${req##*==}-"*.whl)
    if [ ! -e "${found[0]}" ]; then
      echo "gpu_check.sh: no wheel for $req in $wheels: run 'bash bench/gpu_wheels.sh' where pip works and carry .whl" >&2
      exit 2
    fi
    files+=("${found[@]}")
  done
  site="${XFT_WHEEL_SITE:-/tmp/xft_site}"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "${files[@]}"
  export PYTHONPATH="$PYTHONPATH:$site"
  # The checkout stays first on PYTHONPATH either way; the editable install checks that
  # the package's metadata builds with the image's setuptools.
  "$py" -m pip install -q --no-deps --no-index --no-build-isolation -e "$repo" \
    || echo "gpu_check.sh: 'pip install --no-deps -e .' failed; xft_jax is imported from $repo" >&2
  "$py" -c "import ml_collections, jax, flax, optax, torch, transformers, peft, safetensors, absl, xft_jax; print('gpu_check.sh: imports ok; jax', jax.__version__, jax.devices())"
fi
exec "$py" "$repo/bench/gpu_check.py" --out="$out" --size="$size" "${pass[@]}"
