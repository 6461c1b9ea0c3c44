"""The demo's synthetic model and data: one DeepSeek-like MoE layer and a skewed token stream.

Everything is a pure function of the seed (and the step), computed on the CPU
with its own generator, so every rank builds the same logical weights and the
same global batch without communicating, and the dense reference on each rank
sees exactly what the expert-parallel layer saw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moe_ext.demo.config import DemoConfig

__all__ = ["LogicalWeights", "make_weights", "make_batch", "initial_placement", "routing_options"]


@dataclass
class LogicalWeights:
    """One weight set per logical expert (the dense reference's view of the layer)."""

    gate: torch.Tensor  # [E, H] router
    w13: torch.Tensor  # [E, H, 2I] gate | up projections
    w2: torch.Tensor  # [E, I, H] down projection
    topic_probability: torch.Tensor  # [E] how often a token's topic is each expert

    def to(self, device: torch.device) -> "LogicalWeights":
        return LogicalWeights(self.gate.to(device), self.w13.to(device), self.w2.to(device),
                              self.topic_probability)

    @property
    def bytes_per_expert(self) -> int:
        """Bytes of one expert's weights (one slot row of w13 plus one of w2)."""
        return (self.w13[0].numel() * self.w13.element_size()) + (self.w2[0].numel() * self.w2.element_size())


# Expert weights larger than this are drawn on the accelerator itself (its own
# seeded generator, the same on every rank) instead of on the CPU and copied:
# the DeepSeek-V3 preset's 45 GiB would take minutes and the host's memory per rank.
DEVICE_GENERATION_BYTES = 1 << 30


def make_weights(config: DemoConfig, device: torch.device | None = None) -> LogicalWeights:
    """The logical weights, on ``device`` (default CPU); a pure function of the seed and the device type."""
    generator = torch.Generator().manual_seed(config.seed)
    experts, hidden, inter = config.experts, config.hidden_size, config.intermediate_size
    gate = torch.randn(experts, hidden, generator=generator) / math.sqrt(hidden)
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type != "cpu" and experts * config.bytes_per_expert > DEVICE_GENERATION_BYTES:
        on_device = torch.Generator(device=device).manual_seed(config.seed)
        w13 = torch.randn(experts, hidden, 2 * inter, generator=on_device, device=device).div_(math.sqrt(hidden))
        w2 = torch.randn(experts, inter, hidden, generator=on_device, device=device).div_(math.sqrt(inter))
        gate = gate.to(device)
    else:
        w13 = torch.randn(experts, hidden, 2 * inter, generator=generator) / math.sqrt(hidden)
        w2 = torch.randn(experts, inter, hidden, generator=generator) / math.sqrt(inter)
    # Zipf popularity over experts of neighbouring ids (experts of related
    # topics tend to be hot together), starting at a seeded expert: the hot
    # experts crowd onto one or two ranks of the initial placement.
    popularity = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** config.skew
    first_hot = int(torch.randint(experts, (1,), generator=generator))
    order = (torch.arange(experts) + first_hot) % experts
    topic_probability = torch.empty(experts, dtype=torch.float64)
    topic_probability[order] = popularity / popularity.sum()
    return LogicalWeights(gate, w13, w2, topic_probability).to(device)


def make_batch(config: DemoConfig, weights: LogicalWeights, step: int) -> torch.Tensor:
    """The global batch of ``step`` [ranks * tokens_per_rank, H]; rank r takes rows r*T..(r+1)*T.

    Each token is about two topics drawn from the popularity law; topic c adds
    a component along the router row of expert c that raises that expert's
    logit by 3 (first topic) or 2 (second), over N(0, 1) noise, so tokens
    mostly pick their topics' experts and expert loads follow the popularity.
    """
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step + 1)
    count = config.ranks * config.tokens_per_rank
    topics = torch.multinomial(weights.topic_probability, 2 * count, replacement=True,
                               generator=generator).view(count, 2)
    batch = torch.randn(count, config.hidden_size, generator=generator)
    gate = weights.gate.cpu()
    for column, strength in ((0, 3.0), (1, 2.0)):
        rows = gate[topics[:, column]]
        batch += strength * rows / rows.pow(2).sum(dim=1, keepdim=True)
    return batch


def initial_placement(config: DemoConfig) -> torch.Tensor:
    """Slot p holds expert p mod E: what a deployment starts from before it has seen any load."""
    return torch.arange(config.num_physical_experts, dtype=torch.int64) % config.experts


def routing_options(config: DemoConfig) -> dict:
    """DeepSeek-like routing: sigmoid scores, grouped top-k, renormalised weights."""
    grouped = config.expert_groups > 1
    return dict(scoring="sigmoid", renormalize=True,
                num_expert_group=config.expert_groups if grouped else None,
                topk_group=config.topk_group if grouped else None, group_score="max" if grouped else None,
                routed_scaling_factor=1.0)
