// Row moves on CUDA: gather_rows, scatter_rows and their inverse-index step.
//
// scatter_rows is a gather through the inverse index: every output row is
// written exactly once (its source row, or zeros), so no output needs a
// memset first and no data moves through atomics. The only atomic is the
// int32 compare-and-swap that builds the inverse and detects a row named twice.
#include <algorithm>

#include "cuda/device_check.cuh"
#include "cuda/launchers.h"
#include "cuda/routing_common.cuh"

namespace moe_ext::cuda {
namespace routing {
namespace {

template <int kBytes, typename IndexT>
__global__ void __launch_bounds__(kBlockThreads)
gather_rows_kernel(const uint8_t* __restrict__ x, int64_t num_rows, int64_t vectors_per_row,
                   const IndexT* __restrict__ indices, int64_t count, int threads_per_row_,
                   uint8_t* __restrict__ out) {
  using V = typename Unit<kBytes>::type;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * (kBlockThreads / threads_per_row_) +
                    threadIdx.x / threads_per_row_;
  if (p >= count) return;
  const int lane = static_cast<int>(threadIdx.x % threads_per_row_);
  const int64_t source = static_cast<int64_t>(indices[p]);
  const bool in_range = source >= -1 && source < num_rows;
  MOE_DEVICE_CHECK(in_range, "gather_rows: indices out of range [-1, rows of x)");
  V* __restrict__ destination = reinterpret_cast<V*>(out) + p * vectors_per_row;
  if (source < 0 || !in_range) {
    const V zero{};
    for (int64_t v = lane; v < vectors_per_row; v += threads_per_row_) destination[v] = zero;
    return;
  }
  const V* __restrict__ row = reinterpret_cast<const V*>(x) + source * vectors_per_row;
  copy_row(row, destination, lane, threads_per_row_, vectors_per_row);
}

template <typename IndexT>
__global__ void __launch_bounds__(kBlockThreads)
build_inverse_kernel(const IndexT* __restrict__ indices, int64_t count, int64_t num_rows,
                     int32_t* __restrict__ inverse, InverseUser user) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < count; p += step) {
    const int64_t row = static_cast<int64_t>(indices[p]);
    const bool in_range = row >= -1 && row < num_rows;
    if (!in_range) {
      if (user == InverseUser::kScatterRows) {
        MOE_DEVICE_CHECK(false, "scatter_rows: indices out of range [-1, num_rows)");
      } else {
        MOE_DEVICE_CHECK(false, "moe_unpermute_backward: expanded_row_idx out of range [-1, rows of permuted)");
      }
      continue;
    }
    if (row < 0) continue;
    const int32_t previous = atomicCAS(inverse + row, -1, static_cast<int32_t>(p));
    if (previous != -1) {
      if (user == InverseUser::kScatterRows) {
        MOE_DEVICE_CHECK(false, "scatter_rows: indices names a row twice");
      } else {
        MOE_DEVICE_CHECK(false, "moe_unpermute_backward: expanded_row_idx names a row twice");
      }
    }
  }
}

template <typename IndexT>
cudaError_t launch_gather(const void* x, int64_t num_rows, int64_t row_bytes, const IndexT* indices,
                          int64_t count, void* out, cudaStream_t stream) {
  if (count == 0 || row_bytes == 0) return cudaSuccess;
  const int unit = copy_unit_bytes(row_bytes, {x, out});
  const int64_t vectors = row_bytes / unit;
  const int threads = threads_per_row(vectors);
  const unsigned blocks = grid_for_rows(count, threads);
  return dispatch_unit(unit, [&](auto unit_tag) {
    constexpr int kBytes = decltype(unit_tag)::value;
    gather_rows_kernel<kBytes, IndexT><<<blocks, kBlockThreads, 0, stream>>>(
        static_cast<const uint8_t*>(x), num_rows, vectors, indices, count, threads,
        static_cast<uint8_t*>(out));
    return cudaGetLastError();
  });
}

}  // namespace

cudaError_t launch_build_inverse(const void* indices, bool indices_are_int64, int64_t count,
                                 int64_t num_rows, int32_t* inverse, InverseUser user,
                                 cudaStream_t stream) {
  if (num_rows == 0 && count == 0) return cudaSuccess;
  if (num_rows > 0) {
    const cudaError_t status =
        cudaMemsetAsync(inverse, 0xff, static_cast<size_t>(num_rows) * sizeof(int32_t), stream);  // -1
    if (status != cudaSuccess) return status;
  }
  if (count == 0) return cudaSuccess;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(ceil_div(count, kBlockThreads), 4096));
  if (indices_are_int64) {
    build_inverse_kernel<<<static_cast<unsigned>(blocks), kBlockThreads, 0, stream>>>(
        static_cast<const int64_t*>(indices), count, num_rows, inverse, user);
  } else {
    build_inverse_kernel<<<static_cast<unsigned>(blocks), kBlockThreads, 0, stream>>>(
        static_cast<const int32_t*>(indices), count, num_rows, inverse, user);
  }
  return cudaGetLastError();
}

}  // namespace routing

cudaError_t launch_gather_rows(const void* x, int64_t num_rows, int64_t row_bytes,
                               const void* indices, bool indices_are_int64, int64_t count, void* out,
                               cudaStream_t stream) {
  if (indices_are_int64) {
    return routing::launch_gather(x, num_rows, row_bytes, static_cast<const int64_t*>(indices), count,
                                  out, stream);
  }
  return routing::launch_gather(x, num_rows, row_bytes, static_cast<const int32_t*>(indices), count,
                                out, stream);
}

cudaError_t launch_scatter_rows(const void* x, int64_t count, int64_t row_bytes, const void* indices,
                                bool indices_are_int64, int64_t num_out_rows, void* out,
                                int32_t* inverse, cudaStream_t stream) {
  const cudaError_t status = routing::launch_build_inverse(indices, indices_are_int64, count, num_out_rows,
                                                           inverse, routing::InverseUser::kScatterRows,
                                                           stream);
  if (status != cudaSuccess) return status;
  return routing::launch_gather(x, count, row_bytes, inverse, num_out_rows, out, stream);
}

}  // namespace moe_ext::cuda
