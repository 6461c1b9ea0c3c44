// Device helpers shared by the routing kernels: row-copy geometry (vector
// width, threads per row), element conversions, index loads.
//
// Row geometry: a row of `row_bytes` bytes is moved in units of the widest of
// 16 / 8 / 4 / 2 / 1 bytes that divides the row size and every base pointer
// (16-byte vector loads whenever alignment allows, a narrower fallback
// otherwise). A group of `threads_per_row` threads (a power of two, <= the
// block size) handles one row; a 256-thread block handles 256 /
// threads_per_row rows. All offsets are int64: rows * row_bytes exceeds 2^31
// at realistic sizes (T*K*H >= 2^31 at ~37k tokens, H=7168, K=8).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "cuda/device_check.cuh"
#include "cuda/launchers.h"

namespace moe_ext::cuda::routing {

constexpr int kBlockThreads = 256;
constexpr int kUnroll = 4;  // vectors a thread keeps in flight per row

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Widest copy unit (bytes) dividing row_bytes and aligning every pointer.
inline int copy_unit_bytes(int64_t row_bytes, std::initializer_list<const void*> pointers) {
  for (int unit : {16, 8, 4, 2}) {
    bool ok = row_bytes % unit == 0;
    for (const void* pointer : pointers)
      ok = ok && reinterpret_cast<uintptr_t>(pointer) % static_cast<uintptr_t>(unit) == 0;
    if (ok) return unit;
  }
  return 1;
}

// Threads per row: enough that each keeps <= kUnroll vectors in flight, a
// power of two in [1, kBlockThreads].
inline int threads_per_row(int64_t vectors_per_row) {
  int threads = 1;
  while (threads < kBlockThreads && static_cast<int64_t>(threads) * kUnroll < vectors_per_row) threads *= 2;
  return threads;
}

// One row of vectors_per_row V's from source to destination by the
// threads_per_row_ threads of a row group (this thread is `lane`): each keeps
// kUnroll loads in flight before its stores. The copy loop of every one-to-one
// row copy (gather_rows, the per-routed-row permute copy, the fused decode permute).
template <typename V>
__device__ __forceinline__ void copy_row(const V* __restrict__ source, V* __restrict__ destination,
                                         int lane, int threads_per_row_, int64_t vectors_per_row) {
  const int64_t stride = static_cast<int64_t>(threads_per_row_) * kUnroll;
  for (int64_t first = lane; first < vectors_per_row; first += stride) {
    V values[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = first + static_cast<int64_t>(u) * threads_per_row_;
      if (v < vectors_per_row) values[u] = source[v];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = first + static_cast<int64_t>(u) * threads_per_row_;
      if (v < vectors_per_row) destination[v] = values[u];
    }
  }
}

// One source row to `count` destination rows (row indices in `destinations`,
// shared memory) by a whole block of kBlockThreads threads: each thread keeps kUnroll loads in flight,
// then stores them to every destination, so the row is read once. The scatter
// step of moe_permute's token-per-block copies.
template <typename V>
__device__ __forceinline__ void copy_row_to_rows(const V* __restrict__ source, V* __restrict__ rows,
                                                 const int32_t* destinations, int count,
                                                 int64_t vectors_per_row) {
  for (int64_t first = threadIdx.x; first < vectors_per_row; first += static_cast<int64_t>(kBlockThreads) * kUnroll) {
    V values[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = first + static_cast<int64_t>(u) * kBlockThreads;
      if (v < vectors_per_row) values[u] = source[v];
    }
    for (int j = 0; j < count; ++j) {
      V* __restrict__ row = rows + static_cast<int64_t>(destinations[j]) * vectors_per_row;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = first + static_cast<int64_t>(u) * kBlockThreads;
        if (v < vectors_per_row) row[v] = values[u];
      }
    }
  }
}

inline unsigned grid_for_rows(int64_t rows, int threads_per_row_) {
  const int64_t rows_per_block = kBlockThreads / threads_per_row_;
  const int64_t blocks = ceil_div(rows, rows_per_block);
  return static_cast<unsigned>(blocks < 1 ? 1 : blocks);
}

// Copy units as types.
template <int kBytes> struct Unit;
template <> struct Unit<16> { using type = uint4; };
template <> struct Unit<8> { using type = uint2; };
template <> struct Unit<4> { using type = uint32_t; };
template <> struct Unit<2> { using type = uint16_t; };
template <> struct Unit<1> { using type = uint8_t; };

template <int kBytes>
using UnitTag = std::integral_constant<int, kBytes>;

// Calls fn(UnitTag<kBytes>{}) for the runtime unit size.
template <typename Fn>
cudaError_t dispatch_unit(int unit, Fn&& fn) {
  switch (unit) {
    case 16: return fn(UnitTag<16>{});
    case 8: return fn(UnitTag<8>{});
    case 4: return fn(UnitTag<4>{});
    case 2: return fn(UnitTag<2>{});
    default: return fn(UnitTag<1>{});
  }
}

// Floating-point element types and their accumulation types.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(float v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <typename T> __device__ __forceinline__ T from_acc_d(double v);
template <> __device__ __forceinline__ double from_acc_d<double>(double v) { return v; }

template <typename T, typename A>
__device__ __forceinline__ T store_acc(A v) {
  if constexpr (sizeof(A) == 8) {
    return from_acc_d<T>(v);
  } else {
    return from_acc<T>(v);
  }
}

// A pack of kCount elements loaded or stored as one aligned access.
template <typename T, int kCount>
struct alignas(sizeof(T) * kCount) Pack {
  T value[kCount];
};

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<T>{}) for the runtime element type.
template <typename Fn>
cudaError_t dispatch_float(FloatType type, Fn&& fn) {
  switch (type) {
    case FloatType::kFloat32: return fn(TypeTag<float>{});
    case FloatType::kFloat16: return fn(TypeTag<__half>{});
    case FloatType::kBFloat16: return fn(TypeTag<__nv_bfloat16>{});
    case FloatType::kFloat64: return fn(TypeTag<double>{});
  }
  return cudaErrorInvalidValue;
}

template <typename IndexT>
__device__ __forceinline__ int64_t load_index(const IndexT* indices, int64_t i) {
  return static_cast<int64_t>(__ldg(indices + i));
}

// Shared launchers (csrc/cuda/routing_rows.cu).
enum class InverseUser { kUnpermuteBackward, kScatterRows };  // picks the assert messages

// inverse[r] = the position p with indices[p] == r, -1 if none (memsets
// inverse first). An index outside [-1, num_rows) or a row named twice fires a
// device-side assert and is never written through.
cudaError_t launch_build_inverse(const void* indices, bool indices_are_int64, int64_t count,
                                 int64_t num_rows, int32_t* inverse, InverseUser user,
                                 cudaStream_t stream);


}  // namespace moe_ext::cuda::routing
