"""The package's argument errors and the small checks that raise them.

One rule for every public function of moe_ext:

- a value of the wrong *type* (a float or a string where an integer is meant,
  an int where a bool is meant, a list where a tensor is meant) raises
  :class:`TypeError` naming the argument, the expected type and the received one;
- a value of the right type that is out of range or inconsistent raises
  :class:`ArgumentError`, naming the argument, the expected value and the
  received one.

:class:`ArgumentError` is both a :class:`ValueError` (what Python code expects
of a bad value) and an :class:`AssertionError` (what the public EPLB
implementations that moe_ext replaces raise, so callers and tests written
against them keep working: vLLM's and DeepSeek's ``rebalance_experts`` assert).
"""

from __future__ import annotations

import numbers
from typing import Any

__all__ = ["ArgumentError", "check_bool", "check_int", "check_choice"]


class ArgumentError(ValueError, AssertionError):
    """A bad argument value; see the module docstring for the rule."""


def _type_name(value: Any) -> str:
    return type(value).__name__


def check_int(name: str, value: Any, *, minimum: int | None = None,
              maximum: int | None = None) -> int:
    """``value`` as a Python int, refusing bools, floats and strings.

    Accepts any :class:`numbers.Integral` (int, numpy integers) except bool.
    Raises TypeError for a non-integer, ArgumentError outside [minimum, maximum].
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {_type_name(value)} ({value!r})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ArgumentError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ArgumentError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool (numpy bools included); TypeError otherwise.

    A flag that takes anything turns a shifted positional call into a silent
    misbehaviour (an object landing in ``is_profile``); bool means bool.
    """
    if isinstance(value, bool):
        return value
    if type(value).__name__ == "bool_":  # numpy.bool_, without importing numpy
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {_type_name(value)} ({value!r})")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of the strings ``choices``.

    TypeError for a non-string, ArgumentError for a string outside the set.
    """
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {list(choices)}, got {_type_name(value)} ({value!r})")
    if value not in choices:
        raise ArgumentError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value
