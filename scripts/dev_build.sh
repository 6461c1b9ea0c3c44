#!/usr/bin/env bash
# In-place developer build: compiles moe_ext/_native and moe_ext/_C into
# python/moe_ext/, so that `PYTHONPATH=python python -m pytest tests` runs the
# working tree without a reinstall. Extra arguments go to CMake.
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${MOE_EXT_BUILD_DIR:-build/dev}
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
cmake -S . -B "$build_dir" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$(command -v python3)" -DMOE_EXT_OUTPUT_DIR="$PWD/python/moe_ext" "$@"
cmake --build "$build_dir" -j "${MAX_JOBS:-2}"
