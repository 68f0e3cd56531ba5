"""What a replica does with each request: the epoch rules and the I/O on a pool's replicas.

Owns: the per-replica cache (an O_RDWR descriptor and the live ``MetaState``), the fence
rules, bounds, the mapping of I/O errors to statuses, and which ops run inline on the event
loop and which in a worker thread. Must not: touch sockets or the wire format (the replica
server does), decide ownership or ISR membership, reorder the content-changing requests it
is given, block the event loop on more than page-cache I/O and rare tiny metadata fsyncs,
or import csi_driver, grpc or etcd.

Pool calls never run on the event loop: an LVM lookup runs ``lvs`` (~65 ms), and the node's
CSI service, agent and lease renewal share this loop. Opening a replica, re-reading its size
and TRIMs through the pool are ``Deferred`` with a barrier; housekeeping looks replicas up in
a worker thread.

Ordering: the server hands requests over in arrival order. Page-cache I/O (pwrite, pread,
ranges up to ``INLINE_MAX``) runs inline, which keeps that order for free; a bigger range op
returns a ``Deferred`` with ``barrier=True``: the caller holds that connection's later
requests back until it completes, so two replicas fed the same stream end up identical.
Syncs (FLUSH, FUA) are ``Deferred`` without a barrier: they change no content, and every
write received before them has already been applied.

Epochs: FENCE(E) raises the durable fence to E (E below it: STALE_EPOCH), then ends any
process still writing the replica directly below E (``local_writers``) before it answers.
WRITE, WRITE_BATCH, TRIM, WRITE_ZEROES, FLUSH and SETTLE need epoch == fence > 0; READ, STAT and
CHECKSUM also accept epoch 0 (an observer, e.g. a verify tool). Below the fence:
STALE_EPOCH; above it: INVALID ("not fenced yet": the owner must FENCE first). Every reply
carries the fenced epoch.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from replication.errors import ReplicaNotFoundError, ReplicationError
from replication.local_writers import LocalWriters, WriterStillAlive
from replication.messages import Buffer, Flag, Op, Request, Status
from replication.payloads import ChecksumSpec, StatInfo, write_batch_entries
from replication.pool.base import Pool, ReplicaInfo
from replication.replica_io import pread_exact, pwrite_all, range_digests, write_zeros
from replication.replica_meta import MetaState, MetaStore

log = logging.getLogger(__name__)

INLINE_MAX = 1 << 20  # range ops up to this run inline; bigger ones in a thread + barrier
INLINE_CHECKSUM_MAX = 256 << 10  # hashing costs ~1.5 ms/MiB: keep loop stalls well under 1 ms
_OBSERVER_OPS = frozenset({Op.READ, Op.STAT, Op.CHECKSUM})
_RANGE_OPS = frozenset({Op.WRITE, Op.READ, Op.TRIM, Op.WRITE_ZEROES, Op.CHECKSUM})
_HANDSHAKE_OPS = frozenset({Op.HELLO, Op.AUTH})  # the codec and the server answer these
_FUA = int(Flag.FUA)
_NO_HOLE = int(Flag.NO_HOLE)
_flag_bits = int.__and__  # C speed: IntFlag's own & runs Python code, ~1.5 us per write
_ThreadFn = Callable[..., Buffer | None]

Result = tuple[Status, int, Buffer]  # status, fenced epoch, payload (or error message)


class Deferred(NamedTuple):
    """An op finishing off the event loop; ``barrier`` holds later requests back."""

    work: Coroutine[Any, Any, Result]
    barrier: bool


@dataclass(slots=True)
class _Replica:
    volume_id: str
    fd: int  # O_RDWR, cached for the replica's life here (forget() closes it)
    ino: int  # to notice the pool deleting or replacing the replica under us
    size: int
    meta: MetaState


def _fail(status: Status, epoch: int, message: str) -> Result:
    return status, epoch, message.encode("utf-8", "replace")[:1024]


class ReplicaEngine:
    """Applies requests to every replica of ``pool``; all its state lives on one event loop."""

    def __init__(
        self, pool: Pool, meta_dir: str | os.PathLike[str], node_id: str,
        local_writers: LocalWriters | None = None,
    ) -> None:
        self.node_id = node_id
        self._pool = pool
        self._writers = local_writers
        self._store = MetaStore(meta_dir)
        self._replicas: dict[str, _Replica] = {}
        self._size_fresh = False  # set for one synchronous run after a size lookup

    def close(self) -> None:
        """Save every replica's metadata and close every descriptor."""
        for volume_id in list(self._replicas):
            self.forget(volume_id)

    def forget(self, volume_id: str, *, delete_meta: bool = False) -> None:
        """Drop a replica's cached descriptor and metadata (saved first): call before the
        pool deletes or replaces the replica. ``delete_meta`` also forgets its fence."""
        rep = self._replicas.get(volume_id)
        if rep is not None:
            self._drop(rep)
        if delete_meta:
            self._store.delete(volume_id)

    def _drop(self, rep: _Replica) -> None:
        if self._replicas.get(rep.volume_id) is not rep:
            return  # already dropped, maybe reopened since: that newer state is not ours
        del self._replicas[rep.volume_id]
        try:
            rep.meta.persist_if_changed()
        except (OSError, ReplicationError) as exc:
            log.error("replica %s: cannot save metadata: %s", rep.volume_id, exc)
        os.close(rep.fd)  # threads work on dup()ed descriptors: this one is ours alone

    async def housekeeping(self) -> None:
        """Call about once a second: lazy metadata saves, replicas deleted under us."""
        reps = list(self._replicas.values())
        for rep in reps:
            try:
                rep.meta.persist_if_changed()
            except (OSError, ReplicationError) as exc:
                log.error("replica %s: housekeeping failed: %s", rep.volume_id, exc)
        inos = await asyncio.to_thread(self._current_inos, [r.volume_id for r in reps])
        for rep in reps:
            ino = inos.get(rep.volume_id, rep.ino)  # a failed lookup says nothing
            if ino != rep.ino:
                log.info("replica %s was deleted or replaced: reopening", rep.volume_id)
                self._drop(rep)

    def _current_inos(self, volume_ids: list[str]) -> dict[str, int | None]:
        """In a worker thread: each replica's inode now (None: gone)."""
        out: dict[str, int | None] = {}
        for volume_id in volume_ids:
            try:
                info = self._pool.get(volume_id)
                out[volume_id] = os.stat(info.path).st_ino if info is not None else None
            except FileNotFoundError:
                out[volume_id] = None
            except (OSError, ReplicationError) as exc:
                log.error("replica %s: housekeeping lookup failed: %s", volume_id, exc)
        return out

    def _lookup(self, volume_id: str) -> ReplicaInfo | None:
        """In a worker thread: the pool's view of a replica."""
        try:
            return self._pool.get(volume_id)
        except ValueError:  # a wire-valid id the pool rejects (e.g. leading "."): no replica
            return None

    def _open(self, volume_id: str, info: ReplicaInfo) -> _Replica:
        rep = self._replicas.get(volume_id)
        if rep is not None:
            return rep  # opened by another request while we looked it up
        meta = MetaState(self._store, volume_id)  # before the open: a bad file leaks no fd
        fd = os.open(info.path, os.O_RDWR | os.O_CLOEXEC)  # LVM paths are symlinks: follow
        rep = _Replica(volume_id, fd, os.fstat(fd).st_ino, info.size_bytes, meta)
        self._replicas[volume_id] = rep
        return rep

    def execute(self, req: Request) -> Result | Deferred:
        """Apply one request; never raises (every failure becomes a status)."""
        rep = self._replicas.get(req.volume_id)
        if rep is None:  # looked up off the loop; later requests wait behind the barrier
            return Deferred(self._open_then_run(_detached(req)), barrier=True)
        return self._run(rep, req)

    def _run(self, rep: _Replica, req: Request) -> Result | Deferred:
        try:
            refused = self._check(rep, req)
            if refused is not None:
                return refused
            return _HANDLERS[req.op](self, rep, req)
        except _SizeUnknown:  # it may have grown: re-read off the loop, then run again
            return Deferred(self._resize_then_run(rep, _detached(req)), barrier=True)
        except Exception as exc:
            return self._error(rep, req, exc)

    async def _open_then_run(self, req: Request) -> Result:
        try:
            info = await asyncio.to_thread(self._lookup, req.volume_id)
            if info is None:
                return _fail(Status.NOT_FOUND, 0, f"no replica {req.volume_id} on {self.node_id}")
            rep = self._open(req.volume_id, info)
        except Exception as exc:
            return self._error(None, req, exc)
        return await _settled(self._run(rep, req))

    async def _resize_then_run(self, rep: _Replica, req: Request) -> Result:
        try:
            info = await asyncio.to_thread(self._pool.get, rep.volume_id)
        except Exception as exc:
            return self._error(rep, req, exc)
        rep.size = info.size_bytes if info is not None else rep.size
        self._size_fresh = True  # this one run may trust rep.size: no second lookup
        try:
            res = self._run(rep, req)
        finally:
            self._size_fresh = False
        return await _settled(res)

    def _error(self, rep: _Replica | None, req: Request, exc: Exception) -> Result:
        epoch = rep.meta.fenced_epoch if rep is not None else 0
        if isinstance(exc, ReplicaNotFoundError):
            return _fail(Status.NOT_FOUND, epoch, str(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return _fail(Status.ENOSPC, epoch, str(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.EBADF, errno.ENOENT, errno.ESTALE):
            if rep is None:  # deleted between the pool's lookup and our open
                return _fail(Status.NOT_FOUND, 0, str(exc))
            self._drop(rep)  # the next request reopens the replica
        elif not isinstance(exc, OSError | ReplicationError):
            log.exception("replica %s: %s failed unexpectedly", req.volume_id, req.op.name)
        return _fail(Status.EIO, epoch, f"{req.op.name} failed: {exc}")

    def _check(self, rep: _Replica, req: Request) -> Result | None:
        """The epoch and bounds rules; None when the request may run."""
        fenced = rep.meta.fenced_epoch
        epoch = req.epoch
        if req.op is Op.FENCE:
            ok = epoch >= fenced
        else:
            ok = epoch == fenced != 0 or (epoch == 0 and req.op in _OBSERVER_OPS)
        if not ok:
            if epoch < fenced:
                return _fail(Status.STALE_EPOCH, fenced, f"replica is fenced at epoch {fenced}")
            return _fail(Status.INVALID, fenced, f"not fenced at epoch {epoch} yet")
        if req.op in _RANGE_OPS and not self._fits(rep, req.offset + req.length):
            return _fail(Status.OUT_OF_RANGE, fenced, f"beyond the size {rep.size}")
        return None

    def _fits(self, rep: _Replica, end: int) -> bool:
        """``end`` is within the replica; raises _SizeUnknown when only the pool can tell
        (it may have grown): the request then runs again after a lookup off the loop."""
        if end > rep.size and not self._size_fresh:
            raise _SizeUnknown
        return end <= rep.size

    # -- operations: inline ones return a Result, the rest a Deferred ---------------------

    def _offload(
        self, rep: _Replica, req: Request, fn: _ThreadFn | None, *args: Any, barrier: bool
    ) -> Deferred:
        """Run ``fn(fd, *args)`` (then fdatasync if FUA or FLUSH) in a worker thread."""
        sync = bool(_flag_bits(req.flags, _FUA)) or req.op is Op.FLUSH
        # A dup: forget() may close rep.fd while the thread runs, and a closed number could
        # be reused by another open file before the thread touches it.
        fd = os.dup(rep.fd)

        async def work() -> Result:
            try:
                out = await asyncio.to_thread(_in_thread, fd, fn, args, sync)
                # FLUSH is also when lazy metadata (clean, settled) lands; not if the replica
                # was dropped meanwhile: an old snapshot must not overwrite a newer fence.
                if req.op is Op.FLUSH and self._replicas.get(rep.volume_id) is rep:
                    rep.meta.persist_if_changed()
                return Status.OK, rep.meta.fenced_epoch, out
            except Exception as exc:
                return self._error(rep, req, exc)

        return Deferred(work(), barrier)

    def _done(self, rep: _Replica, req: Request) -> Result | Deferred:
        if _flag_bits(req.flags, _FUA):
            return self._offload(rep, req, None, barrier=False)
        return Status.OK, rep.meta.fenced_epoch, b""

    def _write(self, rep: _Replica, req: Request) -> Result | Deferred:
        if not rep.meta.write_ready:
            rep.meta.mark_dirty()
        pwrite_all(rep.fd, req.payload, req.offset)
        return self._done(rep, req)

    def _write_batch(self, rep: _Replica, req: Request) -> Result | Deferred:
        payload = req.payload
        entries = write_batch_entries(payload, req.length)  # the codec validated it already
        # All or nothing: no write of a batch lands if one cannot.
        if not self._fits(rep, max(offset + n for offset, n, _ in entries)):
            return _fail(Status.OUT_OF_RANGE, rep.meta.fenced_epoch, f"beyond the size {rep.size}")
        if not rep.meta.write_ready:
            rep.meta.mark_dirty()
        view = memoryview(payload)
        fd = rep.fd
        for offset, n, pos in entries:
            pwrite_all(fd, view[pos:pos + n], offset)
        return self._done(rep, req)

    def _read(self, rep: _Replica, req: Request) -> Result | Deferred:
        # Big reads are rebuild copies, likely not cached: a disk read would stall the loop.
        if req.length > INLINE_MAX:
            return self._offload(rep, req, pread_exact, req.offset, req.length, barrier=True)
        return Status.OK, rep.meta.fenced_epoch, pread_exact(rep.fd, req.offset, req.length)

    def _trim(self, rep: _Replica, req: Request) -> Result | Deferred:
        if not rep.meta.write_ready:
            rep.meta.mark_dirty()
        if req.op is Op.WRITE_ZEROES and _flag_bits(req.flags, _NO_HOLE):
            if req.length > INLINE_MAX:
                return self._offload(rep, req, write_zeros, req.offset, req.length,
                                     barrier=True)
            write_zeros(rep.fd, req.offset, req.length)
            return self._done(rep, req)
        # Through the pool (an LVM discard runs tools): always in a worker thread.
        vid, pool = rep.volume_id, self._pool
        fn: _ThreadFn = lambda _fd, off, n: pool.punch_hole(vid, off, n) if n else None  # noqa: E731
        return self._offload(rep, req, fn, req.offset, req.length, barrier=True)

    _write_zeroes = _trim

    def _flush(self, rep: _Replica, req: Request) -> Deferred:
        return self._offload(rep, req, None, barrier=False)

    def _checksum(self, rep: _Replica, req: Request) -> Result | Deferred:
        spec = ChecksumSpec.decode(req.payload)  # the codec validated it already
        if req.length > INLINE_CHECKSUM_MAX:  # barrier: a consistent point in the stream
            return self._offload(rep, req, range_digests, req.offset, req.length, spec,
                                 barrier=True)
        digests = range_digests(rep.fd, req.offset, req.length, spec)
        return Status.OK, rep.meta.fenced_epoch, digests

    def _fence(self, rep: _Replica, req: Request) -> Result | Deferred:
        rep.meta.fence(req.epoch)  # _check refused lower epochs; this persists before reply
        stale = self._writers.stale(rep.volume_id, req.epoch) if self._writers else []
        if not stale:
            return Status.OK, rep.meta.fenced_epoch, b""
        writers = self._writers
        assert writers is not None

        async def work() -> Result:
            # The durable fence is up already (TCP requests below it are refused); a process
            # writing the replica through its own descriptor is ended before we say "fenced".
            try:
                await writers.end(stale)
            except WriterStillAlive as exc:
                return _fail(Status.EIO, rep.meta.fenced_epoch, str(exc))
            return Status.OK, rep.meta.fenced_epoch, b""

        return Deferred(work(), barrier=True)

    def _stat(self, rep: _Replica, req: Request) -> Deferred:
        async def work() -> Result:
            try:  # the size may have changed (resize): the pool knows, off the loop
                info = await asyncio.to_thread(self._pool.get, rep.volume_id)
            except Exception as exc:
                return self._error(rep, req, exc)
            rep.size = info.size_bytes if info is not None else rep.size
            meta = rep.meta
            stat = StatInfo(rep.size, meta.fenced_epoch, meta.generation, meta.dirty)
            return Status.OK, meta.fenced_epoch, stat.encode()

        return Deferred(work(), barrier=False)

    def _settle(self, rep: _Replica, req: Request) -> Result:
        rep.meta.settle(req.offset)  # persisted lazily: by the next tick or FLUSH
        return Status.OK, rep.meta.fenced_epoch, b""


_Handler = Callable[[ReplicaEngine, _Replica, Request], "Result | Deferred"]
_HANDLERS: dict[Op, _Handler] = {
    op: getattr(ReplicaEngine, f"_{op.name.lower()}")
    for op in Op
    if op not in _HANDSHAKE_OPS
}


class _SizeUnknown(Exception):
    """The request reaches past the size we know: only the pool can say if it grew."""


async def _settled(res: Result | Deferred) -> Result:
    return await res.work if isinstance(res, Deferred) else res


def _detached(req: Request) -> Request:
    """``req`` with a payload of its own: a deferred request outlives the receive buffer."""
    return replace(req, payload=bytes(req.payload)) if req.payload else req


def _in_thread(fd: int, fn: _ThreadFn | None, args: tuple[Any, ...], sync: bool) -> Buffer:
    try:
        out = fn(fd, *args) if fn is not None else None
        if sync:
            os.fdatasync(fd)
        return out or b""
    finally:
        os.close(fd)
