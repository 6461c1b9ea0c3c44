// Argument checks for the torch op layer (CPU and CUDA kernels share them).
//
// Every user error becomes a Python ValueError / TypeError whose message names
// the op, the argument, what was expected and what was received.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "core/str_cat.h"

#include <initializer_list>
#include <stdexcept>
#include <string>
#include <utility>

// Checks that raise Python ValueError / TypeError / RuntimeError.
//
// Never TORCH_CHECK*, c10::str or iostreams with formatted messages here: on
// the GPU machine's torch 2.11 image any std::ostringstream built inside an
// extension segfaults (scripts/probe/value_error_probe.py), and torch's check
// macros format through one. Messages are built by core::str_cat instead;
// pass shapes, dtypes and devices through shape_str / dtype_str / device_str.
#define MOE_THROW_C10(ErrorType, ...)                                                     \
  throw ::c10::ErrorType({__func__, __FILE__, static_cast<uint32_t>(__LINE__)},           \
                         ::moe_ext::core::str_cat(__VA_ARGS__))
#define MOE_CHECK_VALUE(cond, ...) \
  do { if (C10_UNLIKELY(!(cond))) { MOE_THROW_C10(ValueError, __VA_ARGS__); } } while (0)
#define MOE_CHECK_TYPE(cond, ...) \
  do { if (C10_UNLIKELY(!(cond))) { MOE_THROW_C10(TypeError, __VA_ARGS__); } } while (0)
#define MOE_CHECK(cond, ...) \
  do { if (C10_UNLIKELY(!(cond))) { MOE_THROW_C10(Error, __VA_ARGS__); } } while (0)

namespace moe_ext::ops {

inline std::string shape_str(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + "]";
}
inline const char* dtype_str(at::ScalarType dtype) { return c10::toString(dtype); }
inline std::string device_str(const at::Device& device) { return device.str(); }

// Runs a core (torch-free) call, turning its std::invalid_argument into the
// ValueError that the torch layer raises for bad arguments.
template <typename Fn>
decltype(auto) call_core(Fn&& fn) {
  try {
    return std::forward<Fn>(fn)();
  } catch (const std::invalid_argument& error) {
    MOE_THROW_C10(ValueError, error.what());
  }
}

inline void check_dtype(const at::Tensor& tensor, const char* op, const char* name,
                        std::initializer_list<at::ScalarType> allowed) {
  for (auto dtype : allowed)
    if (tensor.scalar_type() == dtype) return;
  std::string expected;
  for (auto dtype : allowed) expected += std::string(expected.empty() ? "" : " or ") + dtype_str(dtype);
  MOE_THROW_C10(TypeError, op, ": ", name, " must be ", expected, ", got ", dtype_str(tensor.scalar_type()));
}

inline void check_dim(const at::Tensor& tensor, const char* op, const char* name, int64_t dim) {
  MOE_CHECK_VALUE(tensor.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ",
                  shape_str(tensor.sizes()));
}

inline void check_same_device(const at::Tensor& tensor, const at::Tensor& like, const char* op,
                              const char* name, const char* like_name) {
  MOE_CHECK_VALUE(tensor.device() == like.device(), op, ": ", name, " is on ",
                  device_str(tensor.device()), " but ", like_name, " is on ", device_str(like.device()));
}

inline void check_floating(const at::Tensor& tensor, const char* op, const char* name) {
  check_dtype(tensor, op, name, {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
}

inline void check_index(const at::Tensor& tensor, const char* op, const char* name) {
  check_dtype(tensor, op, name, {at::kInt, at::kLong});
}

}  // namespace moe_ext::ops
