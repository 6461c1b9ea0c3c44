"""Parallel state without an engine: group layouts and a group registry.

- :class:`ParallelConfig` — the parallel sizes and switches, validated on
  construction (``ValueError`` naming the fields for impossible combinations);
- :func:`group_layouts` — pure Python: the rank lists of every group of every
  family the config turns on (no torch.distributed needed);
- :func:`init_parallel_state` / :func:`destroy_parallel_state` /
  :func:`is_initialized` and the getters — the groups on an initialised
  ``torch.distributed`` (gloo, nccl, hccl), each a :class:`ParallelGroup`
  with the collectives the layers use; :func:`get_dp_group` is the
  data-parallel group (vLLM's ``get_dp_group()``, layout :func:`dp_layout`).

See docs/parallel_state.md for the families and a worked example.
"""

from moe_ext.distributed.config import ParallelConfig
from moe_ext.distributed.layouts import FAMILIES, dp_layout, group_layouts
from moe_ext.distributed.group import ParallelGroup
from moe_ext.distributed import state as _state
from moe_ext.distributed.state import *  # noqa: F401,F403  (the registry: init, teardown, getters)

__all__ = ["FAMILIES", "ParallelConfig", "ParallelGroup", "dp_layout", "group_layouts", *_state.__all__]
