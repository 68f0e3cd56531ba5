"""Shrinking the ISR when replicas fail, and growing it when a rebuilt one joins: always by
CAS through the ``Authority``, and a shrink before any write that needed it is acknowledged
(I3).

This is where an acknowledged write could be lost (an ISR that claims a replica has what it
missed, or no ISR at all), so the failure path is strict: missed regions are recorded before
the removal is confirmed, the last ISR members are never removed (I1a), and an error it
cannot account for fences the target.

Must not: talk to etcd itself (the Authority does), or acknowledge anything.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from replication.ack_rule import plan_failure
from replication.authority import Authority, AuthorityUnavailableError, FencedError
from replication.backend import BackendIOError
from replication.replica_modes import ReplicaModes
from replication.resync_runner import ResyncRunner, RunningResync

if TYPE_CHECKING:
    from replication.target import ReplicatedBackend

log = logging.getLogger(__name__)

Ranges = Sequence[tuple[int, int]]  # (offset, length) of each write a request carries


class IsrChanges:
    def __init__(self, backend: ReplicatedBackend, modes: ReplicaModes[RunningResync],
                 authority: Authority, resyncs: ResyncRunner) -> None:
        self._backend = backend
        self._modes = modes
        self._authority = authority
        self._resyncs = resyncs
        # ISR members whose removal (CAS) is in flight: one CAS each, however many requests
        # they failed meanwhile.
        self.dropping: dict[str, asyncio.Future[None]] = {}

    async def drop(self, nodes: Sequence[str], ranges: Ranges) -> None:
        """Take failed replicas out of the write set (ISR members by CAS, once each).

        The last ISR member is never removed (I1a): when every member failed, the target
        fences itself and the ISR stays as it is, so those members remain the source of
        truth. Any error while doing this, other than etcd being unreachable (the write
        then waits or fails, and a later one retries), fences the target too.
        """
        backend = self._backend
        try:
            await self._drop_members(nodes, ranges)
        except BackendIOError:
            raise
        except BaseException as exc:
            if backend.fenced is None:
                backend.fenced = f"replica removal failed: {exc!r}"
                log.error("%s fenced: %s", backend.ctx(), backend.fenced)
            raise
        if not self._modes.isr:
            backend.fence("no in-sync replica left")

    async def _drop_members(self, nodes: Sequence[str], ranges: Ranges) -> None:
        modes = self._modes
        pending = []
        for node in nodes:
            # Marked before the ISR change is confirmed: the regions are recorded as missed
            # whether or not these writes reached the replica.
            modes.missed(node, ranges)
        plan = plan_failure(modes.isr, nodes, self.dropping)
        if plan.fence is not None:
            # None may be removed: one of them has to stay the source of truth; nothing is
            # acknowledged from now on.
            self._backend.fence(plan.fence)
        for node in nodes:
            self._resyncs.abort(node)
            if not modes.in_isr(node):
                self._backend.disconnect(node)
                continue
            future = self.dropping.get(node)
            if future is None:
                future = asyncio.ensure_future(self._remove(node))
                self.dropping[node] = future
            pending.append(future)
        await asyncio.gather(*pending)

    async def _remove(self, node: str) -> None:
        backend = self._backend
        try:
            new_isr = await self._authority.remove_from_isr(frozenset({node}), "replica failed")
        except FencedError as exc:
            self.dropping.pop(node, None)
            backend.fence(str(exc))
        except AuthorityUnavailableError as exc:
            self.dropping.pop(node, None)  # retried by the next failing request
            raise BackendIOError(errno.EIO, f"cannot shrink the ISR: {exc}") from exc
        self._modes.removed_from_isr(node, new_isr)
        self.dropping.pop(node, None)
        backend.disconnect(node)
        backend.save_bitmaps()
        log.warning("%s replica=%s removed from ISR; isr=%s", backend.ctx(), node,
                    list(self._modes.isr))

    async def join(self, node: str) -> None:
        new_isr = await self._authority.add_to_isr(node)
        self._modes.joined_isr(node, new_isr)
        log.info("%s replica=%s joined the ISR; isr=%s", self._backend.ctx(), node,
                 list(self._modes.isr))
