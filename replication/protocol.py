"""Sans-IO codec of one replication connection: bytes in, events out; events in, bytes out.

Owns: the connection's state (``State``) and its request/response bookkeeping
(``Connection``): which ops each state allows, the request ids in flight (a reply must
answer one, an id is not reused while in flight, the pipeline is bounded), and the per-op
rules of ``replication.op_rules`` applied to what we send and to what we receive. Framing
and the checks of every frame are ``replication.frames``; the proofs of the handshake are
``replication.peer_handshake``. Must not: touch sockets, asyncio, clocks or threads, or
import csi_driver, grpc or etcd. The transport feeds ``receive_data`` and writes what the
``encode_*`` methods return; deadlines and retries belong to the caller.

Before HELLO only HELLO is allowed; the client sends nothing else until the HELLO reply
says OK. With a ``PeerAuth`` the client's AUTH follows, and only the AUTH reply makes both
sides READY; until then a frame's payload is bounded by ``HANDSHAKE_MAX_PAYLOAD``. Any
violation by the peer yields one ``ProtocolErrorEvent`` and closes the connection; misuse
by our caller raises ``LocalProtocolError``.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from replication import messages as m
from replication.frames import FrameHandler, FrameReader, encode_frame, encode_header
from replication.messages import Buffer, Event, Op, Request, Response, Status
from replication.op_rules import check_request, check_response
from replication.payloads import Hello, WriteBatch
from replication.peer_auth import PeerAuth
from replication.peer_handshake import PeerHandshake

__all__ = ["Connection", "State"]

_NO_CRC = int(m.Flag.NO_PAYLOAD_CRC)
_FUA_FLAG = int(m.Flag.FUA)
_REPLY = int(m.Flag.REPLY)
_EVENT_FLAGS = int(m.EVENT_FLAGS)
_FLAG_VALUES = m.EVENT_FLAG_VALUES
_STATUSES = m.STATUSES
_RESPONSE_FLAGS = int(m.RESPONSE_WIRE_FLAGS)
_new_request = m.new_request
_new_response = m.new_response
_Remote = m.RemoteProtocolError
_Local = m.LocalProtocolError
_MAX_EPOCH = m.MAX_EPOCH
_SERVER = m.Role.SERVER


class State(Enum):
    AWAIT_HELLO = "await_hello"  # nothing exchanged yet
    HELLO_PENDING = "hello_pending"  # HELLO sent (client) or received (server), no reply yet
    AUTHENTICATING = "authenticating"  # HELLOs exchanged; the client's AUTH not yet answered
    READY = "ready"
    CLOSED = "closed"


_AWAIT, _PENDING, _AUTHING, _READY, _CLOSED = State
_STATE_FOR_OP = {Op.HELLO: _AWAIT, Op.AUTH: _AUTHING}  # every other op needs READY


class Connection:
    """One end of a replication connection (not thread-safe; one per TCP connection).

    ``auth``: this node's credentials; with them the handshake is mutual challenge-response
    (``peer_auth``) and a peer that fails it gets nothing but a closed connection. Without
    them (codec tests, tools on a trusted link) HELLO alone makes both sides READY.
    Received payloads are bytes or read-only
    memoryviews into the received chunk (zero-copy): copy them to keep them."""

    def __init__(
        self,
        role: m.Role,
        *,
        max_payload: int = m.DEFAULT_MAX_PAYLOAD,
        max_in_flight: int = m.DEFAULT_MAX_IN_FLIGHT,
        payload_checksums: bool = True,
        auth: PeerAuth | None = None,
    ) -> None:
        if not 0 < max_payload <= 0xFFFFFFFF or max_in_flight < 1:
            raise ValueError("max_payload must fit u32 and max_in_flight be >= 1")
        self.role = role
        self.max_payload = max_payload
        self.max_in_flight = max_in_flight
        # Default on: TCP's 16-bit checksum misses real corruption (bad NICs, offload bugs,
        # bit flips in RAM) and a corrupt write here is persisted on every replica at once,
        # silently. crc32 of 4 KiB costs ~1 us; turn it off only on links you trust.
        self.payload_checksums = payload_checksums
        self.auth = auth
        self._handshake = PeerHandshake(auth)
        self._reader = FrameReader(max_payload)
        self._state = _AWAIT
        # request id -> (op, OK reply payload length or -1): checks replies, catches ids
        # that are unsolicited or reused while in flight, bounds the pipeline.
        self._in_flight: dict[int, tuple[Op, int]] = {}

    @property
    def state(self) -> State:
        return self._state

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def peer_hello(self) -> Hello | None:
        """The peer's HELLO (its node id is proven once the handshake is done)."""
        return self._handshake.peer_hello

    @property
    def peer_node(self) -> str | None:
        """The peer's node id once the handshake is done (authenticated when ``auth``)."""
        hello = self._handshake.peer_hello
        return hello.node_id if hello is not None and self._state is _READY else None

    def _enter(self, state: State) -> None:
        # The reader needs only these two facts, and must see them change mid-chunk: an
        # AUTH reply lifts the payload bound for the frames behind it.
        self._state = state
        self._reader.open = state is not _CLOSED
        self._reader.authenticated = state is _READY

    def close(self) -> None:
        """Stop: later receive_data returns [] and sends raise LocalProtocolError."""
        self._enter(_CLOSED)
        self._reader.clear()
        self._in_flight.clear()

    def receive_eof(self) -> list[Event]:
        """The peer closed its side: an error if it stopped mid-frame; closes either way."""
        pending = self._reader.pending  # close() empties it, so a closed connection has none
        self.close()
        return [m.ProtocolErrorEvent("peer closed mid-frame")] if pending else []

    def receive_data(self, data: Buffer) -> list[Event]:
        """Parse every complete frame in ``data`` (plus what was buffered)."""
        if self._state is _CLOSED or not data:
            return []
        events: list[Event] = []
        try:
            self._reader.receive(data, self._frame_handler(), events)
        except _Remote as exc:
            events.append(m.ProtocolErrorEvent(str(exc), exc.reply))
            self.close()
        return events

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next received bytes go (``asyncio.BufferedProtocol.get_buffer``); then
        call ``buffer_updated``. Receiving this way costs one copy (kernel to this buffer)
        and no allocation per chunk; the buffer is reused, so the payload views of events
        from earlier calls are invalid once this is called again: copy what you keep.
        Do not mix with ``receive_data`` on one connection."""
        return self._reader.get_buffer()

    def buffer_updated(self, nbytes: int) -> list[Event]:
        """``nbytes`` were written into the last ``get_buffer``: the events they complete.
        Payloads are read-only views into the buffer, valid until the next get_buffer."""
        events: list[Event] = []
        try:
            self._reader.buffer_updated(nbytes, self._frame_handler(), events)
        except _Remote as exc:
            events.append(m.ProtocolErrorEvent(str(exc), exc.reply))
            self.close()
        return events

    def _frame_handler(self) -> FrameHandler:
        # Bound per call, never stored: a bound method kept on self is a reference cycle,
        # and a closed connection's buffers would then wait for the cyclic GC.
        return self._on_request if self.role is _SERVER else self._on_response

    def _on_request(self, header: tuple[Any, ...], vid_raw: bytes, payload: Buffer) -> Request:
        _, _, _, op, flags, rid, epoch, offset, length, _, _, status, _ = header
        lim = self.max_payload
        if flags & _REPLY:
            raise _Remote("response frame sent to a server")
        if status:
            raise _Remote("status set on a request")
        if self._state is not _STATE_FOR_OP.get(op, _READY):
            raise _Remote(f"op {op} not allowed in state {self._state.value}")
        vid = m.decode_volume_id(vid_raw) if vid_raw else ""
        if vid is None:
            raise _Remote("invalid volume id")
        if epoch > _MAX_EPOCH:
            raise _Remote(f"epoch {epoch} is beyond any the state store issues")
        flags &= ~_NO_CRC
        try:
            member, expected = check_request(op, flags, vid, epoch, offset, length, payload, lim)
        except ValueError as exc:
            raise _Remote(str(exc)) from None
        in_flight = self._in_flight
        if rid in in_flight:
            raise _Remote(f"request id {rid} already in flight")
        if len(in_flight) >= self.max_in_flight:
            raise _Remote("too many requests in flight")
        if member is Op.HELLO:
            self._accept_hello(rid, payload)
        elif member is Op.AUTH:
            self._accept_auth(rid, payload)
        in_flight[rid] = (member, expected)
        fl = _FLAG_VALUES[flags & _EVENT_FLAGS]
        return _new_request(member, rid, vid, epoch, offset, length, fl, payload)

    def _on_response(self, header: tuple[Any, ...], vid_raw: bytes, payload: Buffer) -> Response:
        _, _, _, op, flags, rid, epoch, offset, length, _, _, status, _ = header
        if not flags & _REPLY:
            raise _Remote("request frame sent to a client")
        if flags & ~_RESPONSE_FLAGS or offset or length or vid_raw:
            raise _Remote("reserved response field set")
        entry = self._in_flight.pop(rid, None)
        if entry is None:
            raise _Remote(f"response to unknown request id {rid}")
        member, expected = entry
        if op != member:
            raise _Remote(f"op {op} answers a {member.name} request")
        st = _STATUSES.get(status)
        if st is None:
            raise _Remote(f"unknown status {status}")
        try:
            check_response(member, st, payload, expected)
        except ValueError as exc:
            raise _Remote(str(exc)) from None
        if member is Op.HELLO:
            self._finish_hello(st, payload)
        elif member is Op.AUTH:
            self._enter(_READY if st is Status.OK else _CLOSED)
        return _new_response(member, rid, st, epoch, payload)

    def _reject(self, op: Op, rid: int, reason: str) -> None:
        reply = encode_frame(op, _REPLY, rid, 0, 0, 0, Status.AUTH_FAILED, b"", reason.encode(),
                             None, self.max_payload, self.payload_checksums)
        raise _Remote(reason, b"".join(reply))

    def _accept_hello(self, rid: int, payload: Buffer) -> None:
        if not self._handshake.accept_hello(payload):
            self._reject(Op.HELLO, rid, "authentication required")
        self._enter(_PENDING)

    def _accept_auth(self, rid: int, payload: Buffer) -> None:
        if not self._handshake.client_proven(payload):  # only in _AUTHING: _STATE_FOR_OP
            self._reject(Op.AUTH, rid, "authentication failed")

    def _finish_hello(self, status: Status, payload: Buffer) -> None:
        if status is not Status.OK:
            self._enter(_CLOSED)  # the Response still reaches the caller, saying why
            return
        # A proven server: the caller sends encode_auth() next.
        self._enter(_AUTHING if self._handshake.server_proven(payload) else _READY)

    def send(self, event: Event) -> bytes:
        """Encode one event into a single bytes object (convenient, one copy of payload)."""
        if isinstance(event, Request):
            e = event
            parts = self.encode_request(
                e.op, e.request_id, e.volume_id, e.epoch, e.offset, e.length, e.flags, e.payload
            )
        elif isinstance(event, Response):
            parts = self.encode_response(
                event.op, event.request_id, event.status, event.epoch, event.payload
            )
        else:
            raise _Local(f"cannot send {type(event).__name__}")
        return b"".join(parts)

    def encode_request(
        self,
        op: Op,
        request_id: int,
        volume_id: str = "",
        epoch: int = 0,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        payload: Buffer = b"",
        *,
        payload_crc: int | None = None,
    ) -> list[Buffer]:
        """Frame a request as [header, payload] for ``transport.writelines`` (no copy).

        ``payload_crc`` lets a caller sending one payload to several replicas compute
        its CRC-32 once; it is trusted, and a wrong value makes the peer drop the connection.
        """
        if self.role is not m.Role.CLIENT:
            raise _Local("only a client sends requests")
        if self._state is not _STATE_FOR_OP.get(op, _READY):
            raise _Local(f"cannot send {op!r} in state {self._state.value}")
        if op == Op.HELLO and self.auth is not None:
            payload = self._handshake.client_hello()
        vid = m.encode_volume_id(volume_id) if volume_id else b""
        flags = int(flags)  # Flag arithmetic runs in Python; plain ints in C
        lim = self.max_payload
        try:
            member, expected = check_request(op, flags, vid, epoch, offset, length, payload, lim)
        except ValueError as exc:
            raise _Local(str(exc)) from None
        if request_id in self._in_flight:
            raise _Local(f"request id {request_id} already in flight")
        if len(self._in_flight) >= self.max_in_flight:
            raise _Local("too many requests in flight")
        parts = encode_frame(member, flags, request_id, epoch, offset, length, 0, vid, payload,
                             payload_crc, lim, self.payload_checksums)
        self._in_flight[request_id] = (member, expected)
        if member is Op.HELLO:
            self._enter(_PENDING)
        return parts

    def encode_response(
        self,
        op: Op,
        request_id: int,
        status: Status = Status.OK,
        epoch: int = 0,
        payload: Buffer = b"",
    ) -> list[Buffer]:
        """Frame the response to an in-flight request as [header, payload]."""
        if self.role is not m.Role.SERVER:
            raise _Local("only a server sends responses")
        entry = self._in_flight.get(request_id)
        if entry is None or entry[0] != op:
            raise _Local(f"no {op!r} request {request_id} in flight")
        st = _STATUSES.get(status)
        if st is None:
            raise _Local(f"unknown status {status}")
        if entry[0] is Op.HELLO and st is Status.OK and self.auth is not None:
            payload = self._handshake.server_hello()
        try:
            check_response(entry[0], st, payload, entry[1])
        except ValueError as exc:
            raise _Local(str(exc)) from None
        parts = encode_frame(entry[0], _REPLY, request_id, epoch, 0, 0, st, b"", payload, None,
                             self.max_payload, self.payload_checksums)
        del self._in_flight[request_id]
        if entry[0] is Op.HELLO:
            ok_state = _AUTHING if self.auth is not None else _READY
            self._enter(ok_state if st is Status.OK else _CLOSED)
        elif entry[0] is Op.AUTH:
            self._enter(_READY if st is Status.OK else _CLOSED)
        return parts

    def encode_auth(self, request_id: int) -> list[Buffer]:
        """The client's AUTH request, once the server's HELLO reply proved the server."""
        if self.auth is None or self._state is not _AUTHING or self.peer_hello is None:
            raise _Local(f"no AUTH to send in state {self._state.value}")
        return self.encode_request(Op.AUTH, request_id, payload=self._handshake.client_proof())

    def encode_write_batch(
        self, request_id: int, volume_id: str, epoch: int, batch: WriteBatch,
        *, fua: bool = False,
    ) -> list[Buffer]:
        """Frame a WRITE_BATCH as [header, table, data...] for ``transport.writelines`` (no
        copy of the data; ``batch`` was validated and checksummed once when built)."""
        if self.role is not m.Role.CLIENT:
            raise _Local("only a client sends requests")
        if self._state is not _READY:
            raise _Local(f"cannot send WRITE_BATCH in state {self._state.value}")
        vid = m.encode_volume_id(volume_id)
        if request_id in self._in_flight:
            raise _Local(f"request id {request_id} already in flight")
        if len(self._in_flight) >= self.max_in_flight:
            raise _Local("too many requests in flight")
        plen = len(batch.table) + batch.length
        if plen > self.max_payload:
            raise _Local(f"payload of {plen} bytes exceeds the maximum")
        flags = _FUA_FLAG if fua else 0
        pcrc = batch.crc
        if not self.payload_checksums:
            flags |= _NO_CRC
            pcrc = 0
        header = encode_header(
            Op.WRITE_BATCH, flags, request_id, epoch, 0, batch.length, plen, pcrc, 0, vid
        )
        self._in_flight[request_id] = (Op.WRITE_BATCH, 0)
        return [header, batch.table, *batch.data]
