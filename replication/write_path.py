"""The per-request write path (writes, FUA writes, trims, zeroes, flushes), the pause that
holds every write, and what a request's answers mean for its acknowledgement.

Each request is sent to every member of the write set and awaited; a failed member leaves
the ISR by CAS (isr_changes.py) before the request may be acknowledged, and the
acknowledgement rule is checked again after (I1, I3). The callback path (write_batches.py)
shares the pause, the byte budget and that conclusion.

Must not: acknowledge a request any member has not answered OK unless its failure was dealt
with, or let a write through while a pause is held (a rebuild's last copy would then overwrite
it on the replica about to join the ISR).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING

from replication.backend import Payload
from replication.byte_budget import ByteBudget
from replication.checksum import crc32
from replication.isr_changes import IsrChanges
from replication.messages import Response, Status
from replication.replica_client import ReplicaClient
from replication.replica_modes import ReplicaModes
from replication.write_batches import BatchedWrites, Ranges

if TYPE_CHECKING:
    from replication.resync_runner import RunningResync
    from replication.target import ReplicatedBackend


class WritePath:
    def __init__(self, backend: ReplicatedBackend, modes: ReplicaModes[RunningResync],
                 clients: dict[str, ReplicaClient], budget: ByteBudget,
                 isr_changes: IsrChanges) -> None:
        self._backend = backend
        self._modes = modes
        self._clients = clients  # the target's: shared, never replaced
        self._budget = budget
        self._isr_changes = isr_changes
        self._ops: set[asyncio.Future[list[Response | BaseException]]] = set()
        self.open_gate = asyncio.Event()
        self.open_gate.set()
        self._pausers = 0  # paused() contexts open now; the gate opens at zero
        self.batches = BatchedWrites(backend, modes, clients, budget, self.open_gate,
                                     self.conclude)

    async def _fan_out(
        self, send: Callable[[ReplicaClient], asyncio.Future[Response]], offset: int,
        length: int,
    ) -> None:
        if not self.open_gate.is_set():
            await self.open_gate.wait()
        await self._backend.until_writable()
        members = self._modes.route.write_to
        futures = [send(self._clients[n]) for n in members]
        self._modes.mark_written(offset, length)
        gathered = asyncio.gather(*futures, return_exceptions=True)
        self._ops.add(gathered)
        try:
            results = await gathered
        finally:
            self._ops.discard(gathered)
        await self.conclude(members, results, [(offset, length)])

    async def conclude(self, members: Sequence[str],
                       results: Sequence[Response | BaseException], ranges: Ranges) -> None:
        """Act on one request's answers: drop the replicas that failed (ISR by CAS) or fence
        ourselves; raises BackendIOError if the request must not be acknowledged."""
        backend = self._backend
        failed: list[str] = []
        for node, result in zip(members, results, strict=True):
            if isinstance(result, Response):
                if result.status is Status.OK:
                    continue
                if result.status is Status.ENOSPC:
                    backend.out_of_space = node
                if result.status is Status.STALE_EPOCH:
                    backend.fence(f"replica {node} is fenced at epoch {result.epoch}")
            failed.append(node)
        if failed:
            await self._isr_changes.drop(failed, ranges)
        await backend.until_writable()

    async def write(self, offset: int, data: Payload, fua: bool) -> None:
        n = len(data)
        if not self._budget.try_acquire(n):
            await self._budget.acquire(n)
        try:
            crc = crc32(data)
            backend = self._backend
            await self._fan_out(
                lambda c: c.write(backend.volume_id, backend.epoch, offset, data, fua=fua,
                                  payload_crc=crc),
                offset, n,
            )
        finally:
            self._budget.release(n)

    async def trim(self, offset: int, length: int) -> None:
        backend = self._backend
        await self._fan_out(lambda c: c.trim(backend.volume_id, backend.epoch, offset, length),
                            offset, length)

    async def write_zeroes(self, offset: int, length: int, no_hole: bool) -> None:
        backend = self._backend
        await self._fan_out(
            lambda c: c.write_zeroes(backend.volume_id, backend.epoch, offset, length,
                                     no_hole=no_hole),
            offset, length,
        )

    async def flush(self) -> None:
        backend = self._backend
        await self._fan_out(lambda c: c.flush(backend.volume_id, backend.epoch), 0, 0)
        backend.save_bitmaps()

    async def quiesce(self) -> None:
        """Wait until every write issued so far has been answered by every replica."""
        if self._ops:
            await asyncio.gather(*list(self._ops), return_exceptions=True)
        await self.batches.drained()

    @contextlib.asynccontextmanager
    async def paused(self) -> AsyncIterator[None]:
        """Hold new writes (they wait, they do not fail) and drain the ones in flight.

        Counted: two rebuilds may be in their final rounds at once, and the first to finish
        must not reopen the gate under the second (a write racing the second's last copy
        would be overwritten on its replica by older data, and that replica would join the
        ISR without an acknowledged write: found by the fault benchmark, two replicas
        rebuilt together after every pool had been full)."""
        self._pausers += 1
        self.open_gate.clear()
        try:
            await self.quiesce()
            yield
        finally:
            self._pausers -= 1
            if not self._pausers:
                self.open_gate.set()

    def close(self) -> None:
        self.batches.close()
