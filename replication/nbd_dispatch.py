"""One NBD client connection in asyncio, in front of a BlockBackend: received bytes fed
to the sans-IO codec (``nbd_codec``), requests dispatched to the backend, replies back.

Owns: dispatch (inline through the backend's ``SyncFastPath`` when offered, a callback for
its ``CallbackWritePath``, otherwise one task per request, many in flight), reply batching
(one ``writelines`` per received batch and per loop tick), flow control (bounded requests
in flight, reading paused behind a backlog or a slow reader), and the mapping of backend
errors to NBD error codes. ``nbd_server`` listens and creates one per connection.

Must not: parse or encode NBD bytes (``nbd_codec`` does); know what the backend is
(a file, or replicas); import csi_driver, grpc or etcd.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections import deque
from typing import Final, cast

from replication import nbd_messages as wire
from replication.backend import BackendIOError, BlockBackend, CallbackWritePath, SyncFastPath
from replication.nbd_codec import NbdServerConnection
from replication.nbd_messages import (
    Disconnect,
    Event,
    FlushRequest,
    HandshakeComplete,
    Payload,
    ProtocolError,
    ReadRequest,
    Request,
    TrimRequest,
    WriteRequest,
    WriteZeroesRequest,
)

log = logging.getLogger(__name__)

# Bounds on requests handed to the backend as tasks. Past either, parsed requests
# wait in a backlog and reading stops, so a client pipelining without limit (or
# packing thousands of 32 MiB reads into one packet) queues in its own socket
# buffer, not in our heap.
MAX_IN_FLIGHT: Final = 256
MAX_IN_FLIGHT_BYTES: Final = 256 * 1024 * 1024

_ERRNO_TO_NBD: Final = {
    errno.EPERM: wire.NBD_EPERM, errno.EACCES: wire.NBD_EPERM, errno.EROFS: wire.NBD_EPERM,
    errno.EIO: wire.NBD_EIO, errno.ENOMEM: wire.NBD_ENOMEM, errno.EINVAL: wire.NBD_EINVAL,
    errno.ENOSPC: wire.NBD_ENOSPC, errno.EDQUOT: wire.NBD_ENOSPC, errno.EFBIG: wire.NBD_ENOSPC,
    errno.EOVERFLOW: wire.NBD_EOVERFLOW, errno.EOPNOTSUPP: wire.NBD_ENOTSUP,
    errno.ESHUTDOWN: wire.NBD_ESHUTDOWN,
}  # fmt: skip


def nbd_error(exc: BackendIOError) -> int:
    """The NBD error code for a backend failure; anything unmapped is EIO."""
    return _ERRNO_TO_NBD.get(exc.errno, wire.NBD_EIO)


def _payload_bytes(ev: Request) -> int:
    """Memory a request holds (write) or will produce (read) while in flight."""
    if isinstance(ev, WriteRequest):
        return len(ev.data)
    return ev.length if isinstance(ev, ReadRequest) else 0


class NbdDispatcher(asyncio.BufferedProtocol):
    """One client connection: bytes to events, events to backend calls, replies back.

    Received through the codec's buffers (``NbdServerConnection.get_buffer``): a big write's
    payload goes from the kernel straight into the buffer the backend is handed."""

    def __init__(self, backend: BlockBackend, export_name: str, multi_conn: bool,
                 connections: set[NbdDispatcher]) -> None:
        self._connections = connections  # the server's: in it while the connection lives
        self._backend = backend
        self._fast = backend if isinstance(backend, SyncFastPath) else None
        self._soon = backend if isinstance(backend, CallbackWritePath) else None
        self._soon_in_flight = 0  # callback-path writes not answered yet
        self._nbd = NbdServerConnection(backend.size, export_name, multi_conn=multi_conn)
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._backlog: deque[Request] = deque()  # parsed, waiting for in-flight room
        self._inflight_bytes = 0
        self._pending: list[Payload] = []  # replies of finished tasks, sent once per tick
        self._flush_scheduled = False
        self._draining = False  # NBD_CMD_DISC: close once in-flight requests are answered
        self._hangup = False  # protocol error: close at once
        self._write_paused = False
        self._read_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._connections.add(self)
        self._transport.writelines(self._nbd.data_to_send())

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        self._transport = None
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        self._backlog.clear()
        if exc is not None:
            log.info("nbd connection lost error=%s", exc)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._nbd.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        events = self._nbd.buffer_updated(nbytes)
        out = self._nbd.data_to_send()
        fast, soon = self._fast, self._soon
        for ev in events:
            # The hot paths: a small write or read is answered inline (all the replies of
            # one received batch leave in one writelines), or a write is started with a
            # callback instead of a task (replicated writes).
            if soon is not None and isinstance(ev, WriteRequest) and self._start_soon(soon, ev):
                continue
            handled = (
                fast is not None
                and isinstance(ev, (WriteRequest, ReadRequest))
                and self._try_fast(fast, ev, out)
            )
            if not handled:
                self._dispatch(ev)
        transport = self._transport
        if out and transport is not None:
            transport.writelines(out)
        if self._hangup and transport is not None:
            transport.close()
        elif self._draining:
            self._maybe_finish()

    def _try_fast(
        self, fast: SyncFastPath, ev: ReadRequest | WriteRequest, out: list[Payload]
    ) -> bool:
        """Serve `ev` synchronously if the backend agrees; False leaves it to a task."""
        data: bytes | None = None
        try:
            if isinstance(ev, WriteRequest):
                if ev.fua or not fast.write_now(ev.offset, ev.data):
                    return False
            else:
                data = fast.read_now(ev.offset, ev.length)
                if data is None:
                    return False
                if len(data) != ev.length:
                    raise BackendIOError(errno.EIO, f"backend returned {len(data)} bytes")
            err = 0
        except BackendIOError as exc:
            data, err = None, nbd_error(exc)
        out += self._nbd.reply(ev.handle, err, data)
        return True

    def _start_soon(self, soon: CallbackWritePath, ev: WriteRequest) -> bool:
        if self._backlog:  # keep the in-flight caps: behind the queue, like every request
            return False
        self._soon_in_flight += 1
        handle = ev.handle
        if soon.write_soon(ev.offset, ev.data, ev.fua, lambda exc: self._soon_done(handle, exc)):
            return True
        self._soon_in_flight -= 1
        return False

    def _soon_done(self, handle: int, exc: BackendIOError | None) -> None:
        self._soon_in_flight -= 1
        err = 0
        if exc is not None:
            err = nbd_error(exc)
            log.warning("nbd request failed request=WriteRequest errno=%d", exc.errno)
        self._queue_reply(self._nbd.reply(handle, err, None))
        if self._draining:
            self._maybe_finish()

    def _dispatch(self, ev: Event) -> None:
        if isinstance(ev, Request):
            self._backlog.append(ev)
            self._start_backlog()
        elif isinstance(ev, HandshakeComplete):
            negotiated = ev.block_size_negotiated
            log.info("nbd handshake done export=%r block_sizes=%s", ev.export_name, negotiated)
        elif isinstance(ev, Disconnect):
            log.info("nbd disconnect reason=%r", ev.reason)
            self._draining = True
        elif isinstance(ev, ProtocolError):
            log.warning("nbd protocol error, hanging up reason=%r", ev.reason)
            self._hangup = True

    def _start_backlog(self) -> None:
        backlog = self._backlog
        while (
            backlog
            and len(self._tasks) < MAX_IN_FLIGHT
            and self._inflight_bytes < MAX_IN_FLIGHT_BYTES
        ):
            ev = backlog.popleft()
            cost = _payload_bytes(ev)
            self._inflight_bytes += cost
            task = self._loop.create_task(self._run(ev, cost))
            self._tasks.add(task)
            task.add_done_callback(self._task_done)
        if backlog or self._read_paused:
            self._update_reading()

    async def _run(self, ev: Request, cost: int) -> None:
        data: bytes | None = None
        try:
            data = await self._execute(ev)
            err = 0
        except BackendIOError as exc:
            err = nbd_error(exc)
            log.warning("nbd request failed request=%s errno=%d", type(ev).__name__, exc.errno)
        except Exception:
            log.exception("nbd request crashed request=%s", type(ev).__name__)
            err = wire.NBD_EIO
        finally:
            self._inflight_bytes -= cost
        self._queue_reply(self._nbd.reply(ev.handle, err, data))

    async def _execute(self, ev: Request) -> bytes | None:
        backend = self._backend
        if isinstance(ev, ReadRequest):
            data = await backend.read(ev.offset, ev.length)
            if len(data) != ev.length:
                raise BackendIOError(errno.EIO, f"backend returned {len(data)} bytes")
            return data
        if isinstance(ev, WriteRequest):
            await backend.write(ev.offset, ev.data, ev.fua)
        elif isinstance(ev, FlushRequest):
            await backend.flush()
        elif isinstance(ev, TrimRequest):
            await backend.trim(ev.offset, ev.length)
        else:
            await backend.write_zeroes(ev.offset, ev.length, ev.no_hole)
        # BlockBackend has no FUA for these two; a flush gives the same guarantee.
        if isinstance(ev, TrimRequest | WriteZeroesRequest) and ev.fua:
            await backend.flush()
        return None

    def _queue_reply(self, parts: list[Payload]) -> None:
        self._pending += parts
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._send_pending)

    def _send_pending(self) -> None:
        self._flush_scheduled = False
        out, self._pending = self._pending, []
        if self._transport is not None and not self._transport.is_closing():
            self._transport.writelines(out)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._backlog or self._read_paused:
            self._start_backlog()
        if self._draining:
            self._maybe_finish()

    def _maybe_finish(self) -> None:
        if (not self._tasks and not self._soon_in_flight and not self._backlog
                and self._transport is not None):
            self._send_pending()  # replies still waiting for this tick's flush
            self._transport.close()

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        pause = self._write_paused or bool(self._backlog)
        if pause and not self._read_paused:
            transport.pause_reading()
        elif not pause and self._read_paused:
            transport.resume_reading()
        self._read_paused = pause
