// generate_permute_indices in one launch.
//
// The counts table is small (num_ranks * experts_per_rank, a few thousand
// entries) and the output long (max_len, up to millions), so every block
// recomputes the three prefix sums it needs in shared memory - cheaper than a
// second launch or a grid-wide barrier - and then fills its own slice of the
// output. Block 0 also writes m_sizes and m_offsets.
//
// Shared memory (int32 unless noted):
//   arrival_start[R*E]   exclusive scan of the counts in rank-major order:
//                        where group (r, e) starts among the arriving rows
//   expert_cumulative[E*R]  inclusive scan of the counts in expert-major order:
//                        lets a position inside expert e's block find its rank
//   block_end[E]         inclusive scan of the padded sizes (= m_offsets)
#include <cub/block/block_scan.cuh>

#include "cuda/device_check.cuh"
#include "cuda/launchers.h"

namespace moe_ext::cuda {
namespace {

constexpr int kThreads = 512;
// Small slices: the per-block scans cost the same whatever the slice, so more,
// shorter slices spread the fill over more multiprocessors.
constexpr int64_t kOutputsPerBlock = 4 * kThreads;
constexpr int64_t kInt32Max = 2147483647;

using BlockScan = cub::BlockScan<long long, kThreads>;

__host__ __device__ __forceinline__ long long min64(long long a, long long b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ long long max64(long long a, long long b) { return a > b ? a : b; }

// Scans n values given by value_at(i) in chunks of ceil(n / kThreads) per
// thread; calls store(i, exclusive_prefix, value). Returns the total to every
// thread. Must be called by the whole block.
template <typename ValueAt, typename Store>
__device__ long long block_scan(int64_t n, ValueAt value_at, Store store,
                                typename BlockScan::TempStorage& temp) {
  const int64_t per_thread = (n + kThreads - 1) / kThreads;
  const int64_t begin = min64(n, threadIdx.x * per_thread);
  const int64_t end = min64(n, begin + per_thread);
  long long local_sum = 0;
  for (int64_t i = begin; i < end; ++i) local_sum += value_at(i);
  long long prefix = 0, total = 0;
  BlockScan(temp).ExclusiveSum(local_sum, prefix, total);
  for (int64_t i = begin; i < end; ++i) {
    const long long value = value_at(i);
    store(i, prefix, value);
    prefix += value;
  }
  __syncthreads();  // temp storage is reused by the next scan
  return total;
}

// First index in sorted[0, n) whose value is > target (n if none).
__device__ __forceinline__ int upper_bound(const int32_t* sorted, int n, int64_t target) {
  int low = 0, high = n;
  while (low < high) {
    const int mid = (low + high) / 2;
    if (sorted[mid] > target) high = mid; else low = mid + 1;
  }
  return low;
}

template <typename CountT>
__global__ void __launch_bounds__(kThreads)
permute_indices_kernel(const CountT* __restrict__ counts, int experts, int ranks, int64_t max_len,
                       int64_t alignment, int32_t* __restrict__ permuted_indices,
                       int32_t* __restrict__ m_sizes, int32_t* __restrict__ m_offsets) {
  extern __shared__ int32_t shared[];
  const int64_t groups = static_cast<int64_t>(experts) * ranks;
  int32_t* arrival_start = shared;
  int32_t* expert_cumulative = shared + groups;
  int32_t* block_end = shared + 2 * groups;
  __shared__ typename BlockScan::TempStorage temp;
  __shared__ int any_negative;
  if (threadIdx.x == 0) any_negative = 0;
  __syncthreads();

  // Stage the counts in shared memory once (coalesced), as int32 in the
  // arrival_start array; a count outside [0, 2^31) is flagged.
  for (int64_t i = threadIdx.x; i < groups; i += kThreads) {
    const long long count = static_cast<long long>(counts[i]);
    if (count < 0 || count > kInt32Max) any_negative = 1;
    arrival_start[i] = static_cast<int32_t>(count);
  }
  __syncthreads();
  MOE_DEVICE_CHECK(!any_negative,
                   "generate_permute_indices: tokens_per_expert_group has a negative count (or one >= 2^31)");

  // Expert-major inclusive scan of the counts: expert_cumulative[e * R + r].
  const long long tokens = block_scan(
      groups,
      [&](int64_t j) { return static_cast<long long>(arrival_start[(j % ranks) * experts + j / ranks]); },
      [&](int64_t j, long long prefix, long long value) {
        expert_cumulative[j] = static_cast<int32_t>(min64(prefix + value, kInt32Max));
      },
      temp);
  MOE_DEVICE_CHECK(tokens <= kInt32Max + 1, "generate_permute_indices: total tokens exceed 2^31");

  // Rank-major exclusive scan, in place: counts become arrival starts. Each
  // thread reads an element just before it overwrites it, so in place is safe.
  block_scan(
      groups, [&](int64_t i) { return static_cast<long long>(arrival_start[i]); },
      [&](int64_t i, long long prefix, long long) { arrival_start[i] = static_cast<int32_t>(prefix); },
      temp);

  // Padded block sizes and their inclusive scan.
  const auto padded_size = [&](int64_t e) -> long long {
    const int64_t first = e * ranks;
    const long long before = first == 0 ? 0 : expert_cumulative[first - 1];
    const long long rows = expert_cumulative[first + ranks - 1] - before;
    const long long at_least = rows > alignment ? rows : alignment;
    return (at_least + alignment - 1) / alignment * alignment;
  };
  const long long padded_rows = block_scan(
      experts, padded_size,
      [&](int64_t e, long long prefix, long long value) {
        block_end[e] = static_cast<int32_t>(min64(prefix + value, kInt32Max));
      },
      temp);
  MOE_DEVICE_CHECK(padded_rows <= max_len,
                   "generate_permute_indices: the padded layout needs more rows than max_len");
  if (padded_rows > max_len) return;  // never reached once the check fired; keeps writes in bounds

  if (blockIdx.x == 0) {
    for (int e = threadIdx.x; e < experts; e += kThreads) {
      m_offsets[e] = block_end[e];
      m_sizes[e] = block_end[e] - (e == 0 ? 0 : block_end[e - 1]);
    }
  }

  const int64_t slice_begin = static_cast<int64_t>(blockIdx.x) * kOutputsPerBlock;
  const int64_t slice_end = min64(max_len, slice_begin + kOutputsPerBlock);
  for (int64_t position = slice_begin + threadIdx.x; position < slice_end; position += kThreads) {
    int32_t value = -1;
    if (position < padded_rows) {
      const int expert = upper_bound(block_end, experts, position);
      const int64_t offset_in_block = position - (expert == 0 ? 0 : block_end[expert - 1]);
      const int32_t* cumulative = expert_cumulative + static_cast<int64_t>(expert) * ranks;
      const int64_t before_expert = expert == 0 ? 0 : expert_cumulative[static_cast<int64_t>(expert) * ranks - 1];
      const int64_t target = before_expert + offset_in_block;  // in expert-major running count
      if (target < cumulative[ranks - 1]) {
        const int rank = upper_bound(cumulative, ranks, target);
        const int64_t rank_start = rank == 0 ? before_expert : cumulative[rank - 1];
        value = arrival_start[static_cast<int64_t>(rank) * experts + expert] +
                static_cast<int32_t>(target - rank_start);
      }
    }
    permuted_indices[position] = value;
  }
}

template <typename CountT>
cudaError_t launch(const CountT* counts, int64_t experts_per_rank, int64_t num_ranks, int64_t max_len,
                   int64_t alignment, int32_t* permuted_indices, int32_t* m_sizes, int32_t* m_offsets,
                   cudaStream_t stream) {
  const size_t shared_bytes = permute_indices_shared_bytes(experts_per_rank, num_ranks);
  auto kernel = permute_indices_kernel<CountT>;
  if (shared_bytes > 48 * 1024) {
    const cudaError_t status =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared_bytes));
    if (status != cudaSuccess) return status;
  }
  const int64_t blocks = max64(1, (max_len + kOutputsPerBlock - 1) / kOutputsPerBlock);
  kernel<<<static_cast<unsigned>(blocks), kThreads, shared_bytes, stream>>>(
      counts, static_cast<int>(experts_per_rank), static_cast<int>(num_ranks), max_len, alignment,
      permuted_indices, m_sizes, m_offsets);
  return cudaGetLastError();
}

}  // namespace

size_t permute_indices_shared_bytes(int64_t experts_per_rank, int64_t num_ranks) {
  return static_cast<size_t>(2 * experts_per_rank * num_ranks + experts_per_rank) * sizeof(int32_t);
}

cudaError_t launch_generate_permute_indices(const void* counts, bool counts_are_int64,
                                            int64_t experts_per_rank, int64_t num_ranks,
                                            int64_t max_len, int64_t alignment,
                                            int32_t* permuted_indices, int32_t* m_sizes,
                                            int32_t* m_offsets, cudaStream_t stream) {
  if (counts_are_int64) {
    return launch(static_cast<const int64_t*>(counts), experts_per_rank, num_ranks, max_len, alignment,
                  permuted_indices, m_sizes, m_offsets, stream);
  }
  return launch(static_cast<const int32_t*>(counts), experts_per_rank, num_ranks, max_len, alignment,
                permuted_indices, m_sizes, m_offsets, stream);
}

}  // namespace moe_ext::cuda
