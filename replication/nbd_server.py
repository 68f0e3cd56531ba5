"""The NBD front end's listening side: a unix socket in front of a BlockBackend.

Owns the listening socket (mode 0600, stale-file removal, removal on close), one
``nbd_dispatch.NbdDispatcher`` per accepted connection, closing them all, and
``python -m replication.nbd_server`` (serve one file, for manual testing).

Must not: parse or encode NBD bytes (``nbd_codec`` does) or serve requests
(``nbd_dispatch`` does); know what the backend is (a file, or replicas); import
csi_driver, grpc or etcd.
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
from collections.abc import Callable
from typing import cast

from replication.backend import BlockBackend, FileBackend
from replication.nbd_dispatch import NbdDispatcher

log = logging.getLogger(__name__)


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
        self.connections: set[NbdDispatcher] = set()
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
        self._server = await loop.create_unix_server(
            lambda: NbdDispatcher(self.backend, self.export_name, self.multi_conn,
                                  self.connections),
            sock=sock)
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
