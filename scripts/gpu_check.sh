#!/usr/bin/env bash
# One call on the GPU machine (device tool): build against its torch (or install
# a wheel built elsewhere), run the CUDA test suite and the benchmarks, keep logs
# under $OUT, print a short table.
#
#   scripts/gpu_check.sh            one GPU: build, pytest (CUDA included), benches
#   scripts/gpu_check.sh nccl       two GPUs: also the multi-process suites on NCCL
#   GPU_CHECK_TESTS="tests/x.py"    restrict pytest;  GPU_CHECK_BENCH="bench/a.py" restrict benches
#   GPU_CHECK_BENCH_ARGS="--only unpermute"   arguments for every bench of GPU_CHECK_BENCH
#   GPU_CHECK_BENCH_TAIL=80         lines of each bench log printed at the end (default 12; full logs in $OUT)
#   bench_routing's public columns (megablocks, TransformerEngine Triton kernels) need .bench_public/
#   (bash scripts/fetch_public_kernels.sh where there is network; carry the folder to this machine)
#   GPU_CHECK_WHEEL=dist/x.whl      the binary-compatibility proof: install that wheel (built on
#                                   the CPU machine against another torch, with _native for this
#                                   Python: MOE_EXT_EXTRA_PYTHONS) with no rebuild at all. Logs the
#                                   glibc, the files' sha256 and the stable-ABI probe
#                                   (scripts/probe/stable_abi_probe.py).
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
if [ -n "${GPU_CHECK_WHEEL:-}" ]; then
  {
    ldd --version | head -n 1
    python3 -c 'import platform, torch; print("python", platform.python_version(), "torch", torch.__version__, "CUDA", torch.version.cuda)'
    echo "wheel: $GPU_CHECK_WHEEL"; sha256sum "$GPU_CHECK_WHEEL"
  } >"$out/platform.txt" 2>&1
  step install install.log python3 -m pip install --no-deps --force-reinstall -v "$GPU_CHECK_WHEEL" || {
    tail -n 40 "$out/install.log"; exit 1; }
  package=$(cd / && python3 -c 'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("moe_ext").origin))')
  sha256sum "$package"/_C.so "$package"/_C_cuda.so "$package"/_native*.so >>"$out/platform.txt" 2>&1
  step stable-abi-probe stable_abi_probe.log python3 scripts/probe/stable_abi_probe.py
else
  step build build.log env MAX_JOBS=16 python3 -m pip install --no-build-isolation --no-deps -v . || {
    tail -n 60 "$out/build.log"; exit 1; }
fi
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
  step "$name" "$name.log" python3 "$bench" ${GPU_CHECK_BENCH_ARGS:-}
done

echo
cat "$out/gpu.txt"
[ -f "$out/platform.txt" ] && cat "$out/platform.txt"
[ -f "$out/stable_abi_probe.log" ] && cat "$out/stable_abi_probe.log"
cat "$out/info.log"
for bench in ${GPU_CHECK_BENCH:-bench/bench_permute_indices.py}; do
  echo; tail -n "${GPU_CHECK_BENCH_TAIL:-12}" "$out/$(basename "$bench" .py).log"
done
echo; grep -E "passed|failed|error" "$out/pytest.log" | tail -n 5
echo; printf '%s\n' "${summary[@]}"
