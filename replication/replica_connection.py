"""The owner's pipelined, authenticated connection to one replica server.

Owns: connecting and the HELLO/AUTH handshake, request ids, batching the frames submitted in
one event-loop tick into one ``transport.writelines``, request deadlines, backpressure
(``drain``), and turning every way a connection can die into one ``ReplicaUnavailableError``
for all pending requests. The replica operations on top are ``replica_client``. Must not:
retry, reconnect or decide what a failure means for the ISR (the caller does, via
``on_lost``), interpret non-OK statuses (``expect_ok`` is the caller's choice), or import
csi_driver, grpc or etcd.

Futures: a submit method returns an ``asyncio.Future[Response]``; it resolves with the
replica's response whatever its status, or fails with ReplicaUnavailableError once the
connection is dead. A response payload may be a read-only memoryview into a received chunk.
Payloads handed to a submit method must not change until its future is done.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Self, cast

from replication.errors import ReplicaStatusError, ReplicaUnavailableError, StaleEpochError
from replication.messages import Buffer, Op, ProtocolErrorEvent, Response, Role, Status
from replication.payloads import WriteBatch
from replication.peer_auth import PeerAuth
from replication.peer_socket import HIGH_WATER, configure_socket
from replication.peer_tls import SERVER_NAME
from replication.protocol import Connection

log = logging.getLogger(__name__)

DEADLINE_CHECK_S = 0.1  # how often the oldest in-flight request is checked


def expect_ok(response: Response) -> Response:
    """``response`` if OK; else StaleEpochError (STALE_EPOCH) or ReplicaStatusError."""
    if response.status is Status.OK:
        return response
    message = bytes(response.payload).decode("utf-8", "replace")
    if response.status is Status.STALE_EPOCH:
        raise StaleEpochError(response.epoch, message)
    detail = f"{response.op.name} failed: {response.status.name}" + (
        f": {message}" if message else ""
    )
    raise ReplicaStatusError(int(response.status), detail)


class _Protocol(asyncio.Protocol):
    """Forwards transport events to the client (keeps them out of its public API)."""

    def __init__(self, client: ReplicaConnection) -> None:
        self._client = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._client._connection_made(cast(asyncio.Transport, transport))

    def data_received(self, data: bytes) -> None:
        self._client._data_received(data)

    def eof_received(self) -> bool:
        self._client._die("replica closed the connection")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._client._die(f"connection lost: {exc}" if exc else "connection closed")

    def pause_writing(self) -> None:
        self._client._write_paused = True

    def resume_writing(self) -> None:
        self._client._write_paused = False
        self._client._wake_drainers()


class ReplicaConnection:
    """A pipelined connection to one replica server; ``ReplicaClient`` is the one to use."""

    def __init__(self, address: tuple[str, int], request_timeout_s: float, user_timeout_ms: int,
                 auth: PeerAuth):
        self._loop = asyncio.get_running_loop()
        self.address = address
        self._timeout = request_timeout_s
        self._user_timeout_ms = user_timeout_ms
        self._conn = Connection(Role.CLIENT, auth=auth)
        self._transport: asyncio.Transport | None = None
        # request id -> (future, deadline); insertion order = submission order, so the
        # first entry is always the oldest request still in flight.
        self._pending: dict[int, tuple[asyncio.Future[Response], float]] = {}
        self._next_id = 1
        self._out: list[Buffer] = []
        self._send_handle: asyncio.Handle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._dead: str | None = None
        self._closed_by_caller = False
        self._lost: list[Callable[[str], None]] = []
        self._write_paused = False
        self._drainers: list[asyncio.Future[None]] = []

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        auth: PeerAuth,
        *,
        tls: ssl.SSLContext | None = None,
        connect_timeout_s: float = 3.0,
        request_timeout_s: float = 5.0,
        user_timeout_ms: int = 3000,
    ) -> Self:
        """Connect and authenticate both ways (``peer_auth``: we prove we hold the cluster
        secret as ``auth.node_id``, the replica proves it too). Raises
        ReplicaUnavailableError if the replica cannot be reached in time or fails to prove
        itself, ReplicaStatusError if it refuses us (AUTH_FAILED). ``tls``: the client
        context of ``peer_tls`` (the server must then run TLS too)."""
        client = cls((host, port), request_timeout_s, user_timeout_ms, auth)
        try:
            async with asyncio.timeout(connect_timeout_s):
                await client._loop.create_connection(
                    lambda: _Protocol(client), host, port, ssl=tls,
                    server_hostname=SERVER_NAME if tls else None,
                    ssl_handshake_timeout=connect_timeout_s if tls else None)
                # The codec fills in our HELLO (a fresh nonce) and the AUTH proof.
                response = await client._submit(Op.HELLO, "", 0)
                if response.status is Status.OK:
                    rid = client._next_id
                    client._out += client._conn.encode_auth(rid)
                    response = await client._track(rid, client._loop.create_future())
        except (OSError, TimeoutError) as exc:
            reason = f"cannot connect to replica {host}:{port}: {exc!r}"
            client._die(reason, notify=False)
            raise ReplicaUnavailableError(reason) from exc
        except BaseException:
            client._die(f"handshake with {host}:{port} failed", notify=False)
            raise
        if response.status is not Status.OK or client._conn.peer_node is None:
            client.close()
            expect_ok(response)  # raises with the replica's reason
        client._timer = client._loop.call_later(DEADLINE_CHECK_S, client._check_deadlines)
        return client

    # -- state ----------------------------------------------------------------------------

    @property
    def node_id(self) -> str:
        """The replica's node id, proven in the handshake."""
        return self._conn.peer_node or ""

    @property
    def closed(self) -> bool:
        return self._dead is not None

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def on_lost(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(reason)`` once when the connection dies (not on ``close()``);
        soon, if it already died."""
        if self._dead is None:
            self._lost.append(callback)
        elif not self._closed_by_caller:
            self._loop.call_soon(callback, self._dead)

    def close(self) -> None:
        """Close now: pending requests fail with ReplicaUnavailableError; no on_lost."""
        self._die("client closed", notify=False)

    async def drain(self) -> None:
        """Wait while more than HIGH_WATER bytes are queued for the replica."""
        self._send()
        while self._write_paused and self._dead is None:
            waiter = self._loop.create_future()
            self._drainers.append(waiter)
            await waiter
        if self._dead is not None:
            raise ReplicaUnavailableError(self._dead)

    # -- requests -------------------------------------------------------------------------

    def _submit(
        self,
        op: Op,
        volume_id: str,
        epoch: int,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        payload: Buffer = b"",
        payload_crc: int | None = None,
    ) -> asyncio.Future[Response]:
        fut: asyncio.Future[Response] = self._loop.create_future()
        if self._dead is not None:
            fut.set_exception(ReplicaUnavailableError(self._dead))
            return fut
        rid = self._next_id
        # Raises LocalProtocolError for a caller's bug (bad id, too many in flight).
        self._out += self._conn.encode_request(
            op, rid, volume_id, epoch, offset, length, flags, payload, payload_crc=payload_crc
        )
        return self._track(rid, fut)

    def _track(self, rid: int, fut: asyncio.Future[Response]) -> asyncio.Future[Response]:
        """Book a request whose frame is queued in ``_out``: reply, deadline, send."""
        self._next_id = rid + 1
        self._pending[rid] = (fut, self._loop.time() + self._timeout)
        if self._send_handle is None:  # the first frame of this tick: send them all later
            self._send_handle = self._loop.call_soon(self._send)
        return fut

    def _submit_batch(
        self, volume_id: str, epoch: int, batch: WriteBatch, fua: bool
    ) -> asyncio.Future[Response]:
        """Like ``_submit``, but sent at once (with anything queued before it)."""
        fut: asyncio.Future[Response] = self._loop.create_future()
        if self._dead is not None:
            fut.set_exception(ReplicaUnavailableError(self._dead))
            return fut
        rid = self._next_id
        self._out += self._conn.encode_write_batch(rid, volume_id, epoch, batch, fua=fua)
        self._track(rid, fut)
        self._send()
        return fut

    # -- transport ------------------------------------------------------------------------

    def _connection_made(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        configure_socket(transport.get_extra_info("socket"), user_timeout_ms=self._user_timeout_ms)
        transport.set_write_buffer_limits(high=HIGH_WATER)

    def _send(self) -> None:
        if self._send_handle is not None:
            self._send_handle.cancel()
            self._send_handle = None
        if self._out and self._transport is not None and self._dead is None:
            self._transport.writelines(self._out)
        self._out = []

    def _data_received(self, data: bytes) -> None:
        pending = self._pending
        for ev in self._conn.receive_data(data):
            if type(ev) is Response:
                entry = pending.pop(ev.request_id, None)
                if entry is not None and not entry[0].done():  # done: the caller cancelled
                    entry[0].set_result(ev)
            elif isinstance(ev, ProtocolErrorEvent):
                self._die(f"protocol error from replica: {ev.reason}")
                return

    def _check_deadlines(self) -> None:
        if self._pending:
            _, deadline = next(iter(self._pending.values()))
            if self._loop.time() > deadline:
                self._die(f"a request got no reply within {self._timeout:g} s")
                return
        self._timer = self._loop.call_later(DEADLINE_CHECK_S, self._check_deadlines)

    def _wake_drainers(self) -> None:
        drainers, self._drainers = self._drainers, []
        for waiter in drainers:
            if not waiter.done():
                waiter.set_result(None)

    def _die(self, reason: str, *, notify: bool = True) -> None:
        """Mark dead once: abort the socket, fail everything pending, tell on_lost."""
        if self._dead is not None:
            return
        self._closed_by_caller = not notify
        self._dead = f"replica {self.address[0]}:{self.address[1]}: {reason}"
        for handle in (self._timer, self._send_handle):
            if handle is not None:
                handle.cancel()
        self._conn.close()
        if self._transport is not None:
            self._transport.abort()
        pending, self._pending, self._out = self._pending, {}, []
        for fut, _ in pending.values():
            if not fut.done():
                fut.set_exception(ReplicaUnavailableError(self._dead))
        self._wake_drainers()
        callbacks, self._lost = self._lost, []
        for callback in callbacks if notify else ():
            try:
                callback(self._dead)
            except Exception:
                log.exception("on_lost callback failed for %s", self._dead)
