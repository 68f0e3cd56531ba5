"""The replica side of the replication protocol: one TCP server for a node's pool.

Owns: listening, the per-connection asyncio Protocol (socket options, feeding bytes to a
``protocol.Connection``, batching replies, backpressure, barriers), the housekeeping timer,
and the ``python -m replication.replica_server`` entry point. What a request does to a
replica is ``replica_engine``'s business. Must not: crash on anything a peer sends, reorder
one connection's requests across a barrier, or import csi_driver, grpc or etcd.

Replies to one received chunk go out in one ``transport.writelines``: the owner pipelines,
so a chunk usually holds many requests: one send per chunk, not one per request.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import signal
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import cast

from replication.heap import keep_large_buffers_on_heap
from replication.local_writers import LocalWriters
from replication.messages import Buffer, Hello, Op, ProtocolErrorEvent, Request, Role, Status
from replication.pool.base import Pool
from replication.protocol import Connection
from replication.replica_client import HIGH_WATER, configure_socket
from replication.replica_engine import Deferred, ReplicaEngine, Result

log = logging.getLogger(__name__)

HOUSEKEEPING_S = 1.0  # lazy metadata saves and stale-descriptor checks


class ReplicaServer:
    """Serves every replica of ``pool`` over TCP; its state lives on one event loop."""

    def __init__(
        self,
        pool: Pool,
        meta_dir: Path,
        node_id: str,
        *,
        authenticate: Callable[[bytes], bool] | None = None,
        local_writers: LocalWriters | None = None,
    ) -> None:
        self.node_id = node_id
        self.hello = Hello(node_id).encode()  # validates the node id now, not per client
        self.authenticate = authenticate
        self.engine = ReplicaEngine(pool, meta_dir, node_id, local_writers)
        self.connections: set[_ServerConnection] = set()
        self._server: asyncio.Server | None = None
        self._housekeeping: asyncio.TimerHandle | None = None

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _ServerConnection(self), host, port, reuse_address=True
        )
        self._housekeeping = loop.call_later(HOUSEKEEPING_S, self._tick)

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("server not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening, drop every connection, save metadata and close descriptors."""
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.abort()
        if self._server is not None:
            await self._server.wait_closed()
        self.engine.close()

    def forget(self, volume_id: str, *, delete_meta: bool = False) -> None:
        """Close the replica's cached descriptor: call before the pool deletes it."""
        self.engine.forget(volume_id, delete_meta=delete_meta)

    def _tick(self) -> None:
        self.engine.housekeeping()
        self._housekeeping = asyncio.get_running_loop().call_later(HOUSEKEEPING_S, self._tick)


class _ServerConnection(asyncio.BufferedProtocol):
    """One client connection. Requests behind a barrier wait in ``_held``, in order.

    Bytes are received straight into the codec's reusable buffer (one copy, no allocation
    per chunk: a 1 MiB write used to be copied four times). Request payloads are views into
    it, valid until the next receive: every op consumes its payload before returning,
    except requests held behind a barrier, which are copied."""

    def __init__(self, server: ReplicaServer) -> None:
        self._server = server
        self._engine = server.engine
        self._conn = Connection(Role.SERVER, authenticate=server.authenticate)
        self._transport: asyncio.Transport | None = None
        self._peer = "?"
        self._out: list[Buffer] = []
        self._in_batch = False  # replies queued now go out at the end of data_received
        self._send_scheduled = False
        self._held: deque[Request] | None = None  # set while a barrier op runs
        self._write_paused = False
        self._reading_paused = False
        self._closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's does not subclass it
        configure_socket(transport.get_extra_info("socket"))
        self._transport.set_write_buffer_limits(high=HIGH_WATER)
        peer = transport.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self._server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._conn.close()
        self._held = None
        self._server.connections.discard(self)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def eof_received(self) -> bool:
        for ev in self._conn.receive_eof():
            if isinstance(ev, ProtocolErrorEvent):
                log.warning("replica connection %s: %s", self._peer, ev.reason)
        return False  # close our side too: a client that stops sending is done

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._conn.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self._in_batch = True
        try:
            for ev in self._conn.buffer_updated(nbytes):
                if type(ev) is Request:
                    if self._held is None:
                        self._dispatch(ev)
                    else:
                        self._held.append(_detached(ev))
                elif isinstance(ev, ProtocolErrorEvent):
                    self._protocol_error(ev)
                    break
        finally:
            self._in_batch = False
        self._send()

    def _protocol_error(self, ev: ProtocolErrorEvent) -> None:
        log.warning("replica connection %s: protocol error, closing: %s", self._peer, ev.reason)
        if ev.reply:
            self._out.append(ev.reply)
        self._send()
        self._closed = True
        if self._transport is not None:
            self._transport.close()  # after the buffered replies (and the error reply) drain

    def _dispatch(self, req: Request) -> None:
        if req.op is Op.HELLO:
            self._reply(req, (Status.OK, 0, self._server.hello))
            return
        res = self._engine.execute(req)
        if not isinstance(res, Deferred):
            self._reply(req, res)
            return
        deferred = res
        task = asyncio.get_running_loop().create_task(deferred.work)
        if deferred.barrier:
            self._held = deque()
            self._update_reading()
        task.add_done_callback(lambda t: self._finished(req, t, deferred.barrier))

    def _finished(self, req: Request, task: asyncio.Task[Result], barrier: bool) -> None:
        if self._closed or task.cancelled():
            return
        self._reply(req, task.result())  # the engine's coroutines never raise
        if barrier:
            self._release()

    def _release(self) -> None:
        """Dispatch the requests a barrier held, in order, until one sets a new barrier."""
        held, self._held = self._held, None
        self._in_batch = True
        try:
            while held and self._held is None:
                self._dispatch(held.popleft())
        finally:
            self._in_batch = False
        if held and self._held is not None:
            self._held.extend(held)
        self._send()
        self._update_reading()

    def _reply(self, req: Request, res: Result) -> None:
        status, epoch, payload = res
        self._out += self._conn.encode_response(req.op, req.request_id, status, epoch, payload)
        if not self._in_batch and not self._send_scheduled:
            self._send_scheduled = True
            asyncio.get_running_loop().call_soon(self._send)

    def _send(self) -> None:
        self._send_scheduled = False
        if self._out and self._transport is not None and not self._transport.is_closing():
            self._transport.writelines(self._out)
        self._out = []

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()

    def _update_reading(self) -> None:
        # Stop reading while the peer does not read our replies, or while a barrier holds
        # requests back: otherwise either would queue without bound in this process.
        pause = self._write_paused or self._held is not None
        if pause == self._reading_paused or self._transport is None or self._closed:
            return
        self._reading_paused = pause
        if pause:
            self._transport.pause_reading()
        else:
            self._transport.resume_reading()


def _detached(req: Request) -> Request:
    """``req`` with a payload of its own, to outlive the receive buffer."""
    if not req.payload:
        return req
    return replace(req, payload=bytes(req.payload))


def _parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"--listen must be HOST:PORT, not {listen!r}")
    return host.strip("[]"), int(port)


async def _serve(args: argparse.Namespace, pool: Pool) -> None:
    authenticate = None
    if args.token_file:
        token = Path(args.token_file).read_bytes().strip()
        authenticate = lambda got: hmac.compare_digest(got, token)  # noqa: E731
    writers = LocalWriters(args.local_writers_dir) if args.local_writers_dir else None
    server = ReplicaServer(pool, Path(args.meta_dir), args.node_id, authenticate=authenticate,
                           local_writers=writers)
    host, port = args.listen
    await server.start(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening {host}:{server.port}", flush=True)  # the readiness line scripts wait for
    try:
        await stop.wait()
    finally:
        await server.close()


def main(argv: list[str] | None = None) -> int:
    """Manual and integration testing: serve a file pool's replicas."""
    from replication.pool.file import FilePool  # only the CLI picks a backend

    parser = argparse.ArgumentParser(prog="python -m replication.replica_server")
    parser.add_argument("--pool-dir", required=True)
    parser.add_argument("--pool-size", required=True, type=int, help="capacity in bytes")
    parser.add_argument("--meta-dir", required=True)
    parser.add_argument("--listen", required=True, type=_parse_listen, help="HOST:PORT")
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--token-file", help="clients must present this HELLO token")
    parser.add_argument("--local-writers-dir",
                        help="registry of processes writing replicas directly (ended on fence)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
    )
    try:
        import uvloop
    except ImportError:  # plain asyncio works, ~3x slower per round trip
        runner = asyncio.Runner()
    else:
        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    keep_large_buffers_on_heap()
    try:
        with runner:
            runner.run(_serve(args, FilePool(args.pool_dir, args.pool_size)))
    except OSError as exc:
        log.error("replica server cannot serve on %s: %s", args.listen, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
