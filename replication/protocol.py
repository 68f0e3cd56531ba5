"""Sans-IO codec of the replication wire protocol: bytes in, events out; events in, bytes out.

Owns: framing, checksums, bounds, the HELLO handshake and the request/response bookkeeping
of one connection (``Connection``). Must not: touch sockets, asyncio, clocks or threads, or
import csi_driver, grpc or etcd. The transport feeds ``receive_data`` and writes what the
``encode_*`` methods return; deadlines and retries belong to the caller.

Frame (big-endian, 50-byte fixed header, ``messages.HEADER``)::

    off  size  field         meaning
    0    4     magic         b"TDM1"
    4    4     header_crc    CRC-32 (zlib's) of bytes [8, 50 + vid_len): all after itself
    8    1     version       1
    9    1     op            messages.Op
    10   2     flags         FUA 0x1, NO_HOLE 0x2, NO_PAYLOAD_CRC 0x4000, REPLY 0x8000
    12   8     request_id    chosen by the client, echoed by the response
    20   8     epoch         request: owner's epoch; response: replica's fenced epoch
    28   8     offset        byte offset (SETTLE: the settled sequence number)
    36   4     length        byte count of the range
    40   4     payload_len   <= max_payload (default 32 MiB)
    44   4     payload_crc   CRC-32 of the payload; 0 if NO_PAYLOAD_CRC or empty
    48   1     status        messages.Status; 0 on requests
    49   1     vid_len       0..128; 0 on HELLO and on every response
    50   n     volume_id     ASCII [A-Za-z0-9_.-]
    50+n p     payload

Which fields each op uses is tabled in ``replication.messages``. Before HELLO only HELLO
is allowed; the client sends nothing else until the HELLO reply says OK. With a ``PeerAuth``
(``replication.peer_auth``) the handshake is mutual challenge-response: HELLO carries the
nonces and the server's proof, then the client's AUTH carries its proof, and only the AUTH
reply makes both sides READY. Until then a frame's payload is bounded by
``HANDSHAKE_MAX_PAYLOAD`` and the receive buffer stays a few KiB: a stranger costs nothing
but a closed connection. Any violation by the peer yields one ``ProtocolErrorEvent`` and
closes the connection; misuse by our caller raises ``LocalProtocolError``.
"""

from __future__ import annotations

import struct
from enum import Enum
from typing import Any

from replication import messages as m
from replication.checksum import crc32
from replication.messages import HEADER_SIZE, MAGIC, Buffer, Event, Op, Request, Response, Status
from replication.peer_auth import MAC_SIZE, NONCE_SIZE, PeerAuth

__all__ = ["Connection", "State"]

_NO_CRC = int(m.Flag.NO_PAYLOAD_CRC)
_FUA_FLAG = int(m.Flag.FUA)
_REPLY = int(m.Flag.REPLY)
_EVENT_FLAGS = int(m.EVENT_FLAGS)
_FLAG_VALUES = m.EVENT_FLAG_VALUES
_STATUSES = m.STATUSES
_RESPONSE_FLAGS = int(m.RESPONSE_WIRE_FLAGS)
_unpack_header = m.HEADER.unpack_from
_pack_body = m.HEADER_BODY.pack
_pack_prefix = m.HEADER_PREFIX.pack
_crc32 = crc32
_new_request = m.new_request
_new_response = m.new_response
_CRC_FROM = m.HEADER_CRC_START
_VERSION = m.PROTOCOL_VERSION
_Remote = m.RemoteProtocolError
_Local = m.LocalProtocolError
_HANDSHAKE_MAX = m.HANDSHAKE_MAX_PAYLOAD
_MAX_EPOCH = m.MAX_EPOCH


_RBUF_MIN = 256 << 10  # the receive buffer's smallest size, and the most a read may ask for
_RBUF_HANDSHAKE = 4 << 10  # the same before the peer is authenticated
_RBUF_KEEP = 4 << 20  # kept between frames; a bigger one is for one big frame only


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
        self.peer_hello: m.Hello | None = None
        self.auth = auth
        self._nonces: tuple[bytes, bytes] = (b"", b"")  # (client's, server's) of the handshake
        self._hello_node = ""  # the node id our own HELLO named
        self._state = _AWAIT
        self._buf = bytearray()  # only ever the one frame split across receive_data calls
        self._need = HEADER_SIZE  # bytes of the pending frame needed before parsing again
        # get_buffer / buffer_updated: received bytes live in [_rpos, _rend) of _rbuf.
        self._rbuf = bytearray(0)
        self._rpos = self._rend = 0
        # request id -> (op, OK reply payload length or -1): checks replies, catches ids
        # that are unsolicited or reused while in flight, bounds the pipeline.
        self._in_flight: dict[int, tuple[Op, int]] = {}
        # A plain function, not a bound method: a bound method stored on self is a
        # reference cycle, and a closed connection's buffers then wait for the cyclic GC.
        server = role is m.Role.SERVER
        self._on_frame = Connection._on_request if server else Connection._on_response

    @property
    def state(self) -> State:
        return self._state

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def peer_node(self) -> str | None:
        """The peer's node id once the handshake is done (authenticated when ``auth``)."""
        hello = self.peer_hello
        return hello.node_id if hello is not None and self._state is _READY else None

    def close(self) -> None:
        """Stop: later receive_data returns [] and sends raise LocalProtocolError."""
        self._state = _CLOSED
        # Fresh ones: a traceback may still pin the old ones' views; the memory goes now.
        self._buf = bytearray()
        self._rbuf = bytearray(0)
        self._rpos = self._rend = 0
        self._in_flight.clear()

    def receive_eof(self) -> list[Event]:
        """The peer closed its side: an error if it stopped mid-frame; closes either way."""
        # close() empties both, so a closed connection has none
        pending = bool(self._buf) or self._rend > self._rpos
        self.close()
        return [m.ProtocolErrorEvent("peer closed mid-frame")] if pending else []

    def receive_data(self, data: Buffer) -> list[Event]:
        """Parse every complete frame in ``data`` (plus what was buffered)."""
        if self._state is _CLOSED or not data:
            return []
        # Events may point into immutable bytes; a caller may reuse other buffers: copy once.
        view = memoryview(data if type(data) is bytes else bytes(data))
        events: list[Event] = []
        try:
            start = self._complete_pending(view, events) if self._buf else 0
            if start >= 0:
                pos = self._parse(view, start, False, events)
                if pos < len(view) and self._state is not _CLOSED:
                    self._buf += view[pos:]
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
        buf = self._rbuf
        pending = self._rend - self._rpos
        # The whole pending frame must fit behind its start: move it to the front, or
        # grow into a new buffer (never resize in place: old views may still be exported).
        # > pending: there is always room to receive; a stranger gets a few KiB at most.
        need = max(self._need, _RBUF_MIN if self._state is _READY else _RBUF_HANDSHAKE)
        if self._rpos and (not pending or len(buf) - self._rpos < need):
            buf[:pending] = buf[self._rpos : self._rend]
            self._rpos, self._rend = 0, pending
        if need > len(buf) or (not pending and len(buf) > _RBUF_KEEP):
            new = bytearray(max(need, min(2 * len(buf), _RBUF_KEEP)))
            new[:pending] = buf[self._rpos : self._rend]
            self._rbuf = buf = new
            self._rpos, self._rend = 0, pending
        return memoryview(buf)[self._rend :]

    def buffer_updated(self, nbytes: int) -> list[Event]:
        """``nbytes`` were written into the last ``get_buffer``: the events they complete.
        Payloads are read-only views into the buffer, valid until the next get_buffer."""
        self._rend += nbytes
        if self._state is _CLOSED:
            self._rpos = self._rend = 0
            return []
        events: list[Event] = []
        try:
            view = memoryview(self._rbuf)[: self._rend].toreadonly()
            self._rpos = self._parse(view, self._rpos, False, events)
        except _Remote as exc:
            events.append(m.ProtocolErrorEvent(str(exc), exc.reply))
            self.close()
        if self._rpos == self._rend:
            self._rpos = self._rend = 0
        return events

    def _complete_pending(self, view: memoryview, events: list[Event]) -> int:
        """Feed the buffered partial frame from ``view``; bytes of view used, or -1 if all."""
        buf = self._buf
        used = 0
        while True:
            take = self._need - len(buf)
            if take > len(view) - used:
                buf += view[used:]
                return -1
            buf += view[used : used + take]
            used += take
            with memoryview(buf) as bmv:
                done = self._parse(bmv, 0, True, events)
            if done:  # the frame is complete (or the peer's HELLO reject closed us)
                buf.clear()
                return used

    def _parse(self, mv: memoryview, pos: int, copy: bool, events: list[Event]) -> int:
        """Append events for complete frames from ``pos``; returns where the rest starts."""
        end = len(mv)
        on_frame = self._on_frame
        while self._state is not _CLOSED:
            if end - pos < HEADER_SIZE:
                self._need = HEADER_SIZE
                return pos
            header = _unpack_header(mv, pos)
            magic, hcrc, ver, _, flags, _, _, _, _, plen, pcrc, _, vlen = header
            if magic != MAGIC:
                raise _Remote("bad magic")
            hend = pos + HEADER_SIZE + vlen
            if hend > end:
                self._need = HEADER_SIZE + vlen
                return pos
            if _crc32(mv[pos + _CRC_FROM : hend]) != hcrc:
                raise _Remote("bad header checksum")
            if ver != _VERSION:
                raise _Remote(f"unsupported protocol version {ver}")
            if plen > self.max_payload:
                raise _Remote(f"payload of {plen} bytes exceeds the maximum")
            if plen > _HANDSHAKE_MAX and self._state is not _READY:
                raise _Remote(f"payload of {plen} bytes before the handshake completed")
            fend = hend + plen
            if fend > end:
                self._need = fend - pos
                return pos
            payload: Buffer = b""
            if plen:
                payload = mv[hend:fend]
                if not flags & _NO_CRC and _crc32(payload) != pcrc:
                    raise _Remote("bad payload checksum")
                if copy:
                    payload = payload.tobytes()
            if pcrc and (not plen or flags & _NO_CRC):
                raise _Remote("payload checksum set without a checked payload")
            vid = mv[pos + HEADER_SIZE : hend].tobytes() if vlen else b""
            events.append(on_frame(self, header, vid, payload))
            pos = fend
        return pos

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
            member, expected = m.check_request(op, flags, vid, epoch, offset, length, payload, lim)
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
            m.check_response(member, st, payload, expected)
        except ValueError as exc:
            raise _Remote(str(exc)) from None
        if member is Op.HELLO:
            self._finish_hello(st, payload)
        elif member is Op.AUTH:
            self._state = _READY if st is Status.OK else _CLOSED
        return _new_response(member, rid, st, epoch, payload)

    def _reject(self, op: Op, rid: int, reason: str) -> None:
        reply = self._frame(op, _REPLY, rid, 0, 0, 0, Status.AUTH_FAILED, b"", reason.encode(),
                            None)
        raise _Remote(reason, b"".join(reply))

    def _accept_hello(self, rid: int, payload: Buffer) -> None:
        hello = m.Hello.decode(payload)  # already validated by check_request
        if self.auth is not None:
            if len(hello.token) != NONCE_SIZE:
                self._reject(Op.HELLO, rid, "authentication required")
            self._nonces = (hello.token, self.auth.nonce())
        self.peer_hello = hello
        self._state = _PENDING

    def _accept_auth(self, rid: int, payload: Buffer) -> None:
        assert self.auth is not None and self.peer_hello is not None  # _STATE_FOR_OP
        nonce_c, nonce_s = self._nonces
        if not self.auth.verify(bytes(payload), "client", self.peer_hello.node_id,
                                self.auth.node_id, nonce_c, nonce_s):
            self._reject(Op.AUTH, rid, "authentication failed")

    def _finish_hello(self, status: Status, payload: Buffer) -> None:
        if status is not Status.OK:
            self._state = _CLOSED  # the Response still reaches the caller, saying why
            return
        hello = m.Hello.decode(payload)
        if self.auth is not None:
            token, nonce_c = hello.token, self._nonces[0]
            nonce_s, proof = token[:NONCE_SIZE], token[NONCE_SIZE:]
            if len(token) != NONCE_SIZE + MAC_SIZE or not self.auth.verify(
                    proof, "server", self._hello_node, hello.node_id, nonce_c, nonce_s):
                raise _Remote(f"replica server {hello.node_id!r} failed to authenticate")
            self._nonces = (nonce_c, nonce_s)
            self.peer_hello = hello
            self._state = _AUTHING  # the caller sends encode_auth() next
            return
        self.peer_hello = hello
        self._state = _READY

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
            # Our HELLO is ours to make: the nonce must be fresh and the node id ours.
            nonce = self.auth.nonce()
            payload = m.Hello(self.auth.node_id, nonce).encode()
            self._nonces, self._hello_node = (nonce, b""), self.auth.node_id
        vid = m.encode_volume_id(volume_id) if volume_id else b""
        flags = int(flags)  # Flag arithmetic runs in Python; plain ints in C
        lim = self.max_payload
        try:
            member, expected = m.check_request(op, flags, vid, epoch, offset, length, payload, lim)
        except ValueError as exc:
            raise _Local(str(exc)) from None
        if request_id in self._in_flight:
            raise _Local(f"request id {request_id} already in flight")
        if len(self._in_flight) >= self.max_in_flight:
            raise _Local("too many requests in flight")
        parts = self._frame(
            member, flags, request_id, epoch, offset, length, 0, vid, payload, payload_crc
        )
        self._in_flight[request_id] = (member, expected)
        if member is Op.HELLO:
            self._state = _PENDING
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
            nonce_c, nonce_s = self._nonces
            assert self.peer_hello is not None
            proof = self.auth.mac("server", self.peer_hello.node_id, self.auth.node_id,
                                  nonce_c, nonce_s)
            payload = m.Hello(self.auth.node_id, nonce_s + proof).encode()
        try:
            m.check_response(entry[0], st, payload, entry[1])
        except ValueError as exc:
            raise _Local(str(exc)) from None
        parts = self._frame(entry[0], _REPLY, request_id, epoch, 0, 0, st, b"", payload, None)
        del self._in_flight[request_id]
        if entry[0] is Op.HELLO:
            ok_state = _AUTHING if self.auth is not None else _READY
            self._state = ok_state if st is Status.OK else _CLOSED
        elif entry[0] is Op.AUTH:
            self._state = _READY if st is Status.OK else _CLOSED
        return parts

    def encode_auth(self, request_id: int) -> list[Buffer]:
        """The client's AUTH request, once the server's HELLO reply proved the server."""
        if self.auth is None or self._state is not _AUTHING or self.peer_hello is None:
            raise _Local(f"no AUTH to send in state {self._state.value}")
        nonce_c, nonce_s = self._nonces
        proof = self.auth.mac("client", self.auth.node_id, self.peer_hello.node_id,
                              nonce_c, nonce_s)
        return self.encode_request(Op.AUTH, request_id, payload=proof)

    def encode_write_batch(
        self, request_id: int, volume_id: str, epoch: int, batch: m.WriteBatch,
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
        header = self._header(
            Op.WRITE_BATCH, flags, request_id, epoch, 0, batch.length, plen, pcrc, 0, vid
        )
        self._in_flight[request_id] = (Op.WRITE_BATCH, 0)
        return [header, batch.table, *batch.data]

    def _frame(
        self,
        op: int,
        flags: int,
        rid: int,
        epoch: int,
        offset: int,
        length: int,
        status: int,
        vid: bytes,
        payload: Buffer,
        payload_crc: int | None,
    ) -> list[Buffer]:
        if type(payload) is memoryview and payload.itemsize != 1:
            raise _Local("payload must be a buffer of bytes (memoryview.cast('B'))")
        plen = len(payload)
        if plen > self.max_payload:
            raise _Local(f"payload of {plen} bytes exceeds the maximum")
        if not plen:
            pcrc = 0
        elif not self.payload_checksums:
            flags |= _NO_CRC
            pcrc = 0
        else:
            pcrc = _crc32(payload) if payload_crc is None else payload_crc
        header = self._header(op, flags, rid, epoch, offset, length, plen, pcrc, status, vid)
        return [header, payload] if plen else [header]

    @staticmethod
    def _header(op: int, flags: int, rid: int, epoch: int, offset: int, length: int,
                plen: int, pcrc: int, status: int, vid: bytes) -> bytes:
        try:
            fields = (op, flags, rid, epoch, offset, length, plen, pcrc, status, len(vid))
            body = _pack_body(_VERSION, *fields) + vid
        except struct.error as exc:
            raise _Local(f"header field out of range: {exc}") from None
        return _pack_prefix(MAGIC, _crc32(body)) + body
