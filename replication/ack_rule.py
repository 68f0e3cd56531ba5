"""The acknowledgement rule (I1, I1a) as pure functions: the target and the simulation share them.

- ``write_refusal``: why a write must not be acknowledged now (None: it may be, once every
  member of its write set answered OK).
- ``plan_failure``: what to do when members of a write's set failed: which ISR members
  leave the ISR (by CAS, before anything is acknowledged), or fence the target instead,
  because no in-sync member would remain to be the source of truth.

Must not: do I/O, or know about etcd or sockets.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass


def write_refusal(isr: Sequence[str], min_in_sync: int) -> str | None:
    """None when a write may be acknowledged with ``isr`` as its in-sync set."""
    if len(isr) < max(min_in_sync, 1):
        return (f"only {len(isr)} in-sync replicas {list(isr)}, minInSync is "
                f"{min_in_sync}: write not acknowledged")
    return None


@dataclass(frozen=True)
class FailurePlan:
    remove: tuple[str, ...]  # ISR members to take out of the ISR (CAS) before any ack
    fence: str | None  # the target fences itself (and removes nothing) for this reason


def plan_failure(isr: Sequence[str], failed: Collection[str],
                 dropping: Collection[str] = ()) -> FailurePlan:
    """``failed`` members of a write set failed a request; ``dropping`` are ISR members
    already on their way out (their CAS in flight). The last in-sync members are never
    removed: if none would survive, fence instead, keeping them as the source of truth."""
    leaving = [n for n in isr if n in failed]
    survivors = [n for n in isr if n not in failed and n not in dropping]
    if leaving and not survivors:
        return FailurePlan((), f"every in-sync replica {list(isr)} failed; keeping them in "
                               "the ISR")
    return FailurePlan(tuple(leaving), None)
