// CUDA glue of generate_permute_indices: host-side checks of everything that
// does not need the counts' values, then one kernel launch on the current
// stream. Checks on the values (negative counts, padded total above max_len)
// happen in the kernel; see csrc/cuda/device_check.cuh.
#include <array>
#include <atomic>

#include "common/permute_indices_args.h"
#include "core/permute_indices.h"
#include "cuda/cuda_check.h"
#include "cuda/cuda_ops.h"
#include "cuda/launchers.h"

namespace moe_ext::cuda {
namespace {

// The opt-in shared-memory limit of a device, asked once per device: a driver
// query on every call would cost about a microsecond of host time.
int max_shared_bytes_per_block(int device) {
  static std::array<std::atomic<int>, 64> cache{};
  if (device < 0 || device >= static_cast<int>(cache.size())) device = 0;
  int value = cache[static_cast<size_t>(device)].load(std::memory_order_relaxed);
  if (value == 0) {
    MOE_CUDA_CHECK("generate_permute_indices",
                   cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    cache[static_cast<size_t>(device)].store(value, std::memory_order_relaxed);
  }
  return value;
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> generate_permute_indices(
    const Tensor& tokens_per_expert_group, int64_t experts_per_rank, int64_t num_ranks,
    int64_t max_len, int64_t alignment) {
  constexpr const char* op = "generate_permute_indices";
  auto call = ops::prepare_permute_indices(tokens_per_expert_group, experts_per_rank, num_ranks,
                                          max_len, alignment);
  const DeviceGuard device(tokens_per_expert_group);
  const int max_shared = max_shared_bytes_per_block(device.index());
  const size_t shared_bytes = permute_indices_shared_bytes(experts_per_rank, num_ranks);
  MOE_CHECK_VALUE(shared_bytes + 8 * 1024 <= static_cast<size_t>(max_shared), op,
                    ": num_ranks * experts_per_rank = ", num_ranks * experts_per_rank,
                    " is too large for the single-launch CUDA kernel on this GPU (needs ", shared_bytes,
                    " bytes of shared memory, the device offers ", max_shared, ")");

  const Tensor& counts = call.counts;
  MOE_CUDA_CHECK(op, launch_generate_permute_indices(
                         counts.const_data_ptr(), counts.scalar_type() == ops::ScalarType::Long, experts_per_rank,
                         num_ranks, max_len, alignment, call.permuted_indices.mutable_data_ptr<int32_t>(),
                         call.m_sizes.mutable_data_ptr<int32_t>(), call.m_offsets.mutable_data_ptr<int32_t>(),
                         device.stream()));
  return {call.permuted_indices, call.m_sizes, call.m_offsets};
}

}  // namespace moe_ext::cuda
