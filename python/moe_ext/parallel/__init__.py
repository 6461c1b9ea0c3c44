"""Parallel layers for MoE models: tensor-parallel linear ops and expert-parallel training styles.

- :mod:`moe_ext.parallel.expert_parallel` — ``GroupedExperts``, ``TokenReorderer`` and the DTensor
  styles ``TensorParallel``, ``ExpertParallel``, ``ExpertTensorParallel``,
  ``ReordererSequenceParallel``;
- :mod:`moe_ext.parallel.torchtitan_dispatcher` — ``MoeExtTokenDispatcher`` for torchtitan 0.3
  (imported on its own: it needs torchtitan).
"""
