"""EXPERIMENT (issue 20 item 2; removed with the MOE_EXT_UNPERMUTE_BWD switch before the final merge).

Times moe_unpermute_backward (grad_permuted + grad_probs) under each backward kernel variant in one run,
with bench_routing.py's method (useful bytes, both floors, L2-cold input sets, CUDA graphs), and checks
each variant against the "tile" kernel on the same inputs (named rows bitwise, grad_probs to 1e-4).

    python3 bench/unpermute_bwd_variants.py [variant ...]   # default: tile flat flat1 flat8 flat2 flat64 flat64x8
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import bench_routing as b  # noqa: E402
from moe_ext.ops import moe_permute  # noqa: E402


def case(num_tokens, hidden_size, topk, num_experts, ep_size, dtype=torch.bfloat16):
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(num_tokens, hidden_size, generator=generator).to(dtype).cuda()
    ids = b.routing(generator, num_tokens, topk, num_experts, "cuda")
    probs = torch.rand(num_tokens, topk, generator=generator).cuda()
    permuted, row_idx, _ = moe_permute(hidden, ids, num_experts=num_experts,
                                       active_expert_range=b.rank0_range(num_experts, ep_size))
    valid_rows = int((row_idx >= 0).sum())
    needed_tokens = int((row_idx.view(num_tokens, topk) >= 0).any(1).sum())
    grad = torch.randn(num_tokens, hidden_size, generator=generator).to(dtype).cuda()
    row_bytes = hidden_size * hidden.element_size()
    moved = needed_tokens * row_bytes + 2 * valid_rows * row_bytes + num_tokens * topk * 12
    return moved, (grad, permuted, row_idx.view(-1), probs)


def main():
    variants = sys.argv[1:] or ["tile", "flat", "flat1", "flat8", "flat2", "flat64", "flat64x8"]
    shapes = [(8192, 7168, 8, 256, ep) for ep in (1, 2, 4, 8, 32)] + [(4096, 4096, 2, 64, 1), (2048, 7168, 8, 256, 8)]
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; µs per call; ratio = ours / faster floor")
    print("| case | MB | memcpy | kernel | " + " | ".join(variants) + " |")
    for num_tokens, hidden_size, topk, num_experts, ep in shapes:
        moved, inputs = case(num_tokens, hidden_size, topk, num_experts, ep)
        op = lambda g, p, r, w: torch.ops.moe_ext.moe_unpermute_backward(g, p, r, w, topk, True)  # noqa: E731
        named = inputs[2][inputs[2] >= 0].long()
        reference = None
        cells = []
        for variant in variants:
            os.environ["MOE_EXT_UNPERMUTE_BWD"] = variant
            got_grad, got_probs = op(*inputs)
            torch.cuda.synchronize()
            if reference is None:
                reference = (got_grad[named].clone(), got_probs.clone())
            else:
                same = torch.equal(got_grad[named], reference[0])
                close = torch.allclose(got_probs, reference[1], rtol=1e-4, atol=1e-4)
                if not (same and close):
                    print(f"# MISMATCH {variant}: grad rows equal {same}, grad_probs close {close}")
            again = op(*inputs)
            if not (torch.equal(again[1], got_probs) and torch.equal(again[0][named], got_grad[named])):
                print(f"# NOT DETERMINISTIC {variant}")
            del got_grad, got_probs, again
            sets = b.input_sets(inputs, moved, "cuda")
            cells.append(b.time_us(op, sets, "cuda")[0])
            del sets
        memcpy, kernel = b.floors_us(moved, "cuda")
        floor = min(memcpy, kernel)
        name = f"bwd T={num_tokens} H={hidden_size} K={topk} E={num_experts} EP{ep}"
        print(f"| {name} | {moved / 1e6:.2f} | {memcpy:.1f} | {kernel:.1f} | "
              + " | ".join(f"{c:.1f} ({c / floor:.2f})" for c in cells) + " |", flush=True)
        del inputs
        torch.cuda.empty_cache()
    os.environ.pop("MOE_EXT_UNPERMUTE_BWD", None)


if __name__ == "__main__":
    main()
