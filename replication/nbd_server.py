"""The asyncio edge of the NBD front end: a unix socket in front of a BlockBackend.

Owns the listening socket (mode 0600, stale-file removal, removal on close),
one asyncio BufferedProtocol per connection feeding received bytes into the sans-IO
`NbdServerConnection`, dispatch of requests to the backend (inline through its
`SyncFastPath` when offered, otherwise one task per request, many in flight),
reply batching (one `writelines` per received batch and per loop tick), flow
control, and the mapping of backend errors to NBD error codes.

Must not: parse or encode NBD bytes (nbd.py does); know what the backend is
(a file, or replicas); import csi_driver, grpc or etcd.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import stat
import sys
from collections import deque
from collections.abc import Callable
from typing import Final, cast

from replication import nbd as wire
from replication.backend import (
    BackendIOError,
    BlockBackend,
    CallbackWritePath,
    FileBackend,
    SyncFastPath,
)
from replication.nbd import (
    Disconnect,
    Event,
    FlushRequest,
    HandshakeComplete,
    NbdServerConnection,
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


class _Connection(asyncio.BufferedProtocol):
    """One client connection: bytes to events, events to backend calls, replies back.

    Received through the codec's buffers (``NbdServerConnection.get_buffer``): a big write's
    payload goes from the kernel straight into the buffer the backend is handed."""

    def __init__(self, server: NbdServer) -> None:
        self._server = server
        self._backend = server.backend
        self._fast = server.backend if isinstance(server.backend, SyncFastPath) else None
        backend = server.backend
        self._soon = backend if isinstance(backend, CallbackWritePath) else None
        self._soon_in_flight = 0  # callback-path writes not answered yet
        self._nbd = NbdServerConnection(
            server.backend.size, server.export_name, multi_conn=server.multi_conn
        )
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
        self._server.connections.add(self)
        self._transport.writelines(self._nbd.data_to_send())

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
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


class NbdServer:
    """Serves one export from `backend` on a unix socket, to any number of clients."""

    def __init__(
        self,
        socket_path: str,
        backend: BlockBackend,
        export_name: str = "",
        *,
        multi_conn: bool = False,
    ) -> None:
        self.socket_path, self.backend, self.export_name = socket_path, backend, export_name
        # Only true when every connection sees one cache (e.g. one FileBackend).
        self.multi_conn = multi_conn
        self.connections: set[_Connection] = set()
        self._server: asyncio.AbstractServer | None = None
        self._socket_id: tuple[int, int] | None = None
        self._closed = asyncio.Event()

    async def start(self) -> None:
        """Bind and listen; returns once clients can connect."""
        if self._server is not None:
            return
        sock = _bind_private(self.socket_path)
        st = os.stat(self.socket_path)
        self._socket_id = (st.st_dev, st.st_ino)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _Connection(self), sock=sock)
        log.info("nbd listening socket=%s size=%d", self.socket_path, self.backend.size)

    async def serve(self) -> None:
        """Listen (if not yet) and serve until `close()`."""
        await self.start()
        await self._closed.wait()

    def close(self) -> None:
        """Stop listening, close every connection, remove our socket file. Idempotent."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close()
        if self._socket_id is not None:
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(self.socket_path)
                # Never remove a socket a newer server has since bound there.
                if (st.st_dev, st.st_ino) == self._socket_id:
                    os.unlink(self.socket_path)
            self._socket_id = None
        self._closed.set()


def _bind_private(path: str) -> socket.socket:
    """A listening unix socket at `path` that only our uid can connect to."""
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        # Before listen(): until then every connect() is refused, so no client
        # can slip in while the mode is still the umask's.
        os.chmod(path, 0o600)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _remove_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        log.info("removing stale nbd socket socket=%s", path)
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "another server is listening", path)


def _event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return cast(Callable[[], asyncio.AbstractEventLoop], uvloop.new_event_loop)


async def _serve_file(args: argparse.Namespace) -> None:
    backend = FileBackend(args.file)
    server = NbdServer(args.socket, backend, args.export_name, multi_conn=args.multi_conn)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.close)
    try:
        await server.serve()
    finally:
        server.close()
        backend.close()


def main(argv: list[str] | None = None) -> int:
    """Manual testing: serve one file as an NBD export on a unix socket."""
    parser = argparse.ArgumentParser(prog="python -m replication.nbd_server")
    parser.add_argument("--file", required=True, help="backing file or block device")
    parser.add_argument("--socket", required=True, help="unix socket path to listen on")
    parser.add_argument("--export-name", default="")
    parser.add_argument("--multi-conn", action="store_true")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s")
    try:
        with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
            runner.run(_serve_file(args))
    except OSError as exc:
        log.error("cannot serve file=%s socket=%s error=%s", args.file, args.socket, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
