"""The volume target: the single writer's fan-out of block I/O to the in-sync replicas.

``ReplicatedBackend`` implements the NBD front end's ``BlockBackend``. Every write goes to
every replica in the write set (the ISR plus replicas being rebuilt; the callback-path
writes of one event-loop tick travel as one WRITE_BATCH frame per replica) and is
acknowledged only when all of them answered (I1). A replica that fails or times out is
removed from the ISR through the ``Authority`` (etcd CAS) *before* the write is
acknowledged, and what it missed is marked in its dirty bitmap (I3). A STALE_EPOCH answer or
a failed CAS means another owner took over: the target is fenced and fails every request
from then on (I2). Reads come from the first ISR replica (the local one when it is in sync).
Rebuild and convergence (``resync``) run here because only the single writer can order
copies against writes (I4, I5).

Must not: talk to etcd (the Authority does), parse NBD, or block the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from replication.ack_rule import plan_failure, write_refusal
from replication.authority import (
    Authority,
    AuthorityUnavailableError,
    FencedError,
    ResyncProgress,
)
from replication.backend import BackendIOError, Payload
from replication.bitmap import DirtyBitmap
from replication.checksum import crc32
from replication.errors import ReplicaUnavailableError
from replication.hold import DEFAULT_HOLD_S, HeldError, Hold
from replication.messages import Response, Status, WriteBatch
from replication.replica_client import ReplicaClient
from replication.resync import Resync

log = logging.getLogger(__name__)

MAX_INFLIGHT_BYTES = 64 << 20
# Callback-path writes in flight per volume: well under a replica connection's request cap
# (messages.DEFAULT_MAX_IN_FLIGHT), which resync traffic shares.
MAX_CALLBACK_WRITES = 1024
# A batch is sent at the end of the tick, or at once when it reaches either bound.
BATCH_MAX_WRITES = 16
BATCH_MAX_BYTES = 4 << 20
RETRY_CONVERGE_S = 5.0


@dataclass(frozen=True)
class ReplicaEndpoint:
    node_id: str
    host: str
    port: int


class NoInSyncReplicaError(BackendIOError):
    """No member of the recorded ISR could be fenced: serving would risk stale data."""

    def __init__(self, detail: str) -> None:
        super().__init__(errno.EIO, detail)


class _ByteBudget:
    """Caps bytes in flight per volume: writers wait (backpressure) instead of queueing."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._used = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def try_acquire(self, n: int) -> bool:
        """Synchronous fast path: no coroutine when the budget has room (the common case)."""
        n = min(n, self._limit)
        if self._waiters or self._used + n > self._limit:
            return False
        self._used += n
        return True

    async def acquire(self, n: int) -> None:
        n = min(n, self._limit)
        while self._used + n > self._limit:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter
        self._used += n

    def release(self, n: int) -> None:
        self._used -= min(n, self._limit)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)


WriteDone = Callable[[BackendIOError | None], None]
Ranges = Sequence[tuple[int, int]]  # (offset, length) of each write a request carries


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

    __slots__ = ("_backend", "_futures", "_left", "bytes", "dones", "members", "ranges")

    def __init__(self, backend: ReplicatedBackend, members: list[str],
                 futures: list[asyncio.Future[Response]], ranges: list[tuple[int, int]],
                 dones: list[WriteDone], nbytes: int) -> None:
        self._backend = backend
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
        backend = self._backend
        if not ok:
            backend._join_failed(self, results)
            return
        backend._join_finished(self.bytes, len(self.dones))
        error: BackendIOError | None = None
        try:
            backend._check_writable()
        except HeldError:
            backend._finish_after_hold(self)
            return
        except BackendIOError as exc:
            error = exc
        self.finish(error)

    def finish(self, error: BackendIOError | None) -> None:
        for done in self.dones:
            done(error)


class ReplicatedBackend:
    def __init__(
        self, volume_id: str, epoch: int, size: int, clients: dict[str, ReplicaClient],
        isr: Sequence[str], local_node: str | None, authority: Authority, state_dir: Path,
        out_of_sync: Sequence[str] = (), min_in_sync: int = 1,
        hold_s: float = DEFAULT_HOLD_S,
    ) -> None:
        if min_in_sync < 1:
            raise ValueError(f"min_in_sync must be >= 1, not {min_in_sync}")
        self.volume_id = volume_id
        # Writes are acknowledged only while at least this many ISR members have them
        # (StorageClass ``minInSync``; Ceph's min_size): below it they fail with EIO.
        self.min_in_sync = min_in_sync
        self.epoch = epoch
        self._size = size
        self._clients = clients
        self._local = local_node
        self._isr = sorted(isr, key=lambda n: n != local_node)
        self._authority = authority
        self._state_dir = state_dir
        # Regions each replica outside the ISR (or being converged) may lack.
        self._bitmaps = {n: self._load_bitmap(n) for n in out_of_sync}
        self._resyncs: dict[str, tuple[Resync, asyncio.Task[None]]] = {}
        self._dropping: dict[str, asyncio.Future[None]] = {}
        self._budget = _ByteBudget(MAX_INFLIGHT_BYTES)
        self._members: list[str] | None = None
        self._ops: set[asyncio.Future[list[Response | BaseException]]] = set()
        self._joins = 0  # callback-path writes in flight (write_soon), batched or sent
        self._batch: _Batch | None = None
        self._loop = asyncio.get_running_loop()
        self._idle: list[asyncio.Future[None]] = []  # quiesce() waiting for _joins == 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._open_gate = asyncio.Event()
        self._open_gate.set()
        self._pausers = 0  # writes_paused() contexts open now; the gate opens at zero
        self.fenced: str | None = None
        self.expected_replicas = len(self._isr)  # the record's replica count (target_main)
        self.out_of_space: str | None = None  # the last replica that answered ENOSPC
        self.hold = Hold(authority, hold_s, self._fenced_while_held, self._ctx())

    @property
    def size(self) -> int:
        return self._size

    @property
    def isr(self) -> tuple[str, ...]:
        return tuple(self._isr)

    def _ctx(self) -> str:
        return f"volume={self.volume_id} epoch={self.epoch}"

    # -- the write path -------------------------------------------------------------------

    def _check_serving(self) -> None:
        """Raise unless we may acknowledge now: BackendIOError when fenced for good,
        HeldError while our lease is unconfirmed (wait on ``self.hold``, then re-check)."""
        if self.fenced is not None:
            raise BackendIOError(errno.EIO, f"fenced: {self.fenced}")
        if not self.hold.active and self._authority.may_acknowledge():
            return
        self.hold.begin()  # self-fenced: nothing is acknowledged until the claim is regained
        self.hold.check()

    def condition(self) -> tuple[bool, str]:
        """(abnormal, message) for CSI's VolumeCondition: what an operator must know."""
        if self.fenced is not None:
            return True, f"fenced, I/O fails: {self.fenced}"
        if self.hold.active:
            state = "failing" if self.hold.expired else "holding"
            return True, f"ownership lease unconfirmed (etcd unreachable?): {state} I/O"
        if len(self._isr) < self.min_in_sync:
            return True, (f"writes fail: {len(self._isr)} in-sync replicas {self._isr}, "
                          f"minInSync {self.min_in_sync}")
        notes = []
        if len(self._isr) < self.expected_replicas:
            notes.append(f"degraded: {len(self._isr)} of {self.expected_replicas} replicas "
                         f"in sync {self._isr}")
        if self.out_of_space is not None:
            notes.append(f"replica {self.out_of_space} ran out of space")
        return (True, "; ".join(notes)) if notes else (False, "healthy")

    def _fenced_while_held(self, reason: str) -> None:
        if self.fenced is None:
            self.fenced = reason
            log.error("%s fenced: %s", self._ctx(), reason)

    async def _until_writable(self) -> None:
        """``_check_writable``, waiting out a hold (bounded by the hold's timeout)."""
        for _ in range(3):  # a hold ends regained, fenced or expired: then check raises
            try:
                self._check_writable()
                return
            except HeldError:
                await self.hold.wait()
        self._check_writable()

    def _check_writable(self) -> None:
        """The acknowledgement rule (I1, I1a), checked before a write starts and again
        before it is acknowledged: serving, and at least ``min_in_sync`` ISR members (so
        never an empty ISR). Every ISR member answered OK is the caller's half."""
        self._check_serving()
        refusal = write_refusal(self._isr, self.min_in_sync)
        if refusal is not None:
            raise BackendIOError(errno.EIO, refusal)

    def _write_set(self) -> list[str]:
        # Cached: it only changes with the ISR or a resync, and is read on every write.
        # Remote replicas first: their frames are on the wire while the local one is written.
        if self._members is None:
            members = self._isr + [n for n in self._resyncs if n not in self._isr]
            self._members = sorted(members, key=lambda n: n == self._local)
        return self._members

    def _membership_changed(self) -> None:
        self._members = None

    async def _fan_out(
        self, send: Callable[[ReplicaClient], asyncio.Future[Response]], offset: int,
        length: int,
    ) -> None:
        if not self._open_gate.is_set():
            await self._open_gate.wait()
        await self._until_writable()
        members = self._write_set()
        futures = [send(self._clients[n]) for n in members]
        for bitmap in self._bitmaps.values():
            bitmap.mark(offset, length)
        gathered = asyncio.gather(*futures, return_exceptions=True)
        self._ops.add(gathered)
        try:
            results = await gathered
        finally:
            self._ops.discard(gathered)
        await self._conclude(members, results, [(offset, length)])

    async def _conclude(self, members: Sequence[str], results: Sequence[Response | BaseException],
                        ranges: Ranges) -> None:
        """Act on one request's answers: drop the replicas that failed (ISR by CAS) or fence
        ourselves; raises BackendIOError if the request must not be acknowledged."""
        failed: list[str] = []
        for node, result in zip(members, results, strict=True):
            if isinstance(result, Response):
                if result.status is Status.OK:
                    continue
                if result.status is Status.ENOSPC:
                    self.out_of_space = node
                if result.status is Status.STALE_EPOCH:
                    self._fence(f"replica {node} is fenced at epoch {result.epoch}")
            failed.append(node)
        if failed:
            await self._drop(failed, ranges)
        await self._until_writable()

    async def write(self, offset: int, data: Payload, fua: bool) -> None:
        n = len(data)
        if not self._budget.try_acquire(n):
            await self._budget.acquire(n)
        try:
            crc = crc32(data)
            await self._fan_out(
                lambda c: c.write(self.volume_id, self.epoch, offset, data, fua=fua,
                                  payload_crc=crc),
                offset, n,
            )
        finally:
            self._budget.release(n)

    def write_soon(self, offset: int, data: Payload, fua: bool, done: WriteDone) -> bool:
        """The callback write path (no task, no gather): queue ``data`` for this tick's
        batch to the write set and call ``done(None)`` once every member acknowledged it,
        or ``done(error)``. False (nothing queued) when it cannot start at once: then use
        ``write`` (FUA writes always do: they are rare, and each needs its own sync)."""
        n = len(data)
        if fua or n > BATCH_MAX_BYTES or not self._open_gate.is_set() or self.fenced is not None:
            return False
        if self._joins >= MAX_CALLBACK_WRITES:  # the NBD side's task cap does not see these
            return False
        if not self._budget.try_acquire(n):
            return False
        try:
            self._check_writable()
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
        self._joins += 1
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
        for bitmap in self._bitmaps.values():
            for offset, length in ranges:
                bitmap.mark(offset, length)
        members = self._write_set()
        futures: list[asyncio.Future[Response]] = []
        try:
            wb = WriteBatch.build(batch.writes)
            volume_id, epoch = self.volume_id, self.epoch
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
            self.fenced = f"write batch not sent: {exc!r}"
            log.exception("%s %s: fenced", self._ctx(), self.fenced)
            self._join_finished(batch.bytes, len(batch.dones))
            error = BackendIOError(errno.EIO, self.fenced)
            for done in batch.dones:
                done(error)
            return
        _WriteJoin(self, members, futures, ranges, batch.dones, batch.bytes)

    def _join_finished(self, nbytes: int, writes: int) -> None:
        self._budget.release(nbytes)
        self._joins -= writes
        if not self._joins:
            waiters, self._idle = self._idle, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def _finish_after_hold(self, join: _WriteJoin) -> None:
        """Every member has the batch but our lease is unconfirmed: acknowledge once the
        claim is regained at our epoch (or fail it if the hold ends otherwise)."""
        async def later() -> None:
            error: BackendIOError | None = None
            try:
                await self._until_writable()
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
                if self.fenced is None:
                    self.fenced = f"write failure handling crashed: {exc!r}"
                    log.exception("%s %s", self._ctx(), self.fenced)
                error = BackendIOError(errno.EIO, f"write failed: {exc!r}")
                if not isinstance(exc, Exception):
                    raise
            finally:
                self._join_finished(join.bytes, len(join.dones))
            join.finish(error)

        task = self._loop.create_task(conclude())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def trim(self, offset: int, length: int) -> None:
        await self._fan_out(lambda c: c.trim(self.volume_id, self.epoch, offset, length),
                            offset, length)

    async def write_zeroes(self, offset: int, length: int, no_hole: bool) -> None:
        await self._fan_out(
            lambda c: c.write_zeroes(self.volume_id, self.epoch, offset, length,
                                     no_hole=no_hole),
            offset, length,
        )

    async def flush(self) -> None:
        await self._fan_out(lambda c: c.flush(self.volume_id, self.epoch), 0, 0)
        self.save_bitmaps()

    async def read(self, offset: int, length: int) -> bytes:
        try:
            self._check_serving()
        except HeldError:
            await self.hold.wait()
            self._check_serving()
        return await self.read_source(offset, length)

    def read_now(self, offset: int, length: int) -> bytes | None:
        """SyncFastPath: a read the local in-sync replica answers from its descriptor."""
        if not self._open_gate.is_set() or self.fenced is not None or not self._isr:
            return None
        client = self._clients.get(self._isr[0])
        if client is None or self.hold.active:
            return None
        try:
            self._check_serving()
        except HeldError:
            return None  # the async read waits for the hold to end
        return client.read_now(offset, length)

    def write_now(self, offset: int, data: Payload) -> bool:
        return False  # never synchronous: remote replicas answer later (see write_soon)

    async def read_source(self, offset: int, length: int) -> bytes:
        """Read from the first ISR replica; a failing one is dropped and the next tried."""
        while self._isr:
            node = self._isr[0]
            try:
                response = await self._clients[node].read(
                    self.volume_id, self.epoch, offset, length
                )
            except ReplicaUnavailableError:
                await self._drop([node], ())
                continue
            if response.status is Status.OK:
                return bytes(response.payload)
            if response.status is Status.STALE_EPOCH:
                self._fence(f"replica {node} is fenced at epoch {response.epoch}")
            await self._drop([node], ())
        raise BackendIOError(errno.EIO, "no in-sync replica could serve the read")

    def source_client(self) -> ReplicaClient:
        if not self._isr:
            raise ReplicaUnavailableError("no in-sync replica left")
        return self._clients[self._isr[0]]

    async def quiesce(self) -> None:
        """Wait until every write issued so far has been answered by every replica."""
        if self._ops:
            await asyncio.gather(*list(self._ops), return_exceptions=True)
        while self._joins:  # callback-path writes (none start while the gate is closed)
            waiter = asyncio.get_running_loop().create_future()
            self._idle.append(waiter)
            await waiter

    @contextlib.asynccontextmanager
    async def writes_paused(self) -> AsyncIterator[None]:
        """Hold new writes (they wait, they do not fail) and drain the ones in flight.

        Counted: two rebuilds may be in their final rounds at once, and the first to finish
        must not reopen the gate under the second (a write racing the second's last copy
        would be overwritten on its replica by older data, and that replica would join the
        ISR without an acknowledged write: found by the fault benchmark, two replicas
        rebuilt together after every pool had been full)."""
        self._pausers += 1
        self._open_gate.clear()
        try:
            await self.quiesce()
            yield
        finally:
            self._pausers -= 1
            if not self._pausers:
                self._open_gate.set()

    # -- ISR changes ----------------------------------------------------------------------

    def _fence(self, reason: str) -> None:
        if self.fenced is None:
            self.fenced = reason
            log.error("%s fenced: %s", self._ctx(), reason)
        raise BackendIOError(errno.EIO, f"fenced: {reason}")

    async def _drop(self, nodes: Sequence[str], ranges: Ranges) -> None:
        """Take failed replicas out of the write set (ISR members by CAS, once each).

        The last ISR member is never removed (I1a): when every member failed, the target
        fences itself and the ISR stays as it is, so those members remain the source of
        truth. Any error while doing this, other than etcd being unreachable (the write
        then waits or fails, and a later one retries), fences the target too.
        """
        try:
            await self._drop_members(nodes, ranges)
        except BackendIOError:
            raise
        except BaseException as exc:
            if self.fenced is None:
                self.fenced = f"replica removal failed: {exc!r}"
                log.error("%s fenced: %s", self._ctx(), self.fenced)
            raise
        if not self._isr:
            self._fence("no in-sync replica left")

    async def _drop_members(self, nodes: Sequence[str], ranges: Ranges) -> None:
        pending = []
        for node in nodes:
            # Marked before the ISR change is confirmed: the regions are recorded as missed
            # whether or not these writes reached the replica.
            bitmap = self._bitmaps.setdefault(node, DirtyBitmap(self._size))
            for offset, length in ranges:
                bitmap.mark(offset, length)
        plan = plan_failure(self._isr, nodes, self._dropping)
        if plan.fence is not None:
            # None may be removed: one of them has to stay the source of truth; nothing is
            # acknowledged from now on.
            self._fence(plan.fence)
        for node in nodes:
            self._abort_resync(node)
            if node not in self._isr:
                self._disconnect(node)
                continue
            future = self._dropping.get(node)
            if future is None:
                future = asyncio.ensure_future(self._remove(node))
                self._dropping[node] = future
            pending.append(future)
        await asyncio.gather(*pending)

    async def _remove(self, node: str) -> None:
        try:
            new_isr = await self._authority.remove_from_isr(frozenset({node}), "replica failed")
        except FencedError as exc:
            self._dropping.pop(node, None)
            self._fence(str(exc))
        except AuthorityUnavailableError as exc:
            self._dropping.pop(node, None)  # retried by the next failing request
            raise BackendIOError(errno.EIO, f"cannot shrink the ISR: {exc}") from exc
        self._isr = [n for n in self._isr if n != node and n in new_isr]
        self._membership_changed()
        self._dropping.pop(node, None)
        self._disconnect(node)
        self.save_bitmaps()
        log.warning("%s replica=%s removed from ISR; isr=%s", self._ctx(), node, self._isr)

    def _disconnect(self, node: str) -> None:
        client = self._clients.pop(node, None)
        if client is not None:
            client.close()

    # -- rebuild and convergence ----------------------------------------------------------

    def out_of_sync(self) -> list[str]:
        """Replicas known to lag that are not being resynced now."""
        return [n for n in self._bitmaps if n not in self._isr and n not in self._resyncs]

    def is_member(self, node: str) -> bool:
        """In the ISR or being brought into it."""
        return node in self._isr or node in self._resyncs

    def start_resync(self, node: str, client: ReplicaClient | None, join: bool) -> None:
        """Put ``node`` in the write set and copy what it lacks in the background."""
        if node in self._resyncs or self.fenced is not None:
            return
        if client is not None:
            old = self._clients.get(node)
            if old is not None and old is not client:
                old.close()
            self._clients[node] = client
        elif node not in self._clients:
            return  # dropped since this retry was scheduled: the rejoiner brings it back
        known = self._bitmaps.get(node) if join else None
        if known is not None and known.dirty_regions == known.regions:
            known = None  # "everything": comparing checksums copies less
        resync = Resync(self, node, self._clients[node], known, join)
        self._bitmaps[node] = resync.bitmap
        task = asyncio.get_running_loop().create_task(self._run_resync(resync))
        self._resyncs[node] = (resync, task)
        self._membership_changed()

    def converge(self) -> None:
        for node in self._isr[1:]:
            self.start_resync(node, None, join=False)

    async def _run_resync(self, resync: Resync) -> None:
        node = resync.node
        try:
            await resync.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the replica stays out of sync; retried later
            log.warning("%s replica=%s %s failed: %s", self._ctx(), node, resync.kind, exc)
            self._resyncs.pop(node, None)
            self._membership_changed()
            if node not in self._isr:
                self._disconnect(node)
            elif node in self._clients:  # an ISR member still to converge: try again soon
                asyncio.get_running_loop().call_later(
                    RETRY_CONVERGE_S, self.start_resync, node, None, False
                )
            await self.report_progress(node, None)
            return
        self._resyncs.pop(node, None)
        self._membership_changed()
        self._bitmaps.pop(node, None)
        self._bitmap_path(node).unlink(missing_ok=True)
        # Left published: operators see what the last rebuild copied ("rebuilt", "converged").
        finished = {"rebuild": "rebuilt", "converge": "converged"}[resync.kind]
        await self.report_progress(node, replace(resync.progress(), kind=finished))

    def _abort_resync(self, node: str) -> None:
        entry = self._resyncs.pop(node, None)
        self._membership_changed()
        if entry is not None:
            entry[1].cancel()

    async def join(self, node: str) -> None:
        new_isr = await self._authority.add_to_isr(node)
        isr = [n for n in self._isr if n in new_isr] + [node]
        self._isr = sorted(isr, key=lambda n: n != self._local)
        self._membership_changed()
        log.info("%s replica=%s joined the ISR; isr=%s", self._ctx(), node, self._isr)

    async def report_progress(self, node: str, progress: ResyncProgress | None) -> None:
        await self._authority.report_progress(node, progress)

    def resync_progress(self) -> dict[str, ResyncProgress]:
        return {n: r.progress() for n, (r, _) in self._resyncs.items()}

    # -- bitmaps and shutdown -------------------------------------------------------------

    def _bitmap_path(self, node: str) -> Path:
        return self._state_dir / f"{self.volume_id}.{node}.bitmap"

    def _load_bitmap(self, node: str) -> DirtyBitmap:
        path = self._bitmap_path(node)
        try:
            bitmap = DirtyBitmap.load(path)
            if bitmap.size == self._size:
                return bitmap
        except (OSError, ValueError):
            pass
        # No usable record of what it missed: everything may differ.
        bitmap = DirtyBitmap(self._size)
        bitmap.mark_all()
        return bitmap

    def bitmap(self, node: str) -> DirtyBitmap | None:
        return self._bitmaps.get(node)

    def save_bitmaps(self) -> None:
        """Persist what each replica outside the ISR missed. A bitmap that cannot be
        written (say ENOSPC on the state dir) is removed instead: no file means "rebuild
        everything", always safe, while a stale file would under-report what it missed."""
        try:
            self._state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.warning("%s bitmaps not saved: %s", self._ctx(), exc)
        for node, bitmap in self._bitmaps.items():
            if node in self._isr:
                continue
            path = self._bitmap_path(node)
            try:
                bitmap.save(path)
            except OSError as exc:
                log.warning("%s replica=%s bitmap not saved (%s): it will be rebuilt in full",
                            self._ctx(), node, exc)
                path.unlink(missing_ok=True)  # no space needed; if this fails, _drop fences

    async def settle(self) -> None:
        """Declare every ISR replica clean (call quiesced, after a flush): the next owner
        can then skip convergence."""
        futures = [self._clients[n].settle(self.volume_id, self.epoch, 0) for n in self._isr]
        await asyncio.gather(*futures, return_exceptions=True)

    def close(self) -> None:
        self.hold.close()
        for task in self._tasks:
            task.cancel()
        for _, task in self._resyncs.values():
            task.cancel()
        self._resyncs.clear()
        self.save_bitmaps()
        for client in self._clients.values():
            client.close()
        self._clients.clear()
