// Argument checks for the torch op layer (CPU and CUDA kernels share them).
//
// Every user error becomes a Python ValueError / TypeError whose message names
// the op, the argument, what was expected and what was received.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <stdexcept>
#include <string>
#include <utility>

namespace moe_ext::ops {

// Runs a core (torch-free) call, turning its std::invalid_argument into the
// ValueError that the torch layer raises for bad arguments.
template <typename Fn>
decltype(auto) call_core(Fn&& fn) {
  try {
    return std::forward<Fn>(fn)();
  } catch (const std::invalid_argument& error) {
    TORCH_CHECK_VALUE(false, error.what());
  }
}

inline void check_dtype(const at::Tensor& tensor, const char* op, const char* name,
                        std::initializer_list<at::ScalarType> allowed) {
  for (auto dtype : allowed)
    if (tensor.scalar_type() == dtype) return;
  std::string expected;
  for (auto dtype : allowed) expected += std::string(expected.empty() ? "" : " or ") + c10::toString(dtype);
  TORCH_CHECK_TYPE(false, op, ": ", name, " must be ", expected, ", got ", tensor.scalar_type());
}

inline void check_dim(const at::Tensor& tensor, const char* op, const char* name, int64_t dim) {
  TORCH_CHECK_VALUE(tensor.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ",
                    tensor.sizes());
}

inline void check_same_device(const at::Tensor& tensor, const at::Tensor& like, const char* op,
                              const char* name, const char* like_name) {
  TORCH_CHECK_VALUE(tensor.device() == like.device(), op, ": ", name, " is on ", tensor.device(),
                    " but ", like_name, " is on ", like.device());
}

}  // namespace moe_ext::ops
