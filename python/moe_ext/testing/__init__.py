"""Helpers for tests of moe_ext and of code built on it.

- :mod:`moe_ext.testing.reference`: plain-torch implementations of every op's
  contract, written for clarity, used as the oracle in tests and benchmarks.
- :mod:`moe_ext.testing.distributed`: run a function on several local ranks.
"""
