"""`--plot FILE.png`: imbalance over steps, and per-rank load before and after rebalancing."""

from __future__ import annotations

__all__ = ["MISSING_MATPLOTLIB", "write_plot"]

MISSING_MATPLOTLIB = ("--plot needs matplotlib, which is not installed: pip install matplotlib "
                      "(or pip install 'moe_ext[plot]')")


def write_plot(result: dict, path: str) -> None:
    """Draw the run summarised in ``result`` into ``path``. ImportError if matplotlib is missing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = result["config"]
    imbalance = result["imbalance_per_step"]
    steps = list(range(1, len(imbalance) + 1))
    figure, (curve, bars) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})

    curve.plot(steps, imbalance, marker=".", color="tab:blue", label="measured, per step")
    for index, event in enumerate(result["rebalances"]):
        curve.axvline(event["step"] + 0.5, color="tab:gray", linestyle="--", linewidth=1,
                      label="rebalance" if index == 0 else None)
        curve.plot([event["step"] + 0.5] * 2, [event["imbalance_before"], event["imbalance_after"]],
                   color="tab:red", marker="v", linewidth=2,
                   label="planned before -> after (window)" if index == 0 else None)
    curve.axhline(1.0, color="black", linewidth=0.8)
    curve.set_xlabel("step")
    curve.set_ylabel("imbalance (max rank load / mean)")
    curve.set_title(f"{config['ranks']} ranks, {config['experts']} experts in "
                    f"{config['experts'] + config['redundant_experts']} slots, top-{config['top_k']}")
    curve.set_ylim(bottom=0.9)
    curve.grid(alpha=0.3)
    curve.legend(loc="upper right")

    before, after = result["rank_load_first_interval"], result["rank_load_last_interval"]
    ranks = range(len(before))
    width = 0.4
    bars.bar([r - width / 2 for r in ranks], before, width, label=f"first {config['rebalance_interval']} steps",
             color="tab:orange")
    bars.bar([r + width / 2 for r in ranks], after, width, label=f"last {config['rebalance_interval']} steps",
             color="tab:green")
    mean = sum(before) / len(before) if before else 0
    bars.axhline(mean, color="black", linewidth=0.8, linestyle=":", label="mean")
    bars.set_xticks(list(ranks))
    bars.set_xlabel("rank")
    bars.set_ylabel("routed tokens per step (mean)")
    bars.set_title("per-rank load before / after rebalancing")
    # Head room above the tallest bar for a one-row legend, so it never covers a bar.
    tallest = max(list(before) + list(after) + [mean], default=1.0)
    bars.set_ylim(0, tallest * 1.3 if tallest > 0 else 1.0)
    bars.legend(loc="upper center", ncol=3, fontsize="small", frameon=False)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
