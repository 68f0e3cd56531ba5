"""Running a volume's resyncs: which replicas are being brought in line, what a finished
or failed one changes, and when a failed convergence is tried again (I4, I5).

``resync.py`` copies one replica; this starts that copy as a task with the replica in the
write set (REBUILDING, or CONVERGING for an ISR member), and ends it: a success drops the
replica's bitmap (it lacks nothing), a failure keeps it (it still lacks that) and, for an
ISR member, retries after a pause. Only the single writer can order copies against writes,
so resyncs run inside the target.

Must not: copy data (resync.py does), or change the ISR (a rebuild joins it through the
target's ISR changes).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from replication.authority import ResyncProgress
from replication.bitmap_store import BitmapStore
from replication.replica_client import ReplicaClient
from replication.replica_modes import ReplicaModes
from replication.resync import Resync

if TYPE_CHECKING:
    from replication.target import ReplicatedBackend

log = logging.getLogger(__name__)

RETRY_CONVERGE_S = 5.0

RunningResync = tuple[Resync, asyncio.Task[None]]


class ResyncRunner:
    def __init__(self, backend: ReplicatedBackend, modes: ReplicaModes[RunningResync],
                 clients: dict[str, ReplicaClient], bitmap_store: BitmapStore) -> None:
        self._backend = backend
        self._modes = modes
        self._clients = clients  # the target's: shared, never replaced
        self._bitmap_store = bitmap_store

    def start(self, node: str, client: ReplicaClient | None, join: bool) -> None:
        """Put ``node`` in the write set and copy what it lacks in the background."""
        if self._modes.resyncing(node) or self._backend.fenced is not None:
            return
        if client is not None:
            old = self._clients.get(node)
            if old is not None and old is not client:
                old.close()
            self._clients[node] = client
        elif node not in self._clients:
            return  # dropped since this retry was scheduled: the rejoiner brings it back
        known = self._modes.bitmap(node) if join else None
        if known is not None and known.dirty_regions == known.regions:
            known = None  # "everything": comparing checksums copies less
        resync = Resync(self._backend, node, self._clients[node], known, join)
        task = asyncio.get_running_loop().create_task(self._run(resync))
        self._modes.resync_started(node, resync.bitmap, (resync, task))

    def converge(self) -> None:
        for node in self._modes.isr[1:]:
            self.start(node, None, join=False)

    async def _run(self, resync: Resync) -> None:
        backend = self._backend
        node = resync.node
        try:
            await resync.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the replica stays out of sync; retried later
            log.warning("%s replica=%s %s failed: %s", backend.ctx(), node, resync.kind, exc)
            self._modes.resync_ended(node)
            if not self._modes.in_isr(node):
                backend.disconnect(node)
            elif node in self._clients:  # an ISR member still to converge: try again soon
                asyncio.get_running_loop().call_later(
                    RETRY_CONVERGE_S, self.start, node, None, False
                )
            await backend.report_progress(node, None)
            return
        self._modes.resync_succeeded(node)
        self._bitmap_store.discard(node)
        # Left published: operators see what the last rebuild copied ("rebuilt", "converged").
        finished = {"rebuild": "rebuilt", "converge": "converged"}[resync.kind]
        await backend.report_progress(node, replace(resync.progress(), kind=finished))

    def abort(self, node: str) -> None:
        running = self._modes.resync_ended(node)
        if running is not None:
            running[1].cancel()

    def progress(self) -> dict[str, ResyncProgress]:
        return {n: r.progress() for n, (r, _) in self._modes.resyncs()}

    def close(self) -> None:
        for _, task in self._modes.end_all_resyncs():
            task.cancel()
