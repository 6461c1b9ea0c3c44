#!/usr/bin/env bash
# One call on the GPU machine (device tool): build against its torch, run the
# CUDA test suite and the benchmarks, keep logs under $OUT, print a short table.
#
#   scripts/gpu_check.sh            one GPU: build, pytest (CUDA included), benches
#   scripts/gpu_check.sh nccl       two GPUs: also the multi-process suites on NCCL
#   GPU_CHECK_TESTS="tests/x.py"    restrict pytest;  GPU_CHECK_BENCH="bench/a.py" restrict benches
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-single}
out=${OUT:-/tmp/gpu_check_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
summary=()

step() {  # step NAME LOGFILE COMMAND...
  local name=$1 log=$2; shift 2
  local begin=$(date +%s)
  "$@" >"$out/$log" 2>&1
  local rc=$?
  summary+=("$(printf '%-34s rc=%-3s %4ss  %s' "$name" "$rc" "$(( $(date +%s) - begin ))" "$(tail -n 1 "$out/$log" | cut -c1-90)")")
  return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$out/gpu.txt" 2>&1
step build build.log env MAX_JOBS=16 python3 -m pip install --no-build-isolation --no-deps -v . || {
  tail -n 60 "$out/build.log"; exit 1; }
workdir=$(mktemp -d)
step info info.log bash -c "cd $workdir && python3 -m moe_ext info"
step pytest pytest.log python3 -m pytest ${GPU_CHECK_TESTS:-tests} -q -p no:cacheprovider -rs
if [ "$mode" = "nccl" ]; then
  shopt -s nullglob
  nccl_tests=${GPU_CHECK_NCCL_TESTS:-$(echo tests/test_parallel_state*.py tests/test_rearrange*.py tests/test_moe*.py)}
  step pytest-nccl pytest_nccl.log env MOE_EXT_TEST_BACKEND=nccl python3 -m pytest $nccl_tests -q -p no:cacheprovider
fi
for bench in ${GPU_CHECK_BENCH:-bench/bench_permute_indices.py}; do
  name=$(basename "$bench" .py)
  step "$name" "$name.log" python3 "$bench"
done

echo
cat "$out/gpu.txt"
cat "$out/info.log"
for bench in ${GPU_CHECK_BENCH:-bench/bench_permute_indices.py}; do
  echo; tail -n 12 "$out/$(basename "$bench" .py).log"
done
echo; grep -E "passed|failed|error" "$out/pytest.log" | tail -n 5
echo; printf '%s\n' "${summary[@]}"
