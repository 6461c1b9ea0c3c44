"""Process groups that moe_ext knows to be unusable, and the check its collectives make.

A collective on a group whose P2P state is undefined (for example, a
rearrangement handle dropped while its transfer was in flight: the peers'
matching sends and receives may never complete) would block until the
process-group timeout and leave the group broken. Such a group is marked
here, on the rank that knows it, and every moe_ext collective on it raises
:class:`GroupUnusableError` at once instead of entering the collective.

The mark is per process: a finaliser cannot run collectives (it runs at
different times on different ranks), so the other ranks learn of it only
through their own errors. Recovery is to destroy and recreate the group (or
restart); :func:`clear_unusable` removes the mark for code that has done so.
"""

from __future__ import annotations

import threading
from typing import Any, Optional

__all__ = ["GroupUnusableError", "check_group_usable", "clear_unusable", "mark_unusable", "unusable_reason"]


class GroupUnusableError(RuntimeError):
    """A moe_ext collective was called on a group marked unusable; the message says why."""


_lock = threading.Lock()
_unusable: dict = {}  # id(group) -> (group, reason); the group is kept alive so its id stays unique


def _key(group: Any) -> int:
    if group is None:
        import torch.distributed as dist

        group = dist.group.WORLD
    return id(group)


def mark_unusable(group: Any, reason: str) -> None:
    """Mark ``group`` (a ProcessGroup; None = the world) unusable on this rank."""
    with _lock:
        _unusable[_key(group)] = (group, reason)


def unusable_reason(group: Any) -> Optional[str]:
    """Why ``group`` is marked unusable on this rank, or None."""
    if not _unusable:  # the common case: one dict check
        return None
    entry = _unusable.get(_key(group))
    return entry[1] if entry is not None else None


def check_group_usable(group: Any, what: str, group_name: Optional[str] = None) -> None:
    """Raise :class:`GroupUnusableError` naming ``what`` (and ``group_name``) if ``group`` is marked
    unusable. Cheap when no group is marked (one dict check, no formatting): collectives on the
    decode path call it."""
    if not _unusable:
        return
    reason = unusable_reason(group)
    if reason is not None:
        where = what if group_name is None else f"{what} (group {group_name!r})"
        raise GroupUnusableError(
            f"{where}: this process group is unusable on this rank: {reason}. A collective on it could "
            "block until the process-group timeout; destroy and recreate the group (or restart the "
            "process), then call moe_ext.distributed.health.clear_unusable(group).")


def clear_unusable(group: Any) -> None:
    """Remove the mark (after the caller has recreated or otherwise recovered the group)."""
    with _lock:
        _unusable.pop(_key(group), None)
