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

Here is what every part consults: whether the target may acknowledge at all (fenced, lease
held, minInSync), plus reads and the target's lifetime. The parts: ``replica_modes`` (which
replica gets writes, counts, serves reads), ``write_path`` and ``write_batches`` (the
per-request and the callback write paths), ``isr_changes``, ``resync_runner``,
``bitmap_store``, ``byte_budget``.

Must not: talk to etcd (the Authority does), parse NBD, or block the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from replication.ack_rule import write_refusal
from replication.authority import Authority, ResyncProgress
from replication.backend import BackendIOError, Payload
from replication.bitmap import DirtyBitmap
from replication.bitmap_store import BitmapStore
from replication.byte_budget import ByteBudget
from replication.errors import ReplicaUnavailableError
from replication.hold import DEFAULT_HOLD_S, HeldError, Hold
from replication.isr_changes import IsrChanges
from replication.messages import Status
from replication.replica_client import ReplicaClient
from replication.replica_modes import ReplicaModes
from replication.resync_runner import ResyncRunner, RunningResync
from replication.write_batches import WriteDone
from replication.write_path import WritePath

log = logging.getLogger(__name__)

MAX_INFLIGHT_BYTES = 64 << 20


@dataclass(frozen=True)
class ReplicaEndpoint:
    node_id: str
    host: str
    port: int


class NoInSyncReplicaError(BackendIOError):
    """No member of the recorded ISR could be fenced: serving would risk stale data."""

    def __init__(self, detail: str) -> None:
        super().__init__(errno.EIO, detail)


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
        self._authority = authority
        self._bitmap_store = BitmapStore(state_dir, volume_id, size, self.ctx())
        self._modes: ReplicaModes[RunningResync] = ReplicaModes(
            size, isr, local_node, {n: self._bitmap_store.load(n) for n in out_of_sync}
        )
        self._resync_runner = ResyncRunner(self, self._modes, clients, self._bitmap_store)
        self._isr_changes = IsrChanges(self, self._modes, authority, self._resync_runner)
        self._budget = ByteBudget(MAX_INFLIGHT_BYTES)
        self._writes = WritePath(self, self._modes, clients, self._budget, self._isr_changes)
        self._batches = self._writes.batches
        self.fenced: str | None = None
        self.expected_replicas = len(self._modes.isr)  # the record's replica count (target_main)
        self.out_of_space: str | None = None  # the last replica that answered ENOSPC
        self.hold = Hold(authority, hold_s, self._fenced_while_held, self.ctx())

    @property
    def size(self) -> int:
        return self._size

    @property
    def isr(self) -> tuple[str, ...]:
        return self._modes.isr

    def ctx(self) -> str:
        return f"volume={self.volume_id} epoch={self.epoch}"

    # -- may we acknowledge? --------------------------------------------------------------

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
        isr = list(self._modes.isr)
        if len(isr) < self.min_in_sync:
            return True, (f"writes fail: {len(isr)} in-sync replicas {isr}, "
                          f"minInSync {self.min_in_sync}")
        notes = []
        if len(isr) < self.expected_replicas:
            notes.append(f"degraded: {len(isr)} of {self.expected_replicas} replicas "
                         f"in sync {isr}")
        if self.out_of_space is not None:
            notes.append(f"replica {self.out_of_space} ran out of space")
        return (True, "; ".join(notes)) if notes else (False, "healthy")

    def _fenced_while_held(self, reason: str) -> None:
        if self.fenced is None:
            self.fenced = reason
            log.error("%s fenced: %s", self.ctx(), reason)

    async def until_writable(self) -> None:
        """``check_writable``, waiting out a hold (bounded by the hold's timeout)."""
        for _ in range(3):  # a hold ends regained, fenced or expired: then check raises
            try:
                self.check_writable()
                return
            except HeldError:
                await self.hold.wait()
        self.check_writable()

    def check_writable(self) -> None:
        """The acknowledgement rule (I1, I1a), checked before a write starts and again
        before it is acknowledged: serving, and at least ``min_in_sync`` ISR members (so
        never an empty ISR). Every ISR member answered OK is the caller's half."""
        self._check_serving()
        refusal = write_refusal(self._modes.isr, self.min_in_sync)
        if refusal is not None:
            raise BackendIOError(errno.EIO, refusal)

    def fence(self, reason: str) -> NoReturn:
        if self.fenced is None:
            self.fenced = reason
            log.error("%s fenced: %s", self.ctx(), reason)
        raise BackendIOError(errno.EIO, f"fenced: {reason}")

    # -- writes: write_path.py, write_batches.py ------------------------------------------

    async def write(self, offset: int, data: Payload, fua: bool) -> None:
        await self._writes.write(offset, data, fua)

    def write_soon(self, offset: int, data: Payload, fua: bool, done: WriteDone) -> bool:
        """The callback write path (no task, no gather): see ``BatchedWrites.write_soon``."""
        return self._batches.write_soon(offset, data, fua, done)

    def write_now(self, offset: int, data: Payload) -> bool:
        return False  # never synchronous: remote replicas answer later (see write_soon)

    async def trim(self, offset: int, length: int) -> None:
        await self._writes.trim(offset, length)

    async def write_zeroes(self, offset: int, length: int, no_hole: bool) -> None:
        await self._writes.write_zeroes(offset, length, no_hole)

    async def flush(self) -> None:
        await self._writes.flush()

    async def quiesce(self) -> None:
        """Wait until every write issued so far has been answered by every replica."""
        await self._writes.quiesce()

    def writes_paused(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold new writes (they wait, they do not fail) and drain the ones in flight;
        counted, so nested pauses hold until the last ends (``WritePath.paused``)."""
        return self._writes.paused()

    # -- reads ----------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        try:
            self._check_serving()
        except HeldError:
            await self.hold.wait()
            self._check_serving()
        return await self.read_source(offset, length)

    def read_now(self, offset: int, length: int) -> bytes | None:
        """SyncFastPath: a read the local in-sync replica answers from its descriptor."""
        if not self._writes.open_gate.is_set() or self.fenced is not None:
            return None
        source = self._modes.read_source()
        if source is None:
            return None
        client = self._clients.get(source)
        if client is None or self.hold.active:
            return None
        try:
            self._check_serving()
        except HeldError:
            return None  # the async read waits for the hold to end
        return client.read_now(offset, length)

    async def read_source(self, offset: int, length: int) -> bytes:
        """Read from the first ISR replica; a failing one is dropped and the next tried."""
        while (node := self._modes.read_source()) is not None:
            try:
                response = await self._clients[node].read(
                    self.volume_id, self.epoch, offset, length
                )
            except ReplicaUnavailableError:
                await self._isr_changes.drop([node], ())
                continue
            if response.status is Status.OK:
                return bytes(response.payload)
            if response.status is Status.STALE_EPOCH:
                self.fence(f"replica {node} is fenced at epoch {response.epoch}")
            await self._isr_changes.drop([node], ())
        raise BackendIOError(errno.EIO, "no in-sync replica could serve the read")

    def source_client(self) -> ReplicaClient:
        source = self._modes.read_source()
        if source is None:
            raise ReplicaUnavailableError("no in-sync replica left")
        return self._clients[source]

    # -- replicas joining and leaving: resync_runner.py, isr_changes.py -------------------

    def out_of_sync(self) -> list[str]:
        """Replicas known to lag that are not being resynced now."""
        return self._modes.out_of_sync()

    def is_member(self, node: str) -> bool:
        """In the ISR or being brought into it."""
        return self._modes.is_member(node)

    def start_resync(self, node: str, client: ReplicaClient | None, join: bool) -> None:
        """Put ``node`` in the write set and copy what it lacks in the background."""
        self._resync_runner.start(node, client, join)

    def converge(self) -> None:
        self._resync_runner.converge()

    async def join(self, node: str) -> None:
        await self._isr_changes.join(node)

    async def report_progress(self, node: str, progress: ResyncProgress | None) -> None:
        await self._authority.report_progress(node, progress)

    def resync_progress(self) -> dict[str, ResyncProgress]:
        return self._resync_runner.progress()

    def disconnect(self, node: str) -> None:
        client = self._clients.pop(node, None)
        if client is not None:
            client.close()

    def bitmap(self, node: str) -> DirtyBitmap | None:
        return self._modes.bitmap(node)

    def save_bitmaps(self) -> None:
        """Persist what each replica outside the ISR missed. A bitmap that cannot be
        written (say ENOSPC on the state dir) is removed instead: no file means "rebuild
        everything", always safe, while a stale file would under-report what it missed."""
        self._bitmap_store.save(self._modes.bitmaps_outside_isr())

    # -- shutdown -------------------------------------------------------------------------

    async def settle(self) -> None:
        """Declare every ISR replica clean (call quiesced, after a flush): the next owner
        can then skip convergence."""
        futures = [self._clients[n].settle(self.volume_id, self.epoch, 0)
                   for n in self._modes.isr]
        await asyncio.gather(*futures, return_exceptions=True)

    def close(self) -> None:
        self.hold.close()
        self._writes.close()
        self._resync_runner.close()
        self.save_bitmaps()
        for client in self._clients.values():
            client.close()
        self._clients.clear()

    # -- the view from inside: csi_driver/node/target_dump.py logs these on SIGUSR1 -------------

    @property
    def _open_gate(self) -> asyncio.Event:
        return self._writes.open_gate

    @property
    def _joins(self) -> int:
        return self._batches.in_flight

    @property
    def _resyncs(self) -> list[str]:
        return [node for node, _ in self._modes.resyncs()]

    @property
    def _dropping(self) -> list[str]:
        return list(self._isr_changes.dropping)
