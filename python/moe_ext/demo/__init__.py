"""`moe-ext demo`: the whole expert-parallel MoE system at work on local ranks.

Several local ranks run a small DeepSeek-like MoE layer over a skewed token
stream, check every step against a dense reference, record expert loads,
rebalance with the EPLB planner, move the expert weights and carry on. See
docs/demo.md. The seams to the rest of moe_ext are in :mod:`moe_ext.demo.pieces`.
"""

from moe_ext.demo.config import DemoConfig
from moe_ext.demo.runner import DemoFailure, resolve_device, run_demo

__all__ = ["DemoConfig", "DemoFailure", "resolve_device", "run_demo"]
