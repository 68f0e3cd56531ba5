"""The owner's own node's replica: data through a descriptor, control through the server.

A ``LocalReplica`` is a ``ReplicaClient`` to this node's replica server that, once fenced,
also holds the replica open: writes and reads then cost a ``pwrite``/``pread`` in the target
instead of a frame, a TCP round trip and a second process's work. The server still does
everything else (FENCE, STAT, FLUSH, SETTLE, CHECKSUM, and TRIM / WRITE_ZEROES, whose
pool-specific work it owns), and the first write (it marks the replica dirty durably).

Order: the replica must apply content changes in the order the target issued them, as the
remote replicas do (their connection is ordered). A direct write lands when it is issued;
a content op sent through the server lands later, so while one is in flight every later op
goes through the server too (behind it), and direct I/O resumes once none is.

Fencing: see ``local_writers``: registered before the descriptor is opened, checked by a
STAT after, and ended by the server when anyone fences the replica higher.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os

from replication.local_writers import LocalWriters, Writer
from replication.messages import Buffer, Op, Response, Status
from replication.payloads import WriteBatch
from replication.peer_auth import PeerAuth
from replication.replica_client import ReplicaClient
from replication.replica_io import pwrite_all

log = logging.getLogger(__name__)

INLINE_READ_MAX = 1 << 20  # bigger reads (rebuild copies, likely uncached) go to a thread


class LocalReplica(ReplicaClient):
    """Use ``await LocalReplica.connect(...)`` then ``enable_direct(...)`` before FENCE."""

    def __init__(self, address: tuple[str, int], request_timeout_s: float,
                 user_timeout_ms: int, auth: PeerAuth) -> None:
        super().__init__(address, request_timeout_s, user_timeout_ms, auth)
        self._path: str | None = None
        self._writers: LocalWriters | None = None
        self._registered: Writer | None = None
        self._fd: int | None = None
        self._epoch = 0
        self._via_server = 0  # content ops sent through the server and not answered yet
        self._marked_dirty = False
        self._write_ok = Response(Op.WRITE, 0)  # shared: it is frozen
        self._batch_ok = Response(Op.WRITE_BATCH, 0)

    def enable_direct(self, path: str, writers: LocalWriters) -> None:
        self._path = path
        self._writers = writers

    @property
    def direct(self) -> bool:
        """True once the replica is open here (fenced, registered and checked)."""
        return self._fd is not None

    # -- fencing and opening --------------------------------------------------------------

    def fence(self, volume_id: str, epoch: int) -> asyncio.Future[Response]:
        fenced = super().fence(volume_id, epoch)
        if self._path is None or self._fd is not None:
            return fenced
        return asyncio.ensure_future(self._open_after(fenced, volume_id, epoch))

    async def _open_after(self, fenced: asyncio.Future[Response], volume_id: str,
                          epoch: int) -> Response:
        response = await fenced
        if response.status is not Status.OK:
            return response
        assert self._path is not None and self._writers is not None
        try:
            self._registered = self._writers.register(volume_id, epoch)
            fd = os.open(self._path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:  # still a correct replica, only through the server
            log.warning("volume=%s epoch=%d local replica %s not opened directly: %s",
                        volume_id, epoch, self._path, exc)
            self._unregister()
            return response
        try:
            check = await super().stat(volume_id, epoch)
        except BaseException:
            os.close(fd)
            self._unregister()
            raise
        if check.status is not Status.OK:  # fenced higher since our FENCE: never write here
            os.close(fd)
            self._unregister()
            return check
        self._fd, self._epoch = fd, epoch
        self._write_ok = Response(Op.WRITE, 0, Status.OK, epoch)
        self._batch_ok = Response(Op.WRITE_BATCH, 0, Status.OK, epoch)
        log.info("volume=%s epoch=%d local replica %s opened for direct I/O",
                 volume_id, epoch, self._path)
        return response

    def _unregister(self) -> None:
        if self._registered is not None and self._writers is not None:
            self._writers.unregister(self._registered)
        self._registered = None

    # -- data -----------------------------------------------------------------------------

    def _through_server(self, fut: asyncio.Future[Response]) -> asyncio.Future[Response]:
        self._via_server += 1
        fut.add_done_callback(self._answered)
        return fut

    def _answered(self, _fut: asyncio.Future[Response]) -> None:
        self._via_server -= 1

    def _resolved(self, response: Response) -> asyncio.Future[Response]:
        fut: asyncio.Future[Response] = self._loop.create_future()
        fut.set_result(response)
        return fut

    def _failure(self, op: Op, exc: OSError) -> Response:
        status = Status.ENOSPC if exc.errno == errno.ENOSPC else Status.EIO
        log.error("local replica %s: direct %s failed: %s", self._path, op.name, exc)
        return Response(op, 0, status, self._epoch, f"{op.name} failed: {exc}".encode()[:1024])

    def _read_response(self, data: bytes, length: int) -> Response:
        if len(data) != length:
            return Response(Op.READ, 0, Status.EIO, self._epoch, b"short read")
        return Response(Op.READ, 0, Status.OK, self._epoch, data)

    def write(
        self, volume_id: str, epoch: int, offset: int, data: Buffer, *, fua: bool = False,
        payload_crc: int | None = None,
    ) -> asyncio.Future[Response]:
        fd = self._direct_fd()
        if fd is None:
            return self._through_server(super().write(
                volume_id, epoch, offset, data, fua=fua, payload_crc=payload_crc))
        try:
            pwrite_all(fd, data, offset)
        except OSError as exc:
            return self._resolved(self._failure(Op.WRITE, exc))
        if fua:
            return asyncio.ensure_future(self._sync(fd, self._write_ok))
        return self._resolved(self._write_ok)

    def write_batch(self, volume_id: str, epoch: int, batch: WriteBatch, *,
                    fua: bool = False) -> asyncio.Future[Response]:
        fd = self._direct_fd()
        if fd is None:
            return self._through_server(super().write_batch(volume_id, epoch, batch, fua=fua))
        try:
            for offset, data in zip(batch.offsets, batch.data, strict=True):
                pwrite_all(fd, data, offset)
        except OSError as exc:
            return self._resolved(self._failure(Op.WRITE_BATCH, exc))
        if fua:
            return asyncio.ensure_future(self._sync(fd, self._batch_ok))
        return self._resolved(self._batch_ok)

    def _direct_fd(self) -> int | None:
        """The descriptor if this write may go to it now; None: send it through the server
        (not open yet, a server-side content op still in flight, or the first write, which
        the server must see to mark the replica dirty durably)."""
        fd = self._fd
        if fd is None or self._via_server or not self._marked_dirty or self.closed:
            self._marked_dirty = self._marked_dirty or fd is not None
            return None
        return fd

    async def _sync(self, fd: int, ok: Response) -> Response:
        """fdatasync (a FUA write), then ``ok``; a failure answers for ``ok.op``."""
        dup = os.dup(fd)  # close() may close ours while the thread runs
        try:
            await asyncio.to_thread(os.fdatasync, dup)
        except OSError as exc:
            return self._failure(ok.op, exc)
        finally:
            os.close(dup)
        return ok

    def read(self, volume_id: str, epoch: int, offset: int,
             length: int) -> asyncio.Future[Response]:
        fd = self._fd
        if fd is None or self._via_server or self.closed:
            return super().read(volume_id, epoch, offset, length)
        if length > INLINE_READ_MAX:
            return asyncio.ensure_future(self._read_in_thread(fd, offset, length))
        try:
            data = os.pread(fd, length, offset)
        except OSError as exc:
            return self._resolved(self._failure(Op.READ, exc))
        return self._resolved(self._read_response(data, length))

    def read_now(self, offset: int, length: int) -> bytes | None:
        fd = self._fd
        if fd is None or self._via_server or self.closed or length > INLINE_READ_MAX:
            return None
        try:
            data = os.pread(fd, length, offset)
        except OSError:
            return None  # the asynchronous read reports it (and the replica is dropped)
        return data if len(data) == length else None

    async def _read_in_thread(self, fd: int, offset: int, length: int) -> Response:
        dup = os.dup(fd)
        try:
            data = await asyncio.to_thread(os.pread, dup, length, offset)
        except OSError as exc:
            return self._failure(Op.READ, exc)
        finally:
            os.close(dup)
        return self._read_response(data, length)

    def trim(self, volume_id: str, epoch: int, offset: int, length: int, *,
             fua: bool = False) -> asyncio.Future[Response]:
        return self._through_server(super().trim(volume_id, epoch, offset, length, fua=fua))

    def write_zeroes(
        self, volume_id: str, epoch: int, offset: int, length: int, *, no_hole: bool = False,
        fua: bool = False,
    ) -> asyncio.Future[Response]:
        return self._through_server(super().write_zeroes(
            volume_id, epoch, offset, length, no_hole=no_hole, fua=fua))

    # -- lifetime -------------------------------------------------------------------------

    def _die(self, reason: str, *, notify: bool = True) -> None:
        super()._die(reason, notify=notify)
        # Without the server we can no longer be told about fences in order: stop here.
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        self._unregister()

