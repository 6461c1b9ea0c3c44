#!/usr/bin/env bash
# The test command: the C++ core suite (GoogleTest via ctest), then the Python
# suite (pytest) against the installed moe_ext. Extra arguments go to pytest.
# CUDA tests run when a GPU is visible and skip cleanly otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${MOE_EXT_CTEST_DIR:-build/ctest}
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
cmake -S . -B "$build_dir" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DMOE_EXT_BUILD_TESTS=ON \
  -DMOE_EXT_BUILD_TORCH=OFF -DMOE_EXT_BUILD_PYBIND=OFF -DMOE_EXT_ENABLE_CUDA=OFF >/dev/null
cmake --build "$build_dir" -j "${MAX_JOBS:-2}"
ctest --test-dir "$build_dir" --output-on-failure
python3 -m pytest tests -q -p no:cacheprovider "$@"
