"""Per-volume operation locks: a second concurrent call on one volume gets ABORTED.

The CSI spec lets a plugin reject overlapping calls for the same volume (the CO retries with
back-off); waiting instead would let a retry storm queue up behind a slow operation. The lock
is per process; cross-process safety comes from etcd compare-and-swap.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from csi_driver.errors import OperationPendingError


class VolumeLocks:
    """Non-blocking named locks (asyncio is single-threaded, so a set is enough)."""

    def __init__(self) -> None:
        self._held: set[str] = set()

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        if key in self._held:
            raise OperationPendingError(f"an operation on {key} is already in progress")
        self._held.add(key)
        try:
            yield
        finally:
            self._held.discard(key)

    def is_held(self, key: str) -> bool:
        return key in self._held
