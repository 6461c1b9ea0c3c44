#!/usr/bin/env bash
# The test command (README, "Run the tests"): right after the README's install
# command it
#   1. installs the test requirements (pyproject's `test` extra) that this Python
#      lacks -- never moe_ext itself, so the installed build is what gets tested;
#   2. builds and runs the C++ core suite (GoogleTest via ctest); GoogleTest
#      (libgtest-dev) is installed through apt when it is missing and we are
#      root, otherwise the exact command is printed and the C++ part FAILS;
#   3. runs the Python suite (pytest on tests/) against the installed moe_ext,
#      whatever happened to the C++ part.
# Exit 0 only when both suites ran and passed. Extra arguments go to pytest.
# CUDA tests run when a GPU is visible and skip cleanly otherwise.
# Knobs: PYTHON (default python3), MAX_JOBS, MOE_EXT_CTEST_DIR, MOE_EXT_GTEST_PREFIXES.
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
say() { echo "run_tests: $*"; }

# ------------------------------------------------------------ 1. Python requirements
if ! missing=$("$python" scripts/test_requirements.py); then
  say "could not read the test requirements from pyproject.toml"; exit 1
fi
# install_lines FLAGS... <<< "one requirement per line" (a line may hold an environment marker with spaces)
install_lines() {
  local -a lines=()
  mapfile -t lines
  [ "${#lines[@]}" -gt 0 ] && [ -n "${lines[0]}" ] || return 0
  say "installing${1:+ ($*)}: ${lines[*]}"
  if ! "$python" -m pip install -q "$@" "${lines[@]}"; then
    say "FAILED to install them; install into this Python and re-run:"
    printf '    %s -m pip install %s' "$python" "$*"; printf " '%s'" "${lines[@]}"; echo
    return 1
  fi
}
install_lines <<< "$missing" || exit 1
# torchtitan and its spmd_types pin, without their training-stack dependencies (pyproject's [tool.moe_ext])
if ! no_deps=$("$python" scripts/test_requirements.py --without-deps); then
  say "could not read [tool.moe_ext] test-without-deps from pyproject.toml"; exit 1
fi
install_lines --no-deps <<< "$no_deps" || exit 1
if ! (cd /tmp && "$python" -c "import moe_ext") >/dev/null 2>&1; then
  say "moe_ext does not import in $python from outside the source tree: install it first (README, 'Install')"
  (cd /tmp && "$python" -c "import moe_ext") 2>&1 | tail -n 3
  exit 1
fi

# ------------------------------------------------------------ 2. C++ core suite
gtest_present() {
  local prefix
  # MOE_EXT_GTEST_PREFIXES replaces the places looked in (the tests use it to play a machine without GoogleTest).
  # shellcheck disable=SC2086
  for prefix in ${MOE_EXT_GTEST_PREFIXES:-/usr /usr/local ${GTEST_ROOT:-} ${CONDA_PREFIX:-}}; do
    [ -f "$prefix/include/gtest/gtest.h" ] && return 0
  done
  [ -n "${GTest_DIR:-}" ]
}
cpp_status="passed"
cpp_reason=""
if ! gtest_present; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "GoogleTest is missing: installing libgtest-dev through apt-get"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libgtest-dev >/dev/null; }; then
      cpp_status="NOT RUN"; cpp_reason="apt-get install libgtest-dev failed"
    fi
  else
    cpp_status="NOT RUN"
    cpp_reason="GoogleTest is not installed; as root run: apt-get install libgtest-dev (Debian/Ubuntu; dnf install gtest-devel on Fedora), or point GTEST_ROOT at an install, then re-run"
  fi
fi
if [ "$cpp_status" = "passed" ]; then
  build_dir=${MOE_EXT_CTEST_DIR:-build/ctest}
  generator=()
  command -v ninja >/dev/null && generator=(-G Ninja)
  say "building the C++ core tests in $build_dir (about 1-2 min on 2 cores the first time)"
  if ! cmake -S . -B "$build_dir" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DMOE_EXT_BUILD_TESTS=ON \
        -DMOE_EXT_BUILD_TORCH=OFF -DMOE_EXT_BUILD_PYBIND=OFF -DMOE_EXT_ENABLE_CUDA=OFF >/dev/null; then
    cpp_status="FAILED"; cpp_reason="cmake could not configure the tests (see above)"
  elif ! cmake --build "$build_dir" -j "${MAX_JOBS:-2}"; then
    cpp_status="FAILED"; cpp_reason="the C++ tests did not compile (see above)"
  elif ! ctest --test-dir "$build_dir" --output-on-failure; then
    cpp_status="FAILED"; cpp_reason="ctest reported failures (see above)"
  fi
else
  say "C++ suite NOT RUN: $cpp_reason"
  say "running the Python suite anyway; this run will FAIL because the C++ suite did not run"
fi

# ------------------------------------------------------------ 3. Python suite
"$python" -m pytest tests -q -p no:cacheprovider "$@"
py_code=$?
py_status=$([ "$py_code" = 0 ] && echo passed || echo "FAILED (pytest exit $py_code)")

echo
say "C++ core suite: $cpp_status${cpp_reason:+ -- $cpp_reason}"
say "Python suite:   $py_status"
[ "$cpp_status" = "passed" ] && [ "$py_code" = 0 ]
