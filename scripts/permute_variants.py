"""TEMPORARY (i20p's experiments, removed before the final merge): the permute rows of
bench/bench_routing.py timed under each MOE_EXT_PERMUTE_* variant in one process, on
the same inputs, one line per (case, variant); the seed path is skipped.

    python3 scripts/permute_variants.py "ONEPASS=0" "TILE=1" "TILE=2" "TILE=4" "FUSED_DECODE=0"
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import bench_routing as b  # noqa: E402

VARIANTS = sys.argv[1:] or ["ONEPASS=0", "TILE=2"]
KEYS = ("MOE_EXT_PERMUTE_ONEPASS", "MOE_EXT_PERMUTE_TILE", "MOE_EXT_PERMUTE_FUSED_DECODE", "MOE_EXT_PERMUTE_PDL",
        "MOE_EXT_PERMUTE_BARRIER")
original_measure = b.measure


def measure_variants(name, moved, ours_fn, seed_fn, inputs, device, public=None):
    for variant in VARIANTS:
        decode = "T=16 " in name or "T=256 " in name
        if variant.startswith("FUSED_DECODE") and (not decode or "aligned" in name or "fp8" in name):
            continue  # only decode sizes take the fused decode kernel
        if variant.startswith("TILE") and variant != "TILE=2" and ("index only" in name or decode):
            continue  # no copy to tile / decode rows: the default tile is enough
        for key in KEYS:
            os.environ.pop(key, None)
        key, value = variant.split("=")
        os.environ[f"MOE_EXT_PERMUTE_{key}"] = value
        try:
            row = original_measure(name, moved, ours_fn, None, inputs, device)
        except Exception as error:  # noqa: BLE001 - report and go on with the other variants
            print(f"| {name:<46} | {variant:<10} | FAILED: {type(error).__name__}: {str(error)[:200]} |", flush=True)
            continue
        print(f"| {name:<46} | {variant:<10} | {moved / 1e6:8.2f} | {row.memcpy:8.1f} | {row.kernel:8.1f} | "
              f"{row.ours:8.1f}{'' if row.ours_graph or device == 'cpu' else '*'} | {row.ours / row.floor:6.2f} |",
              flush=True)
    return None


b.measure = measure_variants
for skipped in ("unpermute_case", "unpermute_backward_case", "regroup_case", "histogram_case"):
    setattr(b, skipped, lambda *args, **kwargs: None)
original_cases = b.cases
b.cases = lambda *args: (row for row in original_cases(*args) if row is not None)
print("| case | variant | MB | memcpy µs | kernel µs | ours µs | ours / faster floor |")
print("| --- | --- | --- | --- | --- | --- | --- |")
sys.argv = [sys.argv[0], "--only", "permute", "--no-public"]
b.main()
