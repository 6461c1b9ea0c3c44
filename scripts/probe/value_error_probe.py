# Probe: which c10 error macros survive being thrown from a TORCH_LIBRARY op on this torch.
import sys
import torch
from torch.utils.cpp_extension import load_inline

src = r"""
#include <torch/library.h>
#include <ATen/ATen.h>
#include <sstream>
#include <string>
at::Tensor f_value(const at::Tensor& x) { TORCH_CHECK_VALUE(false, "value error ", x.sizes()); return x; }
at::Tensor f_type(const at::Tensor& x) { TORCH_CHECK_TYPE(false, "type error"); return x; }
at::Tensor f_plain(const at::Tensor& x) { TORCH_CHECK(false, "plain error"); return x; }
at::Tensor f_value2(const at::Tensor& x) { throw c10::ValueError({__func__, __FILE__, static_cast<uint32_t>(__LINE__)}, "value2"); return x; }
at::Tensor f_value3(const at::Tensor& x) { TORCH_CHECK_VALUE(false, "value3"); return x; }
at::Tensor f_sizes(const at::Tensor& x) { TORCH_CHECK(false, "sizes ", x.sizes()); return x; }
at::Tensor f_value_str(const at::Tensor& x) { throw c10::ValueError({__func__, __FILE__, static_cast<uint32_t>(__LINE__)}, c10::str("a", 1, "b")); return x; }
at::Tensor f_concat(const at::Tensor& x) { throw c10::ValueError({__func__, __FILE__, static_cast<uint32_t>(__LINE__)}, std::string("a long message that is not small string ") + std::to_string(x.dim()) + " b"); return x; }
at::Tensor f_oss(const at::Tensor& x) { std::ostringstream s; s << "abc" << 1; volatile size_t n = s.str().size(); (void)n; TORCH_CHECK_VALUE(false, "oss"); return x; }
at::Tensor f_oss_only(const at::Tensor& x) { std::ostringstream s; s << "abc" << 1; return x.new_full({1}, (double)s.str().size()); }
TORCH_LIBRARY(probe, m) { m.def("f_concat(Tensor x) -> Tensor"); m.def("f_oss(Tensor x) -> Tensor"); m.def("f_oss_only(Tensor x) -> Tensor"); m.def("f_value3(Tensor x) -> Tensor"); m.def("f_sizes(Tensor x) -> Tensor"); m.def("f_value_str(Tensor x) -> Tensor"); m.def("f_value(Tensor x) -> Tensor"); m.def("f_type(Tensor x) -> Tensor"); m.def("f_plain(Tensor x) -> Tensor"); m.def("f_value2(Tensor x) -> Tensor"); }
TORCH_LIBRARY_IMPL(probe, CPU, m) { m.impl("f_concat", &f_concat); m.impl("f_oss", &f_oss); m.impl("f_oss_only", &f_oss_only); m.impl("f_value3", &f_value3); m.impl("f_sizes", &f_sizes); m.impl("f_value_str", &f_value_str); m.impl("f_value", &f_value); m.impl("f_type", &f_type); m.impl("f_plain", &f_plain); m.impl("f_value2", &f_value2); }
"""
load_inline("probe", cpp_sources=src, is_python_module=False, verbose=False)
name = sys.argv[1]
try:
    print(name, "returned", getattr(torch.ops.probe, name)(torch.ones(2)))
    getattr(torch.ops.probe, name)(torch.ones(2))
except Exception as e:
    print(name, "->", type(e).__name__, str(e).splitlines()[0])
