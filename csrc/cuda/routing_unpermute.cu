// moe_unpermute and its backward on CUDA.
//
// Forward: one thread group per token gathers its K rows and sums them with
// the probs in fp32 (fp64 for fp64), in order k = 0..K-1, and writes the
// token row once: deterministic, no atomics, and rows no index names (the
// unwritten tail of moe_permute) are never read.
//
// Backward: (1) an int32 inverse index row -> (t, k), which also proves every
// row is named at most once (device assert otherwise); (2) one block per
// token writes grad_permuted[row] = probs[t,k] * grad_out[t] for each of its
// rows (each row has one writer) and reduces grad_probs[t,k] =
// dot(grad_out[t], permuted[row]) in a fixed order; (3) rows no entry names
// are zeroed. Every output element is written exactly once.
#include <type_traits>

#include "cuda/device_check.cuh"
#include "cuda/launchers.h"
#include "cuda/routing_common.cuh"

namespace moe_ext::cuda {
namespace {

using namespace routing;

constexpr int kBackwardThreads = 256;

template <typename P, typename A>
__device__ __forceinline__ P to_prob(A value) {
  if constexpr (std::is_same_v<P, float>) {
    return static_cast<float>(value);
  } else {
    return store_acc<P>(value);
  }
}

template <typename T, typename P, typename IndexT, int kVec>
__global__ void __launch_bounds__(kBlockThreads)
unpermute_kernel(const T* __restrict__ permuted, int64_t num_rows, int64_t hidden_size,
                 const IndexT* __restrict__ row_idx, const P* __restrict__ probs, int64_t num_tokens,
                 int64_t topk, int threads_per_row_, T* __restrict__ out) {
  using A = typename Acc<T>::type;
  using PackT = Pack<T, kVec>;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * (kBlockThreads / threads_per_row_) +
                        threadIdx.x / threads_per_row_;
  if (token >= num_tokens) return;
  const int lane = static_cast<int>(threadIdx.x % threads_per_row_);
  const int64_t packs = hidden_size / kVec;
  const PackT* __restrict__ source = reinterpret_cast<const PackT*>(permuted);
  PackT* __restrict__ destination = reinterpret_cast<PackT*>(out) + token * packs;
  const IndexT* rows = row_idx + token * topk;
  for (int64_t v = lane; v < packs; v += threads_per_row_) {
    A sum[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) sum[i] = A(0);
#pragma unroll 4
    for (int64_t k = 0; k < topk; ++k) {
      const int64_t row = static_cast<int64_t>(rows[k]);
      const bool in_range = row >= -1 && row < num_rows;
      MOE_DEVICE_CHECK(in_range, "moe_unpermute: expanded_row_idx out of range [-1, rows of permuted)");
      if (row < 0 || !in_range) continue;
      const A weight = probs != nullptr ? static_cast<A>(to_acc(probs[token * topk + k])) : A(1);
      const PackT x = source[row * packs + v];
#pragma unroll
      for (int i = 0; i < kVec; ++i) sum[i] += weight * static_cast<A>(to_acc(x.value[i]));
    }
    PackT y;
#pragma unroll
    for (int i = 0; i < kVec; ++i) y.value[i] = store_acc<T>(sum[i]);
    destination[v] = y;
  }
}

// Sum over the block in a fixed order; the result is valid in thread 0.
template <typename A>
__device__ A block_sum(A value, A* partial) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  const int warp = static_cast<int>(threadIdx.x / 32);
  if ((threadIdx.x & 31) == 0) partial[warp] = value;
  __syncthreads();
  A total = A(0);
  if (threadIdx.x == 0)
    for (int w = 0; w < kBackwardThreads / 32; ++w) total += partial[w];
  __syncthreads();  // partial is reused by the next call
  return total;
}

template <typename T, typename P, typename IndexT, int kVec>
__global__ void __launch_bounds__(kBackwardThreads)
unpermute_backward_kernel(const T* __restrict__ grad_out, const T* __restrict__ permuted,
                          int64_t num_rows, int64_t hidden_size, const IndexT* __restrict__ row_idx,
                          const P* __restrict__ probs, int64_t topk, T* __restrict__ grad_permuted,
                          P* __restrict__ grad_probs) {
  using A = typename Acc<T>::type;
  using PackT = Pack<T, kVec>;
  __shared__ A partial[kBackwardThreads / 32];
  const int64_t token = blockIdx.x;
  const int64_t packs = hidden_size / kVec;
  const PackT* __restrict__ gradient = reinterpret_cast<const PackT*>(grad_out) + token * packs;
  for (int64_t k = 0; k < topk; ++k) {
    const int64_t row = static_cast<int64_t>(row_idx[token * topk + k]);
    // Range and uniqueness were asserted while building the inverse; skip, never write, if broken.
    const bool valid = row >= 0 && row < num_rows;
    A dot = A(0);
    if (valid) {
      const A weight = probs != nullptr ? static_cast<A>(to_acc(probs[token * topk + k])) : A(1);
      PackT* __restrict__ out = reinterpret_cast<PackT*>(grad_permuted) + row * packs;
      const PackT* __restrict__ x = reinterpret_cast<const PackT*>(permuted) + row * packs;
      for (int64_t v = threadIdx.x; v < packs; v += kBackwardThreads) {
        const PackT g = gradient[v];
        PackT o;
#pragma unroll
        for (int i = 0; i < kVec; ++i) o.value[i] = store_acc<T>(weight * static_cast<A>(to_acc(g.value[i])));
        out[v] = o;
        if (grad_probs != nullptr) {
          const PackT xv = x[v];
#pragma unroll
          for (int i = 0; i < kVec; ++i)
            dot += static_cast<A>(to_acc(g.value[i])) * static_cast<A>(to_acc(xv.value[i]));
        }
      }
    }
    if (grad_probs != nullptr) {  // uniform over the block
      const A total = block_sum(dot, partial);
      if (threadIdx.x == 0) grad_probs[token * topk + k] = to_prob<P>(valid ? total : A(0));
    }
  }
}

template <typename T>
bool use_vectors(int64_t hidden_size, std::initializer_list<const void*> pointers) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  return hidden_size % kVec == 0 && copy_unit_bytes(hidden_size * static_cast<int64_t>(sizeof(T)), pointers) == 16;
}

template <typename T, typename P, typename IndexT>
cudaError_t launch_forward(const T* permuted, int64_t num_rows, int64_t hidden_size, const IndexT* row_idx,
                           const P* probs, int64_t num_tokens, int64_t topk, T* out, cudaStream_t stream) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  const bool vectors = use_vectors<T>(hidden_size, {permuted, out});
  const int64_t packs = vectors ? hidden_size / kVec : hidden_size;
  // A thread sums one pack at a time, with up to 4 of its K row loads in flight.
  const int threads = threads_per_row(packs);
  const unsigned blocks = grid_for_rows(num_tokens, threads);
  if (vectors) {
    unpermute_kernel<T, P, IndexT, kVec><<<blocks, kBlockThreads, 0, stream>>>(
        permuted, num_rows, hidden_size, row_idx, probs, num_tokens, topk, threads, out);
  } else {
    unpermute_kernel<T, P, IndexT, 1><<<blocks, kBlockThreads, 0, stream>>>(
        permuted, num_rows, hidden_size, row_idx, probs, num_tokens, topk, threads, out);
  }
  return cudaGetLastError();
}

template <typename T, typename P, typename IndexT>
cudaError_t launch_backward(const T* grad_out, const T* permuted, int64_t num_rows, int64_t hidden_size,
                            const IndexT* row_idx, const P* probs, int64_t num_tokens, int64_t topk,
                            T* grad_permuted, P* grad_probs, cudaStream_t stream) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  const bool vectors = use_vectors<T>(hidden_size, {grad_out, permuted, grad_permuted});
  const auto blocks = static_cast<unsigned>(num_tokens);
  if (vectors) {
    unpermute_backward_kernel<T, P, IndexT, kVec><<<blocks, kBackwardThreads, 0, stream>>>(
        grad_out, permuted, num_rows, hidden_size, row_idx, probs, topk, grad_permuted, grad_probs);
  } else {
    unpermute_backward_kernel<T, P, IndexT, 1><<<blocks, kBackwardThreads, 0, stream>>>(
        grad_out, permuted, num_rows, hidden_size, row_idx, probs, topk, grad_permuted, grad_probs);
  }
  return cudaGetLastError();
}

// Calls fn(TypeTag<P>{}, TypeTag<IndexT>{}) for the probs type (float or T) and index type.
template <typename T, typename Fn>
cudaError_t dispatch_probs_and_index(bool probs_are_float32, bool index_is_int64, Fn&& fn) {
  if (probs_are_float32) {
    return index_is_int64 ? fn(TypeTag<float>{}, TypeTag<int64_t>{}) : fn(TypeTag<float>{}, TypeTag<int32_t>{});
  }
  return index_is_int64 ? fn(TypeTag<T>{}, TypeTag<int64_t>{}) : fn(TypeTag<T>{}, TypeTag<int32_t>{});
}

}  // namespace

cudaError_t launch_moe_unpermute(FloatType type, const void* permuted, int64_t num_rows,
                                 int64_t hidden_size, const void* row_idx, bool row_idx_is_int64,
                                 const void* probs, bool probs_are_float32, int64_t num_tokens,
                                 int64_t topk, void* out, cudaStream_t stream) {
  if (num_tokens == 0 || hidden_size == 0) return cudaSuccess;
  return dispatch_float(type, [&](auto type_tag) {
    using T = typename decltype(type_tag)::type;
    return dispatch_probs_and_index<T>(probs_are_float32, row_idx_is_int64, [&](auto probs_tag, auto index_tag) {
      using P = typename decltype(probs_tag)::type;
      using IndexT = typename decltype(index_tag)::type;
      return launch_forward(static_cast<const T*>(permuted), num_rows, hidden_size,
                            static_cast<const IndexT*>(row_idx), static_cast<const P*>(probs), num_tokens,
                            topk, static_cast<T*>(out), stream);
    });
  });
}

cudaError_t launch_moe_unpermute_backward(FloatType type, const void* grad_out, const void* permuted,
                                          int64_t num_rows, int64_t hidden_size, const void* row_idx,
                                          bool row_idx_is_int64, const void* probs,
                                          bool probs_are_float32, int64_t num_tokens, int64_t topk,
                                          void* grad_permuted, void* grad_probs, int32_t* inverse,
                                          cudaStream_t stream) {
  cudaError_t status = launch_build_inverse(row_idx, row_idx_is_int64, num_tokens * topk, num_rows, inverse,
                                            InverseUser::kUnpermuteBackward, stream);
  if (status != cudaSuccess) return status;
  if (num_tokens > 0) {
    status = dispatch_float(type, [&](auto type_tag) {
      using T = typename decltype(type_tag)::type;
      return dispatch_probs_and_index<T>(probs_are_float32, row_idx_is_int64, [&](auto probs_tag, auto index_tag) {
        using P = typename decltype(probs_tag)::type;
        using IndexT = typename decltype(index_tag)::type;
        return launch_backward(static_cast<const T*>(grad_out), static_cast<const T*>(permuted), num_rows,
                               hidden_size, static_cast<const IndexT*>(row_idx), static_cast<const P*>(probs),
                               num_tokens, topk, static_cast<T*>(grad_permuted), static_cast<P*>(grad_probs),
                               stream);
      });
    });
    if (status != cudaSuccess) return status;
  }
  const int64_t element_bytes = type == FloatType::kFloat64 ? 8 : type == FloatType::kFloat32 ? 4 : 2;
  return launch_zero_unnamed_rows(grad_permuted, num_rows, hidden_size * element_bytes, inverse, stream);
}

}  // namespace moe_ext::cuda
