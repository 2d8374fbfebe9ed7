#!/usr/bin/env bash
# Downloads the wheels of bench/gpu_wheels.txt into DIR (default .whl, git-ignored) for
# a GPU machine with python 3.12 on x86-64 and no network, then lists what each needs
# (Requires-Dist, extras left out) so a missing one can be added to the list.
#   bash bench/gpu_wheels.sh [DIR]
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
dir="${1:-$repo/.whl}"
mkdir -p "$dir"
mapfile -t reqs < <(grep -v '^\s*\(#\|$\)' "$repo/bench/gpu_wheels.txt")
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d "$dir" "${reqs[@]}"
status=0
for req in "${reqs[@]}"; do
  name="$(echo "${req%%==*}" | tr 'A-Z' 'a-z' | sed 's/[-_.]\+/_/g')"
  files=("$dir/${name}-${req##*==}-"*.whl)
  if [ ! -e "${files[0]}" ] || [ "${#files[@]}" -ne 1 ]; then
    echo "gpu_wheels.sh: $req: expected one ${name}-${req##*==}-*.whl in $dir" >&2
    status=1
    continue
  fi
  echo "$req -> $(basename "${files[0]}") needs:"
  unzip -p "${files[0]}" '*.dist-info/METADATA' | grep '^Requires-Dist' \
    | grep -v 'extra ==' | sed 's/^/  /' || echo "  (nothing)"
done
exit $status
