// Host-side helpers shared by the CUDA glue files: launch-status checks, the
// device guard and the current stream, all through PyTorch's stable ABI.
#pragma once

#include <cuda_runtime_api.h>
#include <torch/csrc/stable/accelerator.h>

#include "common/op_checks.h"

// A failed launch or CUDA call, reported with the op's name (RuntimeError).
#define MOE_CUDA_CHECK(op, expr)                                                       \
  do {                                                                                 \
    const cudaError_t moe_status = (expr);                                             \
    MOE_CHECK(moe_status == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(moe_status)); \
  } while (0)

namespace moe_ext::cuda {

// torch's current CUDA stream on `device_index`, through the stable C shim
// function aoti_torch_get_current_cuda_stream (csrc/cuda/current_stream.cpp).
cudaStream_t current_stream(int32_t device_index);

// Makes the tensor's GPU current for the scope of one op call, and gives
// torch's current stream there.
class DeviceGuard {
 public:
  explicit DeviceGuard(const torch::stable::Tensor& tensor)
      : index_(tensor.get_device_index()), guard_(index_) {}
  int32_t index() const { return index_; }
  cudaStream_t stream() const { return current_stream(index_); }

 private:
  int32_t index_;
  torch::stable::accelerator::DeviceGuard guard_;
};

}  // namespace moe_ext::cuda
