"""The callback write path: the writes of one event-loop tick leave as one WRITE_BATCH frame
per member of the write set, and each is acknowledged by a callback, with no task per write.

This is the hot path (4 KiB writes at queue depth 32 cost ~19 us of target CPU each with
batches, ~37 with a frame per write), so a batch is counted by one join object instead of a
gather, and failures, rare, are handled in a task of their own. The rules are the same as on
the per-request path (write_path.py): every member answered OK and the target may still
acknowledge, or the failed members are dealt with (ISR by CAS) first.

Must not: acknowledge a write any member has not answered, or leave a write unanswered:
every ``done`` is called exactly once, even after a bug.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from replication.backend import BackendIOError, Payload
from replication.byte_budget import ByteBudget
from replication.errors import ReplicaUnavailableError
from replication.hold import HeldError
from replication.messages import Response, Status
from replication.payloads import WriteBatch
from replication.replica_client import ReplicaClient
from replication.replica_modes import ReplicaModes

if TYPE_CHECKING:
    from replication.resync_runner import RunningResync
    from replication.target import ReplicatedBackend

log = logging.getLogger(__name__)

# Callback-path writes in flight per volume: well under a replica connection's request cap
# (messages.DEFAULT_MAX_IN_FLIGHT), which resync traffic shares.
MAX_CALLBACK_WRITES = 1024
# A batch is sent at the end of the tick, or at once when it reaches either bound.
BATCH_MAX_WRITES = 16
BATCH_MAX_BYTES = 4 << 20

WriteDone = Callable[[BackendIOError | None], None]
Ranges = Sequence[tuple[int, int]]  # (offset, length) of each write a request carries
# Acts on one request's answers (write_path.WritePath.conclude): raises if not acknowledged.
Conclude = Callable[[Sequence[str], Sequence[Response | BaseException], Ranges], Awaitable[None]]


class _Batch:
    """Callback-path writes gathered during one event-loop tick, sent as one WRITE_BATCH."""

    __slots__ = ("bytes", "dones", "handle", "writes")

    def __init__(self, handle: asyncio.Handle) -> None:
        self.writes: list[tuple[int, Payload]] = []
        self.dones: list[WriteDone] = []
        self.bytes = 0
        self.handle = handle


class _WriteJoin:
    """One sent batch: calls every write's ``done`` once every member of its write set
    answered the batch (all OK), or after the failed members were dealt with."""

    __slots__ = ("_futures", "_left", "_writes", "bytes", "dones", "members", "ranges")

    def __init__(self, writes: BatchedWrites, members: Sequence[str],
                 futures: list[asyncio.Future[Response]], ranges: list[tuple[int, int]],
                 dones: list[WriteDone], nbytes: int) -> None:
        self._writes = writes
        self.members = members
        self._futures = futures
        self.ranges = ranges
        self.dones = dones
        self.bytes = nbytes
        left = 0
        for fut in futures:
            if not fut.done():  # a direct local write is done already
                left += 1
                fut.add_done_callback(self._answered)
        self._left = left
        if not left:
            self._finish()

    def _answered(self, _fut: asyncio.Future[Response]) -> None:
        self._left -= 1
        if not self._left:
            self._finish()

    def _finish(self) -> None:
        results: list[Response | BaseException] = []
        ok = True
        for fut in self._futures:
            if fut.cancelled():
                results.append(asyncio.CancelledError())
                ok = False
                continue
            exc = fut.exception()
            result = exc if exc is not None else fut.result()
            ok = ok and type(result) is Response and result.status is Status.OK
            results.append(result)
        if not ok:
            self._writes._join_failed(self, results)
            return
        self._writes._join_answered(self)

    def finish(self, error: BackendIOError | None) -> None:
        for done in self.dones:
            done(error)


class BatchedWrites:
    def __init__(self, backend: ReplicatedBackend, modes: ReplicaModes[RunningResync],
                 clients: dict[str, ReplicaClient], budget: ByteBudget,
                 open_gate: asyncio.Event, conclude: Conclude) -> None:
        self._backend = backend
        self._modes = modes
        self._clients = clients  # the target's: shared, never replaced
        self._budget = budget
        self._open_gate = open_gate  # write_path.WritePath's: closed while writes pause
        self._conclude = conclude
        self.in_flight = 0  # callback-path writes in flight (write_soon), batched or sent
        self._batch: _Batch | None = None
        self._loop = asyncio.get_running_loop()
        self._idle: list[asyncio.Future[None]] = []  # drained() waiting for in_flight == 0
        self._tasks: set[asyncio.Task[None]] = set()

    def write_soon(self, offset: int, data: Payload, fua: bool, done: WriteDone) -> bool:
        """Queue ``data`` for this tick's batch to the write set and call ``done(None)`` once
        every member acknowledged it, or ``done(error)``. False (nothing queued) when it
        cannot start at once: then use ``write`` (FUA writes always do: they are rare, and
        each needs its own sync)."""
        n = len(data)
        if (fua or n > BATCH_MAX_BYTES or not self._open_gate.is_set()
                or self._backend.fenced is not None):
            return False
        if self.in_flight >= MAX_CALLBACK_WRITES:  # the NBD side's task cap does not see these
            return False
        if not self._budget.try_acquire(n):
            return False
        try:
            self._backend.check_writable()
        except BackendIOError:
            self._budget.release(n)
            return False  # ``write`` raises it for this request
        batch = self._batch
        if batch is not None and batch.bytes + n > BATCH_MAX_BYTES:
            self._send_batch()
            batch = None
        if batch is None:
            batch = self._batch = _Batch(self._loop.call_soon(self._send_batch))
        batch.writes.append((offset, data))
        batch.dones.append(done)
        batch.bytes += n
        self.in_flight += 1
        if len(batch.writes) >= BATCH_MAX_WRITES:
            self._send_batch()
        return True

    def _send_batch(self) -> None:
        """Send the tick's batch to every member of the write set as of now."""
        batch, self._batch = self._batch, None
        if batch is None:
            return
        batch.handle.cancel()  # when sent early (full): the tick's call finds nothing
        ranges = [(offset, len(data)) for offset, data in batch.writes]
        # Marked when sent, not when queued: the write set may have changed in between.
        self._modes.mark_batch_written(ranges)
        members = self._modes.route.write_to
        futures: list[asyncio.Future[Response]] = []
        backend = self._backend
        try:
            wb = WriteBatch.build(batch.writes)
            volume_id, epoch = backend.volume_id, backend.epoch
            for member in members:
                client = self._clients.get(member)
                if client is None:  # being dropped right now: it fails like a dead one
                    fut: asyncio.Future[Response] = self._loop.create_future()
                    fut.set_exception(ReplicaUnavailableError(f"replica {member} dropped"))
                    futures.append(fut)
                else:
                    futures.append(client.write_batch(volume_id, epoch, wb))
        except Exception as exc:  # a bug (the NBD codec bounds offsets): fail, never hang
            # Some members may have it and others not: stop writing, let the next owner
            # converge the replicas.
            reason = backend.fenced = f"write batch not sent: {exc!r}"
            log.exception("%s %s: fenced", backend.ctx(), reason)
            self._join_finished(batch.bytes, len(batch.dones))
            error = BackendIOError(errno.EIO, reason)
            for done in batch.dones:
                done(error)
            return
        _WriteJoin(self, members, futures, ranges, batch.dones, batch.bytes)

    def _join_finished(self, nbytes: int, writes: int) -> None:
        self._budget.release(nbytes)
        self.in_flight -= writes
        if not self.in_flight:
            waiters, self._idle = self._idle, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def drained(self) -> None:
        """Every callback-path write issued so far has been answered (none start while the
        gate is closed)."""
        while self.in_flight:
            waiter = asyncio.get_running_loop().create_future()
            self._idle.append(waiter)
            await waiter

    def _join_answered(self, join: _WriteJoin) -> None:
        """Every member answered OK: acknowledge, unless we may not (fenced, or below
        minInSync meanwhile) or not yet (holding)."""
        self._join_finished(join.bytes, len(join.dones))
        error: BackendIOError | None = None
        try:
            self._backend.check_writable()
        except HeldError:
            self._finish_after_hold(join)
            return
        except BackendIOError as exc:
            error = exc
        join.finish(error)

    def _finish_after_hold(self, join: _WriteJoin) -> None:
        """Every member has the batch but our lease is unconfirmed: acknowledge once the
        claim is regained at our epoch (or fail it if the hold ends otherwise)."""
        async def later() -> None:
            error: BackendIOError | None = None
            try:
                await self._backend.until_writable()
            except BackendIOError as exc:
                error = exc
            join.finish(error)

        task = self._loop.create_task(later())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _join_failed(self, join: _WriteJoin, results: list[Response | BaseException]) -> None:
        async def conclude() -> None:
            error: BackendIOError | None = None
            try:
                await self._conclude(join.members, results, join.ranges)
            except BackendIOError as exc:
                error = exc
            except BaseException as exc:
                # Never leave the NBD requests unanswered, and never carry on after a
                # failure we could not account for: the ISR may not say who has what.
                backend = self._backend
                if backend.fenced is None:
                    backend.fenced = f"write failure handling crashed: {exc!r}"
                    log.exception("%s %s", backend.ctx(), backend.fenced)
                error = BackendIOError(errno.EIO, f"write failed: {exc!r}")
                if not isinstance(exc, Exception):
                    raise
            finally:
                self._join_finished(join.bytes, len(join.dones))
            join.finish(error)

        task = self._loop.create_task(conclude())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
