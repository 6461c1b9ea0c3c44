// Argument checks for the torch op layer (CPU and CUDA kernels share them),
// written against PyTorch's stable ABI only (torch/csrc/stable, torch/headeronly).
//
// Every user error names the op, the argument, what was expected and what was
// received. What Python sees (docs/DESIGN.md, "Binary compatibility"):
//   MOE_CHECK_VALUE  throws std::invalid_argument: torch's Python binding turns
//                    it into ValueError on every torch this library loads on.
//   MOE_CHECK_TYPE   throws std::runtime_error whose message starts with
//                    "TypeError: ": the stable ABI has no way to raise a Python
//                    TypeError from C++, so torch.ops.moe_ext.* raise
//                    RuntimeError and the wrappers in python/moe_ext/ops turn
//                    it back into TypeError (moe_ext._loader.native_errors).
//   MOE_CHECK        throws std::runtime_error: RuntimeError.
//
// Messages are built by core::str_cat, never by iostreams (see core/str_cat.h
// for the torch 2.11 quirk that started this, and DESIGN for whether it still
// applies to a stable-ABI build).
#pragma once

#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include "core/str_cat.h"

#include <initializer_list>
#include <stdexcept>
#include <string>
#include <utility>

// The prefix the Python side recognises (keep in sync with moe_ext/_loader.py).
#define MOE_TYPE_ERROR_PREFIX "TypeError: "

#define MOE_THROW_VALUE(...) throw std::invalid_argument(::moe_ext::core::str_cat(__VA_ARGS__))
#define MOE_THROW_TYPE(...) \
  throw std::runtime_error(::moe_ext::core::str_cat(MOE_TYPE_ERROR_PREFIX, __VA_ARGS__))
#define MOE_THROW_RUNTIME(...) throw std::runtime_error(::moe_ext::core::str_cat(__VA_ARGS__))

#define MOE_CHECK_VALUE(cond, ...) \
  do { if (!(cond)) { MOE_THROW_VALUE(__VA_ARGS__); } } while (0)
#define MOE_CHECK_TYPE(cond, ...) \
  do { if (!(cond)) { MOE_THROW_TYPE(__VA_ARGS__); } } while (0)
#define MOE_CHECK(cond, ...) \
  do { if (!(cond)) { MOE_THROW_RUNTIME(__VA_ARGS__); } } while (0)

namespace moe_ext::ops {

using Tensor = torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;

inline std::string shape_str(const Tensor& tensor) {
  std::string out = "[";
  for (int64_t i = 0; i < tensor.dim(); ++i) out += (i ? ", " : "") + std::to_string(tensor.size(i));
  return out + "]";
}
inline const char* dtype_str(ScalarType dtype) { return torch::headeronly::toString(dtype); }
inline std::string device_str(const Tensor& tensor) {
  const auto device = tensor.device();
  std::string name = device.is_cpu() ? "cpu" : device.is_cuda() ? "cuda" : core::str_cat("device type ",
      static_cast<int>(device.type()));
  if (device.has_index() && !device.is_cpu()) name += core::str_cat(":", static_cast<int>(device.index()));
  return name;
}

// tensor.contiguous() and tensor.to(dtype) without a dispatcher round trip
// when nothing changes: through the stable ABI every torch::stable op is a
// boxed call (a few microseconds of host time each), where at::Tensor's
// methods return early inline.
inline Tensor make_contiguous(const Tensor& tensor) {
  return tensor.is_contiguous() ? tensor : torch::stable::contiguous(tensor);
}
inline Tensor make_contiguous_as(const Tensor& tensor, ScalarType dtype) {
  return tensor.scalar_type() == dtype ? make_contiguous(tensor)
                                       : torch::stable::to(make_contiguous(tensor), dtype);
}

// Runs a core (torch-free) call; its std::invalid_argument already is the
// ValueError the op layer raises for bad arguments, so nothing is converted.
template <typename Fn>
decltype(auto) call_core(Fn&& fn) {
  return std::forward<Fn>(fn)();
}

inline void check_dtype(const Tensor& tensor, const char* op, const char* name,
                        std::initializer_list<ScalarType> allowed) {
  const ScalarType dtype = tensor.scalar_type();
  for (auto candidate : allowed)
    if (dtype == candidate) return;
  std::string expected;
  for (auto candidate : allowed)
    expected += std::string(expected.empty() ? "" : " or ") + dtype_str(candidate);
  MOE_THROW_TYPE(op, ": ", name, " must be ", expected, ", got ", dtype_str(dtype));
}

inline void check_dim(const Tensor& tensor, const char* op, const char* name, int64_t dim) {
  MOE_CHECK_VALUE(tensor.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ",
                  shape_str(tensor));
}

inline void check_same_device(const Tensor& tensor, const Tensor& like, const char* op,
                              const char* name, const char* like_name) {
  MOE_CHECK_VALUE(tensor.device() == like.device(), op, ": ", name, " is on ", device_str(tensor),
                  " but ", like_name, " is on ", device_str(like));
}

inline void check_floating(const Tensor& tensor, const char* op, const char* name) {
  check_dtype(tensor, op, name,
              {ScalarType::Float, ScalarType::Half, ScalarType::BFloat16, ScalarType::Double});
}

inline void check_index(const Tensor& tensor, const char* op, const char* name) {
  check_dtype(tensor, op, name, {ScalarType::Int, ScalarType::Long});
}

}  // namespace moe_ext::ops
