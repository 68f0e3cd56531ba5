"""The replica side of the replication protocol: one TCP server for a node's pool.

Owns: listening, the per-connection asyncio Protocol (socket options, feeding bytes to a
``protocol.Connection``, batching replies, backpressure, barriers, access checks, connection
limits), the housekeeping task. What a request does to a replica is ``replica_engine``'s
business; ``replica_server_cli`` runs one from the command line. Must not: crash on anything
a peer sends, reorder one connection's requests across a barrier, hold unbounded replies for
a peer that does not read them, or import csi_driver, grpc or etcd.

Replies to one received chunk go out in one ``transport.writelines``: the owner pipelines,
so a chunk usually holds many requests: one send per chunk, not one per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import cast

from replication.access import ConnectionLimits, ReplicaAccess, ReplyBudget
from replication.local_writers import LocalWriters
from replication.messages import Buffer, Op, ProtocolErrorEvent, Request, Role, Status
from replication.payloads import Hello
from replication.peer_auth import PeerAuth
from replication.peer_socket import HIGH_WATER, configure_socket
from replication.pool.base import Pool
from replication.protocol import Connection, State
from replication.replica_engine import Deferred, ReplicaEngine, Result

log = logging.getLogger(__name__)

HOUSEKEEPING_S = 1.0  # lazy metadata saves and stale-descriptor checks
OUT_BUDGET = 4 << 20  # reply bytes built before they are handed to the transport
_OBSERVER_OPS = frozenset({Op.READ, Op.STAT, Op.CHECKSUM})
_DEFAULT_LIMITS = ConnectionLimits()


class ReplicaServer:
    """Serves every replica of ``pool`` over TCP; its state lives on one event loop."""

    def __init__(
        self,
        pool: Pool,
        meta_dir: Path,
        auth: PeerAuth,
        *,
        access: ReplicaAccess | None = None,
        local_writers: LocalWriters | None = None,
        limits: ConnectionLimits = _DEFAULT_LIMITS,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """``auth``: every peer must prove it holds the cluster secret (no anonymous peers).
        ``access``: who may touch which volume, and which epochs are real (the node passes
        its etcd view; without it any authenticated peer may act on any volume). ``tls``:
        encrypt every connection (``peer_tls``; a peer without the cluster certificate
        gets no further than the TLS handshake)."""
        self.tls = tls
        self.node_id = auth.node_id
        self.hello = Hello(auth.node_id).encode()  # validates the node id now, not per client
        self.auth = auth
        self.access = access
        self.limits = limits
        self.engine = ReplicaEngine(pool, meta_dir, auth.node_id, local_writers)
        self.replies = ReplyBudget(limits.reply_budget_bytes, limits.reply_floor_bytes,
                                   lambda wake: asyncio.get_running_loop().call_soon(wake))
        self.connections: set[_ServerConnection] = set()
        self._server: asyncio.Server | None = None
        self._housekeeping: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _ServerConnection(self), host, port, reuse_address=True, ssl=self.tls,
            ssl_handshake_timeout=self.limits.handshake_timeout_s if self.tls else None,
        )
        self._housekeeping = loop.create_task(self._housekeep_forever())

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("server not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening, drop every connection, save metadata and close descriptors."""
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
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

    async def _housekeep_forever(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_S)
            for conn in list(self.connections):
                conn.sample_replies()  # transports drain without telling us: refresh
            try:
                await self.engine.housekeeping()
            except Exception:  # keep serving; the next round tries again
                log.exception("replica server %s: housekeeping failed", self.node_id)


class _ServerConnection(asyncio.BufferedProtocol):
    """One client connection. Requests behind a barrier wait in ``_held``, in order.

    Bytes are received straight into the codec's reusable buffer (one copy, no allocation
    per chunk: a 1 MiB write used to be copied four times). Request payloads are views into
    it, valid until the next receive: every op consumes its payload before returning,
    except requests held behind a barrier, which are copied."""

    def __init__(self, server: ReplicaServer) -> None:
        self._server = server
        self._engine = server.engine
        self._conn = Connection(Role.SERVER, auth=server.auth)
        self._transport: asyncio.Transport | None = None
        self._peer = "?"
        self._host = ""
        self._granted: set[str] = set()  # volumes ``access`` allowed on this connection
        self._approved: set[int] = set()  # request ids checked, about to be dispatched
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._out: list[Buffer] = []
        self._in_batch = False  # replies queued now go out at the end of data_received
        self._send_scheduled = False
        self._held: deque[Request] | None = None  # set while requests must wait
        self._barrier = False  # a barrier op (or an access check) runs: _held waits for it
        self._out_bytes = 0  # payload bytes of the replies in _out
        self._charged = 0  # our transport's queued bytes, as last reported to the budget
        self._write_paused = False
        self._reading_paused = False
        self._closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's does not subclass it
        configure_socket(transport.get_extra_info("socket"))
        self._transport.set_write_buffer_limits(high=HIGH_WATER)
        peer = transport.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self._host = str(peer[0]) if isinstance(peer, tuple) else self._peer
        refusal = self._over_limit()
        self._server.connections.add(self)
        if refusal:
            log.warning("replica connection %s refused: %s", self._peer, refusal)
            self._closed = True
            self._transport.abort()
            return
        self._handshake_timer = asyncio.get_running_loop().call_later(
            self._server.limits.handshake_timeout_s, self._handshake_expired)

    def _over_limit(self) -> str:
        limits, conns = self._server.limits, self._server.connections
        if len(conns) >= limits.max_connections:
            return f"{len(conns)} connections open (limit {limits.max_connections})"
        strangers = [c for c in conns if not c.authenticated]
        if len(strangers) >= limits.max_unauthenticated:
            return f"{len(strangers)} unauthenticated connections open"
        if sum(c._host == self._host for c in strangers) >= limits.max_unauthenticated_per_host:
            return f"too many unauthenticated connections from {self._host}"
        return ""

    @property
    def authenticated(self) -> bool:
        return self._conn.state is State.READY

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        if not self.authenticated and not self._closed:
            log.warning("replica connection %s: no handshake within %.1f s, closing",
                        self._peer, self._server.limits.handshake_timeout_s)
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._conn.close()
        self._held = None
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        self._server.replies.update(self._charged, 0)
        self._charged = 0
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
                    if self._held is None and self._may_dispatch():
                        self._dispatch(ev)
                    else:  # behind a barrier, or the peer is not reading our replies
                        if self._held is None:
                            self._held = deque()
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
        op = req.op
        if op is Op.HELLO:
            # The codec replaces the payload with our nonce and proof; the node id is ours.
            self._reply(req, (Status.OK, 0, self._server.hello))
            return
        if op is Op.AUTH:  # the codec verified the proof; a bad one never gets here
            self._reply(req, (Status.OK, 0, b""))
            return
        if self._server.access is not None and self._needs_check(req):
            self._check_access(req)
            return
        res = self._engine.execute(req)
        if not isinstance(res, Deferred):
            self._reply(req, res)
            return
        deferred = res
        task = asyncio.get_running_loop().create_task(deferred.work)
        if deferred.barrier:
            self._held, self._barrier = deque(), True
            self._update_reading()
        task.add_done_callback(lambda t: self._finished(req, t, deferred.barrier))

    def _needs_check(self, req: Request) -> bool:
        if req.request_id in self._approved:
            self._approved.discard(req.request_id)
            return False
        if req.op is Op.FENCE:
            return True
        # An observer (epoch 0 READ/STAT/CHECKSUM, e.g. `tandem verify`) changes nothing:
        # being authenticated is enough.
        return req.volume_id not in self._granted and not (req.epoch == 0 and
                                                            req.op in _OBSERVER_OPS)

    def _check_access(self, req: Request) -> None:
        """Ask ``access`` (the state store) before the first operation on a volume and
        before every FENCE; later requests wait behind it, as behind any barrier."""
        access = self._server.access
        peer = self._conn.peer_node
        assert access is not None and peer is not None  # no request before the handshake
        fence = req.epoch if req.op is Op.FENCE else None
        req = _detached(req)
        task = asyncio.get_running_loop().create_task(access.check(req.volume_id, peer, fence))
        self._held, self._barrier = deque(), True
        self._update_reading()
        task.add_done_callback(lambda t: self._checked(req, peer, t))

    def _checked(self, req: Request, peer: str, task: asyncio.Task[str | None]) -> None:
        if self._closed or task.cancelled():
            return
        try:
            reason = task.result()
        except Exception as exc:  # the store is unreachable: refuse; the peer retries
            reason = f"cannot check access now: {exc}"
        assert self._held is not None
        if reason is None:
            if req.op is not Op.FENCE:
                self._granted.add(req.volume_id)
            self._approved.add(req.request_id)
            self._held.appendleft(req)
        else:
            log.warning("volume=%s peer=%s %s refused: %s", req.volume_id[:128], peer,
                        req.op.name, reason)
            self._reply(req, (Status.AUTH_FAILED, 0, reason.encode()[:1024]))
        self._barrier = False
        self._release()

    def _finished(self, req: Request, task: asyncio.Task[Result], barrier: bool) -> None:
        if self._closed or task.cancelled():
            return
        self._reply(req, task.result())  # the engine's coroutines never raise
        if barrier:
            self._barrier = False
            self._release()

    def _may_dispatch(self) -> bool:
        """Whether one more request may run now: replies are bounded in memory. Past
        ``OUT_BUDGET`` queued bytes they go to the transport, which pauses us (and so the
        peer) once more than HIGH_WATER bytes wait for a peer that does not read."""
        if self._out_bytes >= OUT_BUDGET:
            self._send()
        if self._write_paused:
            return False
        if self._server.replies.allows(self._charged + self._out_bytes):
            return True
        self._server.replies.wait(self._budget_freed)  # the process holds too many replies
        return False

    def _budget_freed(self) -> None:
        if not self._closed and self._held is not None and not self._barrier:
            self._release()

    def sample_replies(self) -> None:
        """Report how many reply bytes wait in our transport (for the process budget)."""
        if self._transport is None or self._closed:
            return
        now = self._transport.get_write_buffer_size()
        self._server.replies.update(self._charged, now)
        self._charged = now

    def _release(self) -> None:
        """Dispatch the requests held, in order, until one sets a new barrier or the
        peer stops reading our replies."""
        held, self._held = self._held, None
        self._in_batch = True
        try:
            while held and self._held is None and self._may_dispatch():
                self._dispatch(held.popleft())
        finally:
            self._in_batch = False
        if held:
            if self._held is None:
                self._held = held
            else:
                self._held.extend(held)
        self._send()
        self._update_reading()

    def _reply(self, req: Request, res: Result) -> None:
        status, epoch, payload = res
        self._out_bytes += len(payload)
        self._out += self._conn.encode_response(req.op, req.request_id, status, epoch, payload)
        if not self._in_batch and not self._send_scheduled:
            self._send_scheduled = True
            asyncio.get_running_loop().call_soon(self._send)

    def _send(self) -> None:
        self._send_scheduled = False
        if self._out and self._transport is not None and not self._transport.is_closing():
            self._transport.writelines(self._out)
            self.sample_replies()
        self._out, self._out_bytes = [], 0

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self.sample_replies()
        if self._held is not None and not self._barrier:
            self._release()  # requests held only because the peer was not reading
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
