"""Unit tests for the replication wire codec (replication/protocol.py, frames.py, op_rules.py,
payloads.py, messages.py).

Malformed frames are built here with their own struct format from the layout table in the
frames docstring, not with the module's encoder, so a shared mistake cannot hide.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from replication.messages import (
    MAX_BATCH_WRITES,
    MAX_EPOCH,
    ChecksumAlgo,
    Event,
    Flag,
    LocalProtocolError,
    Op,
    ProtocolErrorEvent,
    Request,
    Response,
    Role,
    Status,
)
from replication.payloads import (
    ChecksumSpec,
    Hello,
    StatInfo,
    WriteBatch,
    block_digests,
    write_batch_entries,
)
from replication.peer_auth import PeerAuth
from replication.protocol import Connection, State

VID = "pvc-1"
U64 = (1 << 64) - 1
DATA = bytes(range(256)) * 16
HELLO_A = Hello("a").encode()
BATCH = WriteBatch.build([(0, DATA), (1 << 40, DATA[:512])])


HEADER_DEFAULTS: dict[str, Any] = {"flags": 0, "epoch": 1, "offset": 0, "length": 0, "status": 0}
WIRE_DEFAULTS: dict[str, Any] = {"magic": b"TDM1", "version": 1, "pcrc": None, "hcrc_delta": 0}


def raw_frame(op: int, rid: int = 1, vid: bytes = VID.encode(), **kw: Any) -> bytes:
    """A frame built from the layout table; keywords override header fields or break it."""
    f = HEADER_DEFAULTS | WIRE_DEFAULTS | {"payload": b""} | kw
    payload = f["payload"]
    pcrc = zlib.crc32(payload) if f["pcrc"] is None else f["pcrc"]
    head = (f["version"], op, f["flags"], rid, f["epoch"], f["offset"], f["length"])
    body = struct.pack(">BBHQQQIIIBB", *head, len(payload), pcrc, f["status"], len(vid)) + vid
    hcrc = (zlib.crc32(body) + f["hcrc_delta"]) & 0xFFFFFFFF
    return bytes(f["magic"] + struct.pack(">I", hcrc) + body + payload)


def hello_frame(payload: bytes, vid: bytes = b"") -> bytes:
    return raw_frame(Op.HELLO, vid=vid, epoch=0, payload=payload)


def handshake(**kwargs: object) -> tuple[Connection, Connection]:
    """A connected client/server pair: the in-memory ``pair()`` of these tests."""
    client = Connection(Role.CLIENT, **kwargs)  # type: ignore[arg-type]
    server = Connection(Role.SERVER, **kwargs)  # type: ignore[arg-type]
    hello = Request(Op.HELLO, 0, payload=Hello("node-a", b"tok").encode())
    assert server.receive_data(client.send(hello)) == [hello]
    reply = Response(Op.HELLO, 0, payload=Hello("node-b").encode())
    assert client.receive_data(server.send(reply)) == [reply]
    assert client.state is server.state is State.READY
    assert server.peer_hello == Hello("node-a", b"tok") and client.peer_hello == Hello("node-b")
    return client, server


def assert_protocol_error(conn: Connection, events: list[Event], reason: str = "") -> None:
    assert events, "expected a ProtocolErrorEvent"
    err = events[-1]
    assert isinstance(err, ProtocolErrorEvent), events
    assert reason in err.reason
    assert all(not isinstance(e, ProtocolErrorEvent) for e in events[:-1])
    assert conn.state is State.CLOSED
    assert conn.receive_data(raw_frame(Op.FLUSH, rid=99)) == []
    with pytest.raises(LocalProtocolError):
        conn.send(Response(Op.FLUSH, 99) if conn.role is Role.SERVER else Request(Op.FLUSH, 99))


def op_cases() -> list[tuple[Request, Response]]:
    Q, P, ZEROES = Request, Response, Op.WRITE_ZEROES
    crc32 = ChecksumAlgo.CRC32
    digests = block_digests(DATA, 512, crc32)
    stale = P(Op.WRITE, 11, Status.STALE_EPOCH, 9, b"fenced at 9")
    return [
        (Q(Op.WRITE, 1, VID, 7, 8192, 4096, Flag.FUA, DATA), P(Op.WRITE, 1, epoch=7)),
        (Q(Op.READ, 2, VID, 7, 0, 4096), P(Op.READ, 2, Status.OK, 7, DATA)),
        (Q(Op.FLUSH, 3, VID, 7), P(Op.FLUSH, 3, epoch=7)),
        (Q(Op.TRIM, 4, VID, 7, 0, 1 << 20), P(Op.TRIM, 4)),
        (Q(ZEROES, 5, VID, 7, 4096, 8192, Flag.FUA | Flag.NO_HOLE), P(ZEROES, 5, epoch=7)),
        (Q(Op.FENCE, 6, VID, 9), P(Op.FENCE, 6, epoch=9)),
        (Q(Op.STAT, 7, VID, 9), P(Op.STAT, 7, epoch=9, payload=StatInfo(1, 7, 3, True).encode())),
        (
            Q(Op.CHECKSUM, 8, VID, 9, 0, 4096, payload=ChecksumSpec(512, crc32).encode()),
            P(Op.CHECKSUM, 8, payload=digests),
        ),
        (Q(Op.SETTLE, 9, VID, 9, offset=123456), P(Op.SETTLE, 9, epoch=9)),
        (Q(Op.WRITE, 10, VID, 7, 0, 4096, payload=DATA), P(Op.WRITE, 10, Status.EIO)),
        (Q(Op.WRITE, 11, VID, 6, 0, 4096, payload=DATA), stale),
        (Q(Op.WRITE_BATCH, 12, VID, 7, 0, BATCH.length, Flag.FUA, BATCH.payload()),
         P(Op.WRITE_BATCH, 12, epoch=7)),
    ]


@pytest.mark.parametrize("checksums", [True, False])
@pytest.mark.parametrize(("request_", "response"), op_cases(), ids=lambda x: str(x)[:30])
def test_round_trip_every_op(request_: Request, response: Response, checksums: bool) -> None:
    client, server = handshake(payload_checksums=checksums)
    assert server.receive_data(client.send(request_)) == [request_]
    assert server.in_flight == client.in_flight == 1
    assert client.receive_data(server.send(response)) == [response]
    assert server.in_flight == client.in_flight == 0


def test_many_frames_in_one_buffer() -> None:
    client, server = handshake()
    pages = [DATA[i:] + DATA[:i] for i in range(500)]
    reqs = [Request(Op.WRITE, i, VID, 1, i << 12, 4096, payload=p) for i, p in enumerate(pages)]
    events = server.receive_data(b"".join(client.send(r) for r in reqs))
    assert events == reqs
    replies = [Response(Op.WRITE, r.request_id) for r in reqs]
    assert client.receive_data(b"".join(server.send(r) for r in replies)) == replies


def test_frames_split_at_every_byte_boundary() -> None:
    client, _ = handshake()
    reqs = [
        Request(Op.WRITE, 1, VID, 1, 0, 4096, payload=DATA),
        Request(Op.FLUSH, 2, VID, 1),
        Request(Op.READ, 3, "v" * 128, 1, 0, 512),
    ]
    wire = b"".join(client.send(r) for r in reqs)
    for cut in range(len(wire) + 1):
        conn = handshake()[1]
        assert conn.receive_data(wire[:cut]) + conn.receive_data(wire[cut:]) == reqs
    conn = handshake()[1]
    events = [e for i in range(len(wire)) for e in conn.receive_data(wire[i : i + 1])]
    assert events == reqs


def receive_buffered(conn: Connection, wire: bytes, step: int) -> list[Request]:
    """Feed ``wire`` through get_buffer/buffer_updated at most ``step`` bytes at a time,
    keeping copies of the payloads (the views die with the next get_buffer)."""
    out: list[Request] = []
    pos = 0
    while pos < len(wire):
        buf = conn.get_buffer(-1)
        n = min(len(buf), step, len(wire) - pos)
        buf[:n] = wire[pos:pos + n]
        pos += n
        for ev in conn.buffer_updated(n):
            assert isinstance(ev, Request), ev
            out.append(replace(ev, payload=bytes(ev.payload)))
    return out


def test_buffered_receive_splits_grows_and_shrinks() -> None:
    client, _ = handshake()
    big = bytes(range(256)) * 4096 * 5  # 5 MiB: more than the buffer keeps between frames
    reqs = [
        Request(Op.WRITE, 1, VID, 1, 0, 4096, payload=DATA),
        Request(Op.WRITE, 2, VID, 1, 0, len(big), payload=big),
        Request(Op.FLUSH, 3, VID, 1),
        Request(Op.WRITE, 4, VID, 1, 8192, 4096, payload=DATA),
    ]
    wire = b"".join(client.send(r) for r in reqs)
    for step in (1, 7, 4096, 65536, len(wire)):
        server = handshake()[1]
        assert receive_buffered(server, wire, step) == reqs, step
        # Back to its everyday size once the big frame is consumed, never empty.
        assert 0 < len(server.get_buffer(-1)) <= 4 << 20
    server = handshake()[1]
    cut = len(wire) - 100
    assert receive_buffered(server, wire[:cut], 1 << 20) == reqs[:3]
    assert_protocol_error(server, server.receive_eof(), "mid-frame")
    assert len(server.get_buffer(-1)) > 0 and server.buffer_updated(10) == []


def test_buffered_receive_yields_views_without_copying() -> None:
    client, server = handshake()
    buf = server.get_buffer(-1)
    wire = client.send(Request(Op.WRITE, 1, VID, 1, 0, 4096, payload=DATA))
    buf[:len(wire)] = wire
    (event,) = server.buffer_updated(len(wire))
    assert isinstance(event, Request) and isinstance(event.payload, memoryview)
    assert event.payload.readonly and event.payload == DATA
    assert event.payload.obj is buf.obj  # a view into the receive buffer itself


def test_request_ids_echoed_out_of_order() -> None:
    client, server = handshake()
    reqs = [Request(Op.FLUSH, rid, VID, 1) for rid in (5, 1 << 63, 17)]
    server.receive_data(b"".join(client.send(r) for r in reqs))
    replies = [Response(Op.FLUSH, rid) for rid in (17, 5, 1 << 63)]
    assert client.receive_data(b"".join(server.send(r) for r in replies)) == replies


def test_zero_copy_payload_from_bytes_and_copy_from_bytearray() -> None:
    client, server = handshake()
    wire = client.send(Request(Op.WRITE, 1, VID, 1, 0, 4096, payload=DATA))
    (event,) = server.receive_data(wire)
    assert isinstance(event, Request) and isinstance(event.payload, memoryview)
    assert event.payload.readonly and event.payload == DATA
    buf = bytearray(client.send(Request(Op.WRITE, 2, VID, 1, 0, 4096, payload=DATA)))
    (event,) = server.receive_data(buf)
    buf[:] = bytes(len(buf))  # the caller reuses its receive buffer
    assert isinstance(event, Request) and event.payload == DATA and event.request_id == 2


def test_encode_request_returns_buffers_without_copying_payload() -> None:
    client, _ = handshake()
    payload = memoryview(bytearray(DATA))
    parts = client.encode_request(Op.WRITE, 1, VID, 1, 0, 4096, Flag.NONE, payload)
    assert len(parts) == 2 and parts[1] is payload


def test_precomputed_payload_crc() -> None:
    client, server = handshake()
    crc = zlib.crc32(DATA)
    parts = client.encode_request(Op.WRITE, 1, VID, 1, 0, 4096, 0, DATA, payload_crc=crc)
    assert server.receive_data(b"".join(parts)) == [
        Request(Op.WRITE, 1, VID, 1, 0, 4096, payload=DATA)
    ]
    parts = client.encode_request(Op.WRITE, 2, VID, 1, 0, 4096, 0, DATA, payload_crc=crc ^ 1)
    assert_protocol_error(server, server.receive_data(b"".join(parts)), "payload checksum")


def test_write_batch_framed_without_copying_and_decoded_in_order() -> None:
    client, server = handshake()
    pages = [memoryview(bytearray(DATA[i:] + DATA[:i])) for i in range(3)]
    writes = [(8192, pages[0]), (0, pages[1][:100]), (8192, pages[2])]  # order matters
    batch = WriteBatch.build(writes)
    parts = client.encode_write_batch(5, VID, 7, batch)
    assert parts[2] is pages[0] and parts[4] is pages[2]  # data goes out as given
    (event,) = server.receive_data(b"".join(parts))
    assert isinstance(event, Request) and event.op is Op.WRITE_BATCH
    assert event.length == 4096 * 2 + 100 and event.offset == 0
    entries = write_batch_entries(event.payload, event.length)
    assert [(o, n) for o, n, _ in entries] == [(8192, 4096), (0, 100), (8192, 4096)]
    got = [bytes(event.payload[pos:pos + n]) for _, n, pos in entries]
    assert got == [bytes(d) for _, d in writes]
    assert event.payload == batch.payload() and zlib.crc32(batch.payload()) == batch.crc


@pytest.mark.parametrize(
    "writes",
    [[], [(0, b"")], [(U64, b"ab")], [(1 << 64, b"a")], [(-1, b"a")],
     [(0, b"a")] * (MAX_BATCH_WRITES + 1)],
    ids=["none", "empty data", "past u64", "offset beyond u64", "negative", "too many"],
)
def test_write_batch_build_refuses_unframable(writes: list[tuple[int, bytes]]) -> None:
    with pytest.raises(ValueError):
        WriteBatch.build(writes)


def test_write_batch_bounds_and_state_on_the_sending_side() -> None:
    client, _ = handshake(max_payload=8192)
    with pytest.raises(LocalProtocolError, match="exceeds"):
        client.encode_write_batch(1, VID, 1, WriteBatch.build([(0, bytes(8192))]))
    assert client.in_flight == 0
    client.encode_write_batch(1, VID, 1, WriteBatch.build([(0, DATA)]))
    with pytest.raises(LocalProtocolError, match="already in flight"):
        client.encode_write_batch(1, VID, 1, WriteBatch.build([(0, DATA)]))
    with pytest.raises(LocalProtocolError, match="state"):
        Connection(Role.CLIENT).encode_write_batch(1, VID, 1, WriteBatch.build([(0, DATA)]))
    _, server = handshake()
    with pytest.raises(LocalProtocolError, match="client"):
        server.encode_write_batch(1, VID, 1, WriteBatch.build([(0, DATA)]))


def test_hello_required_first() -> None:
    client = Connection(Role.CLIENT)
    with pytest.raises(LocalProtocolError):
        client.send(Request(Op.FLUSH, 1, VID, 1))
    client.send(Request(Op.HELLO, 1, payload=HELLO_A))
    with pytest.raises(LocalProtocolError):  # must wait for the HELLO reply
        client.send(Request(Op.FLUSH, 2, VID, 1))
    server = Connection(Role.SERVER)
    assert_protocol_error(server, server.receive_data(raw_frame(Op.FLUSH)), "not allowed")
    server = Connection(Role.SERVER)
    hello = hello_frame(HELLO_A)
    events = server.receive_data(hello + raw_frame(Op.FLUSH, rid=2))
    assert isinstance(events[0], Request)
    assert_protocol_error(server, events, "not allowed")


@pytest.mark.parametrize("token", [b"", b"bad", b"n" * 31])
def test_stranger_hello_gets_auth_failed_then_close(token: bytes) -> None:
    client = Connection(Role.CLIENT)
    server = Connection(Role.SERVER, auth=PeerAuth(b"k" * 32, "node-b"))
    hello = Request(Op.HELLO, 1, payload=Hello("a", token).encode())
    events = server.receive_data(client.send(hello))
    assert_protocol_error(server, events, "authentication required")
    err = events[-1]
    assert isinstance(err, ProtocolErrorEvent)
    (reply,) = client.receive_data(err.reply)
    assert isinstance(reply, Response) and reply.status is Status.AUTH_FAILED
    assert client.state is State.CLOSED


def test_epoch_beyond_any_issued_is_a_protocol_error() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    server.receive_data(client.send(Request(Op.HELLO, 1, payload=HELLO_A)))
    client.receive_data(server.send(Response(Op.HELLO, 1, Status.OK, payload=HELLO_A)))
    ok = server.receive_data(client.send(Request(Op.FENCE, 2, "vol-1", MAX_EPOCH)))
    assert [type(e) for e in ok] == [Request]
    events = server.receive_data(client.send(Request(Op.FENCE, 3, "vol-1", MAX_EPOCH + 1)))
    assert_protocol_error(server, events, "beyond any the state store issues")


def test_server_rejecting_hello_closes_both() -> None:
    client = Connection(Role.CLIENT)
    server = Connection(Role.SERVER)
    server.receive_data(client.send(Request(Op.HELLO, 1, payload=HELLO_A)))
    wire = server.send(Response(Op.HELLO, 1, Status.UNSUPPORTED, payload=b"too old"))
    assert server.state is State.CLOSED
    assert client.receive_data(wire) == [Response(Op.HELLO, 1, Status.UNSUPPORTED, 0, b"too old")]
    assert client.state is State.CLOSED


def ck(block_size: int, algo: int, length: int = 1) -> bytes:
    return raw_frame(Op.CHECKSUM, length=length, payload=struct.pack(">IB", block_size, algo))


def batch_frame(count: int, entries: list[tuple[int, int]], data: bytes,
                length: int | None = None) -> bytes:
    table = struct.pack(">I", count) + b"".join(struct.pack(">QI", o, n) for o, n in entries)
    return raw_frame(Op.WRITE_BATCH, length=len(data) if length is None else length,
                     payload=table + data)


REPLY = int(Flag.REPLY)
NO_CRC = int(Flag.NO_PAYLOAD_CRC)
SERVER_GARBAGE = [
    ("bad magic", raw_frame(Op.FLUSH, magic=b"TDM0"), "bad magic"),
    ("bad version", raw_frame(Op.FLUSH, version=2), "version"),
    ("bad header crc", raw_frame(Op.FLUSH, hcrc_delta=1), "header checksum"),
    ("bad payload crc", raw_frame(Op.WRITE, length=3, payload=b"abc", pcrc=1), "payload checksum"),
    ("reserved flag", raw_frame(Op.FLUSH, flags=0x0100), "not allowed"),
    ("FUA on READ", raw_frame(Op.READ, flags=1, length=1), "not allowed"),
    ("unknown op", raw_frame(200), "unknown op"),
    ("op zero", raw_frame(0), "unknown op"),
    ("volume id too long", raw_frame(Op.FLUSH, vid=b"v" * 129), "invalid volume id"),
    ("volume id bad char", raw_frame(Op.FLUSH, vid=b"pvc/1"), "invalid volume id"),
    ("volume id not ascii", raw_frame(Op.FLUSH, vid="pvé".encode()), "invalid volume id"),
    ("no volume id", raw_frame(Op.FLUSH, vid=b""), "needs a volume id"),
    ("offset+length overflow", raw_frame(Op.TRIM, offset=U64, length=2), "overflows"),
    ("write length mismatch", raw_frame(Op.WRITE, length=2, payload=b"abc"), "differs"),
    ("read with payload", raw_frame(Op.READ, length=3, payload=b"abc"), "no payload"),
    ("read too long", raw_frame(Op.READ, length=(32 << 20) + 1), "exceeds"),
    ("flush with offset", raw_frame(Op.FLUSH, offset=1), "no offset"),
    ("settle with length", raw_frame(Op.SETTLE, offset=1, length=1), "no length"),
    ("status on request", raw_frame(Op.FLUSH, status=1), "status"),
    ("reply to a server", raw_frame(Op.FLUSH, vid=b"", flags=REPLY), "response frame"),
    ("crc and NO_CRC", raw_frame(Op.WRITE, flags=NO_CRC, length=1, payload=b"a", pcrc=7), "set"),
    ("crc without payload", raw_frame(Op.FLUSH, pcrc=7), "checksum set"),
    ("checksum block size", ck(1000, 1), "power of two"),
    ("checksum algorithm", ck(512, 9), "algorithm"),
    ("checksum reply too big", ck(512, 2, length=1 << 31), "exceed"),
    ("batch without writes", batch_frame(0, [], b""), "does not match"),
    ("batch count beyond table", batch_frame(3, [(0, 2)], b"ab"), "does not match"),
    ("batch lengths short", batch_frame(2, [(0, 1), (9, 2)], b"abcd"), "add up"),
    ("batch lengths long", batch_frame(1, [(0, 5)], b"abcd"), "add up"),
    ("batch empty entry", batch_frame(2, [(0, 0), (0, 4)], b"abcd"), "empty"),
    ("batch entry overflow", batch_frame(1, [(U64, 2)], b"ab"), "beyond u64"),
    ("batch length field", batch_frame(1, [(0, 4)], b"abcd", length=3), "does not match"),
    ("batch with offset", raw_frame(Op.WRITE_BATCH, offset=4096, length=1,
                                    payload=struct.pack(">IQI", 1, 0, 1) + b"a"), "offsets"),
    ("batch too short", raw_frame(Op.WRITE_BATCH, length=0, payload=b"ab"), "too short"),
    ("duplicate request id", raw_frame(Op.FLUSH) + raw_frame(Op.FLUSH), "already in flight"),
    ("hello once ready", hello_frame(HELLO_A), "not allowed"),
]


@pytest.mark.parametrize(
    ("wire", "reason"), [pytest.param(*c[1:], id=c[0]) for c in SERVER_GARBAGE]
)
def test_server_rejects_malformed_frames(wire: bytes, reason: str) -> None:
    server = handshake()[1]
    assert_protocol_error(server, server.receive_data(wire), reason)


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (hello_frame(b"\x01\x01"), "too short"),
        (hello_frame(b"\x01\x00\x00\x00"), "node id"),
        (hello_frame(b"\x00\x01\x00\x00a"), "version"),
        (hello_frame(b"\x01\x01\x00\x05a"), "mismatch"),
        (hello_frame(HELLO_A, vid=b"pvc-1"), "HELLO carries no"),
        (raw_frame(Op.HELLO, vid=b"", epoch=3, payload=HELLO_A), "HELLO carries no"),
    ],
)
def test_malformed_hello(wire: bytes, reason: str) -> None:
    server = Connection(Role.SERVER)
    assert_protocol_error(server, server.receive_data(wire), reason)


def test_configured_bounds() -> None:
    client, server = handshake(max_payload=8192, max_in_flight=2)
    with pytest.raises(LocalProtocolError):
        client.send(Request(Op.WRITE, 1, VID, 1, 0, 8193, payload=bytes(8193)))
    wire = raw_frame(Op.WRITE, length=8193, payload=bytes(8193))
    assert_protocol_error(server, server.receive_data(wire), "exceeds the maximum")
    client, server = handshake(max_in_flight=2)
    wire = b"".join(raw_frame(Op.FLUSH, rid) for rid in (1, 2, 3))
    assert_protocol_error(server, server.receive_data(wire), "too many")
    client.send(Request(Op.FLUSH, 1, VID))
    client.send(Request(Op.FLUSH, 2, VID))
    with pytest.raises(LocalProtocolError, match="too many"):
        client.send(Request(Op.FLUSH, 3, VID))


def reply_frame(op: int, rid: int, **kw: object) -> bytes:
    kw.setdefault("flags", REPLY)
    return raw_frame(op, rid, vid=b"", epoch=0, **kw)


CLIENT_GARBAGE = [
    ("unknown request id", reply_frame(Op.FLUSH, 9), "unknown request id"),
    ("op mismatch", reply_frame(Op.FENCE, 1), "answers"),
    ("unknown status", reply_frame(Op.FLUSH, 1, status=200), "unknown status"),
    ("read reply length", reply_frame(Op.READ, 2, payload=b"x" * 511), "not 512"),
    ("request to a client", reply_frame(Op.FLUSH, 1, flags=0), "request frame"),
    ("reply with offset", reply_frame(Op.FLUSH, 1, offset=1), "reserved"),
    ("reply with volume id", raw_frame(Op.FLUSH, 1, flags=REPLY), "reserved"),
    ("reply with FUA", reply_frame(Op.FLUSH, 1, flags=REPLY | 1), "reserved"),
    ("error text too long", reply_frame(Op.FLUSH, 1, status=1, payload=b"e" * 1025), "too long"),
    ("stat dirty byte", reply_frame(Op.STAT, 3, payload=struct.pack(">QQQB", 1, 1, 1, 2)), "dirty"),
    ("stat reply length", reply_frame(Op.STAT, 3, payload=b"x"), "not 25"),
]


@pytest.mark.parametrize(
    ("wire", "reason"), [pytest.param(*c[1:], id=c[0]) for c in CLIENT_GARBAGE]
)
def test_client_rejects_malformed_responses(wire: bytes, reason: str) -> None:
    client, _ = handshake()
    client.send(Request(Op.FLUSH, 1, VID))
    client.send(Request(Op.READ, 2, VID, 1, 0, 512))
    client.send(Request(Op.STAT, 3, VID))
    assert_protocol_error(client, client.receive_data(wire), reason)


def test_client_rejects_data_before_hello() -> None:
    client = Connection(Role.CLIENT)
    assert_protocol_error(client, client.receive_data(reply_frame(Op.HELLO, 0)), "unknown request")


def test_eof_mid_frame_and_clean_eof() -> None:
    server = handshake()[1]
    assert server.receive_data(raw_frame(Op.FLUSH)[:10]) == []
    assert server.receive_data(b"") == []  # an empty read is not EOF
    assert_protocol_error(server, server.receive_eof(), "mid-frame")
    server = handshake()[1]
    assert server.receive_eof() == []
    assert server.state is State.CLOSED


def test_valid_frames_before_garbage_are_delivered() -> None:
    server = handshake()[1]
    events = server.receive_data(raw_frame(Op.FLUSH, 1) + b"garbage" * 10)
    assert events[0] == Request(Op.FLUSH, 1, VID, 1)
    assert_protocol_error(server, events, "bad magic")


@pytest.mark.parametrize(
    "request_",
    [
        Request(Op.WRITE, 1, VID, 1, 0, 3, payload=b"ab"),
        Request(Op.WRITE, 1, "bad/id", 1, 0, 0),
        Request(Op.WRITE, 1, "é", 1, 0, 0),
        Request(Op.FLUSH, 1, ""),
        Request(Op.READ, 1, VID, 1, 0, 1, Flag.FUA),
        Request(Op.READ, 1, VID, 1, 0, 1, Flag.REPLY),
        Request(Op.WRITE, 1, VID, 1, 0, 1, Flag.NO_PAYLOAD_CRC, b"a"),
        Request(Op.TRIM, 1, VID, 1, U64, 2),
        Request(Op.FLUSH, -1, VID),
        Request(Op.FLUSH, 1 << 64, VID),
        Request(Op.FENCE, 1, VID, 1 << 64),
        Request(Op.HELLO, 1, payload=b"nope"),
        Request(99, 1, VID),  # type: ignore[arg-type]
        Request(Op.WRITE, 1, VID, 1, 0, 1, payload=memoryview(b"abcd").cast("I")),
    ],
    ids=str,
)
def test_local_misuse_raises(request_: Request) -> None:
    client, _ = handshake()
    with pytest.raises(LocalProtocolError):
        client.send(request_)
    assert client.state is State.READY and client.in_flight == 0


def test_local_response_misuse_raises() -> None:
    client, server = handshake()
    wrong: list[Callable[[], object]] = [
        lambda: server.send(Response(Op.FLUSH, 1)),  # nothing in flight
        lambda: server.send(Request(Op.FLUSH, 1, VID)),  # servers do not send requests
        lambda: client.send(Response(Op.FLUSH, 1)),
        lambda: client.send(ProtocolErrorEvent("x")),
        lambda: server.send(Response(Op.READ, 1, payload=b"short")),
        lambda: server.send(Response(Op.WRITE, 1)),
        lambda: server.send(Response(Op.READ, 1, 77)),  # type: ignore[arg-type]
        lambda: server.send(Response(Op.READ, 1, Status.EIO, payload=bytes(1025))),
    ]
    server.receive_data(client.send(Request(Op.READ, 1, VID, 1, 0, 512)))
    for call in wrong:
        with pytest.raises(LocalProtocolError):
            call()
    server.send(Response(Op.READ, 1, Status.EIO, payload=b"disk on fire"))
    server.close()
    with pytest.raises(LocalProtocolError):
        server.send(Response(Op.READ, 1))
