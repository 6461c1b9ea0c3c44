#!/usr/bin/env bash
# Multi-GPU call on the device tool (nvidia-h200-x2 / -x4 / -x8): build against
# that torch, then the multi-process suites on NCCL and the distributed
# benchmarks at EP 2 and EP = all GPUs. Logs under $OUT; a summary last.
#
#   scripts/multi_gpu_check.sh tests     NCCL pytest suites (+ the demo if present)
#   scripts/multi_gpu_check.sh bench     rearrangement, MoE-layer and parallel-linear benchmarks
#   scripts/multi_gpu_check.sh all       both (more than one 10-minute device call now: run tests and bench apart)
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-all}
out=${OUT:-/tmp/multi_gpu_out}
mkdir -p "$out"
# NVLink multicast stays off on these shared hosts (device tool's KINDS.md).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
summary=()
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local begin=$(date +%s)
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-30s rc=%-3s %4ss  %s' "$name" "$rc" "$(( $(date +%s) - begin ))" "$(tail -n 1 "$out/$name.log" | cut -c1-100)")")
}

gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())')
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >"$out/gpu.txt" 2>&1
nvidia-smi topo -m >>"$out/gpu.txt" 2>&1
step build 300 env MAX_JOBS=32 python3 -m pip install --no-build-isolation --no-deps -v .
sizes=$(printf '%s\n' 2 "$gpus" | sort -un | tr '\n' ' ')

if [ "$mode" = tests ] || [ "$mode" = all ]; then
  shopt -s nullglob
  step pytest_nccl 420 env MOE_EXT_TEST_BACKEND=nccl python3 -m pytest -q -p no:cacheprovider -rs \
    tests/test_parallel_state.py tests/test_rearrange.py tests/test_moe_layer.py tests/test_eplb_load_recorder.py \
    tests/test_parallel_linear.py tests/test_expert_parallel.py
  # MoE backward on NCCL (issue 12): the 2-rank cases (EP 2 with experts that get no rows and a
  # rank without tokens, DP 1 x TP 2) and the 2-rank matrix; the 4-rank cases are gloo-only.
  step moe_backward_nccl 300 python3 -m pytest -q -p no:cacheprovider -rs -m cuda tests/test_moe_backward.py
  if [ -f python/moe_ext/cli/demo.py ]; then
    for ws in $sizes; do
      step "demo_nccl_$ws" 240 python3 -m moe_ext demo --ranks "$ws" --device cuda --json "$out/demo_$ws.json"
    done
    # Under torchrun (the launcher's NCCL group), and DeepSeek-V3-sized experts (about 50-70 GiB per GPU).
    step demo_torchrun 240 python3 -m torch.distributed.run --standalone --nproc-per-node "$gpus" \
      -m moe_ext demo --json "$out/demo_torchrun.json"
    step demo_dsv3 420 python3 -m torch.distributed.run --standalone --nproc-per-node "$gpus" \
      -m moe_ext demo --preset deepseek-v3 --steps 20 --json "$out/demo_dsv3.json"
  fi
fi
if [ "$mode" = bench ] || [ "$mode" = all ]; then
  for ws in $sizes; do
    step "rearrange_ep$ws" 240 python3 bench/bench_rearrange.py --backend nccl --world-size "$ws"
    step "moe_layer_ep$ws" 300 python3 bench/bench_moe_layer.py --backend nccl --world-size "$ws"
  done
  step linear_tp2 300 python3 bench/bench_linear.py --backend nccl --world-size 2
  step expert_parallel_2 300 python3 bench/bench_expert_parallel.py --backend nccl --world-size 2
fi

echo; cat "$out/gpu.txt" | head -n 12
for log in "$out"/rearrange_*.log "$out"/moe_layer_*.log "$out"/linear_*.log "$out"/expert_parallel_*.log "$out"/demo_*.log; do
  [ -f "$log" ] && { echo; echo "== $(basename "$log")"; tail -n 25 "$log"; }
done
[ -f "$out/pytest_nccl.log" ] && { echo; grep -E "passed|failed|SKIPPED|Error" "$out/pytest_nccl.log" | tail -n 15; }
[ -f "$out/moe_backward_nccl.log" ] && { echo; grep -E "passed|failed|SKIPPED|Error" "$out/moe_backward_nccl.log" | tail -n 8; }
echo; printf '%s\n' "${summary[@]}"
