# Probe: which c10 error macros survive being thrown from a TORCH_LIBRARY op on this torch.
import sys
import torch
from torch.utils.cpp_extension import load_inline

src = r"""
#include <torch/library.h>
#include <ATen/ATen.h>
at::Tensor f_value(const at::Tensor& x) { TORCH_CHECK_VALUE(false, "value error ", x.sizes()); return x; }
at::Tensor f_type(const at::Tensor& x) { TORCH_CHECK_TYPE(false, "type error"); return x; }
at::Tensor f_plain(const at::Tensor& x) { TORCH_CHECK(false, "plain error"); return x; }
at::Tensor f_value2(const at::Tensor& x) { throw c10::ValueError({__func__, __FILE__, static_cast<uint32_t>(__LINE__)}, "value2"); return x; }
TORCH_LIBRARY(probe, m) { m.def("f_value(Tensor x) -> Tensor"); m.def("f_type(Tensor x) -> Tensor"); m.def("f_plain(Tensor x) -> Tensor"); m.def("f_value2(Tensor x) -> Tensor"); }
TORCH_LIBRARY_IMPL(probe, CPU, m) { m.impl("f_value", &f_value); m.impl("f_type", &f_type); m.impl("f_plain", &f_plain); m.impl("f_value2", &f_value2); }
"""
load_inline("probe", cpp_sources=src, is_python_module=False, verbose=False)
name = sys.argv[1]
try:
    getattr(torch.ops.probe, name)(torch.ones(2))
except Exception as e:
    print(name, "->", type(e).__name__, str(e).splitlines()[0])
