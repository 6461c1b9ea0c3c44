"""`moe-ext info`: versions, backends compiled and available, devices seen."""

from __future__ import annotations

import argparse
import json
import platform as host_platform


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("info", help="versions, backends compiled and available, devices")
    parser.add_argument("--json", action="store_true", help="print the facts as JSON")
    parser.set_defaults(func=run)


def collect() -> dict:
    import torch

    import moe_ext
    from moe_ext import platform

    built = moe_ext.build_info()
    cuda_ops = torch._C._dispatch_has_kernel_for_dispatch_key(
        "moe_ext::generate_permute_indices", "CUDA")
    return {
        "moe_ext": moe_ext.__version__,
        "python": host_platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "built_against_torch": built["torch_version"],
        "torch_min_version": built["torch_min_version"],
        "cxx_compiler": built["cxx_compiler"],
        "backends": {
            "cpu": {"compiled": True, "available": True},
            "cuda": {
                "kernels_compiled": built["cuda_kernels_compiled"],
                "cuda_archs": built["cuda_archs"],
                "nvcc": built["cuda_compiler_version"],
                "dispatch_registered": bool(cuda_ops),
                "available": platform.has_cuda(),
            },
            "npu": {
                "cann_found_at_build": built["cann_found"],
                "ascend_kernels_built": built["ascend_kernels_built"],
                "dispatch_registered": bool(built.get("npu_dispatch_built")),
                "torch_npu_available": platform.has_npu(),
            },
        },
        "devices": platform.devices(),
        "ops": sorted({name.split("::")[1].split(".")[0] for name in torch._C._dispatch_get_all_op_names()
                       if name.startswith("moe_ext::")}),
    }


def run(args: argparse.Namespace) -> int:
    facts = collect()
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    print(f"moe_ext {facts['moe_ext']}  python {facts['python']}  torch {facts['torch']}"
          f" (op libraries: stable ABI, torch >= {facts['torch_min_version']}; built with"
          f" {facts['built_against_torch']})")
    cuda, npu = facts["backends"]["cuda"], facts["backends"]["npu"]
    rows = [
        ("cpu", "yes", "yes", ""),
        ("cuda", "yes" if cuda["kernels_compiled"] else "no",
         "yes" if cuda["available"] and cuda["dispatch_registered"] else "no",
         f"archs {cuda['cuda_archs'] or '-'}, nvcc {cuda['nvcc'] or '-'}, "
         f"dispatch registered: {cuda['dispatch_registered']}, torch CUDA {facts['torch_cuda']}"),
        ("npu", "yes" if npu["ascend_kernels_built"] else "no",
         "yes" if npu["torch_npu_available"] else "no",
         f"CANN found at build: {npu['cann_found_at_build']}; torch.ops.moe_ext on NPU tensors: "
         + ("AscendC kernels (_C_npu.so)" if npu["dispatch_registered"] else "not registered")
         + "; the MoE layer's NPU path calls torch_npu operators"),
    ]
    print(f"{'backend':8} {'compiled':9} {'usable':7} details")
    for name, compiled, usable, details in rows:
        print(f"{name:8} {compiled:9} {usable:7} {details}")
    print("devices: " + ", ".join(facts["devices"]))
    print("ops: " + ", ".join(facts["ops"]))
    return 0
