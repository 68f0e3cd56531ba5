"""Property tests for the replication wire codec: round trips, garbage, mutated frames.

The default profile stays fast (300 examples per property); raise ``max_examples`` in
``FAST`` locally when touching the parser.
"""

from __future__ import annotations

import itertools
import struct
import zlib
from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replication.messages import (
    MAX_EPOCH,
    ChecksumAlgo,
    Event,
    Flag,
    Op,
    ProtocolErrorEvent,
    Request,
    Response,
    Role,
    Status,
)
from replication.payloads import ChecksumSpec, Hello, StatInfo, WriteBatch
from replication.protocol import Connection, State

U64 = (1 << 64) - 1
ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-"
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

u64 = st.integers(0, U64)
epochs = st.integers(0, MAX_EPOCH)  # above it a request is a protocol error (test_protocol)
vids = st.text(ID_CHARS, min_size=1, max_size=128)
batch_writes = st.binary(min_size=1, max_size=700).flatmap(
    lambda data: st.tuples(st.integers(0, U64 + 1 - len(data)), st.just(data))
)
specs = st.builds(
    ChecksumSpec, st.integers(9, 20).map(lambda n: 1 << n), st.sampled_from(ChecksumAlgo)
)


def handshake(checksums: bool = True) -> tuple[Connection, Connection]:
    client = Connection(Role.CLIENT, payload_checksums=checksums)
    server = Connection(Role.SERVER, payload_checksums=checksums)
    server.receive_data(client.send(Request(Op.HELLO, 0, payload=Hello("a").encode())))
    client.receive_data(server.send(Response(Op.HELLO, 0, payload=Hello("b").encode())))
    assert client.state is server.state is State.READY
    return client, server


@st.composite
def requests(draw: st.DrawFn, rid: int) -> Request:
    op = draw(st.sampled_from([op for op in Op if op not in (Op.HELLO, Op.AUTH)]))
    vid, epoch = draw(vids), draw(epochs)
    if op in (Op.FLUSH, Op.FENCE, Op.STAT):
        return Request(op, rid, vid, epoch)
    if op is Op.SETTLE:
        return Request(op, rid, vid, epoch, offset=draw(u64))
    if op is Op.WRITE_BATCH:
        batch = WriteBatch.build(draw(st.lists(batch_writes, min_size=1, max_size=6)))
        flags = draw(st.sampled_from([Flag.NONE, Flag.FUA]))
        return Request(op, rid, vid, epoch, 0, batch.length, flags, batch.payload())
    flags, payload = Flag.NONE, b""
    if op is Op.WRITE:
        payload = draw(st.binary(max_size=5000))
        length, flags = len(payload), draw(st.sampled_from([Flag.NONE, Flag.FUA]))
    elif op is Op.READ:
        length = draw(st.integers(0, 5000))
    elif op is Op.CHECKSUM:
        length, payload = draw(st.integers(0, 1 << 24)), draw(specs).encode()
    else:
        length = draw(st.integers(0, 0xFFFFFFFF))
        allowed = [Flag.NONE, Flag.FUA] + [Flag.NO_HOLE, Flag.FUA | Flag.NO_HOLE] * (
            op is Op.WRITE_ZEROES
        )
        flags = draw(st.sampled_from(allowed))
    # offset + length may reach 2**64 (the end is exclusive) but offset itself is a u64.
    offset = draw(st.integers(0, min(U64, U64 + 1 - length)))
    return Request(op, rid, vid, epoch, offset, length, flags, payload)


@st.composite
def responses(draw: st.DrawFn, req: Request) -> Response:
    status, epoch = draw(st.sampled_from(Status)), draw(u64)
    if status is not Status.OK:
        return Response(req.op, req.request_id, status, epoch, draw(st.binary(max_size=1024)))
    payload = b""
    if req.op is Op.READ:
        payload = draw(st.binary(min_size=req.length, max_size=req.length))
    elif req.op is Op.STAT:
        payload = StatInfo(draw(u64), draw(u64), draw(u64), draw(st.booleans())).encode()
    elif req.op is Op.CHECKSUM:
        size = ChecksumSpec.decode(req.payload).reply_size(req.length)
        payload = draw(st.binary(min_size=min(size, 64), max_size=64)) * (size // 64 + 1)
        payload = payload[:size]
    return Response(req.op, req.request_id, status, epoch, payload)


def feed(conn: Connection, wire: bytes, cuts: list[int], buffered: bool = False) -> list[Event]:
    """Deliver ``wire`` in pieces cut at ``cuts`` (positions, any order), as TCP might;
    ``buffered``: through get_buffer / buffer_updated, as an asyncio.BufferedProtocol."""
    bounds = sorted({0, len(wire), *(c % (len(wire) + 1) for c in cuts)})
    if not buffered:
        return [e for a, b in itertools.pairwise(bounds) for e in conn.receive_data(wire[a:b])]
    events: list[Event] = []
    for a, b in itertools.pairwise(bounds):
        chunk = memoryview(wire)[a:b]
        while chunk:
            buf = conn.get_buffer(-1)
            assert len(buf) > 0
            n = min(len(buf), len(chunk))
            buf[:n] = chunk[:n]
            chunk = chunk[n:]
            # Payload views die with the next get_buffer: keep copies, as a caller must.
            events += [detached(e) for e in conn.buffer_updated(n)]
    return events


def detached(event: Event) -> Event:
    if isinstance(event, Request | Response):
        return replace(event, payload=bytes(event.payload))
    return event


def check_invariants(conn: Connection, events: list[Event]) -> None:
    for i, event in enumerate(events):
        assert isinstance(event, Request | Response | ProtocolErrorEvent)
        if isinstance(event, ProtocolErrorEvent):
            assert i == len(events) - 1 and conn.state is State.CLOSED
    if conn.state is State.CLOSED:
        assert conn.receive_data(b"TDM1" + bytes(100)) == []


@FAST
@given(st.data(), st.lists(u64, min_size=1, max_size=12, unique=True), st.booleans(),
       st.booleans())
def test_round_trip_of_valid_events(
    data: st.DataObject, rids: list[int], crc: bool, buffered: bool
) -> None:
    client, server = handshake(crc)
    reqs = [data.draw(requests(rid)) for rid in rids]
    wire = b"".join(client.send(r) for r in reqs)
    cuts = data.draw(st.lists(st.integers(0, len(wire))))
    assert feed(server, wire, cuts, buffered) == reqs
    replies = [data.draw(responses(r)) for r in data.draw(st.permutations(reqs))]
    wire = b"".join(server.send(r) for r in replies)
    cuts = data.draw(st.lists(st.integers(0, len(wire))))
    assert feed(client, wire, cuts, buffered) == replies
    assert client.in_flight == server.in_flight == 0


garbage = st.one_of(st.binary(max_size=300), st.binary(max_size=300).map(lambda b: b"TDM1" + b))


@FAST
@given(st.lists(garbage, max_size=8), st.sampled_from(Role), st.booleans())
def test_arbitrary_bytes_never_raise(chunks: list[bytes], role: Role, ready: bool) -> None:
    conn = handshake()[role is Role.SERVER] if ready else Connection(role)
    if ready and role is Role.CLIENT:
        conn.send(Request(Op.READ, 1, "v", 1, 0, 16))
    events = [e for chunk in chunks for e in conn.receive_data(chunk)]
    check_invariants(conn, events)


def frame(fields: tuple[int, ...], vid: bytes, payload: bytes, good_crc: bool) -> bytes:
    """A frame with arbitrary header values but checksums that hold (unless told not to)."""
    op, flags, rid, epoch, offset, length, status = fields
    pcrc = zlib.crc32(payload) if good_crc and not flags & Flag.NO_PAYLOAD_CRC else 0
    head = (1, op, flags, rid, epoch, offset, length)
    body = struct.pack(">BBHQQQIIIBB", *head, len(payload), pcrc, status, len(vid))
    body += vid
    return b"TDM1" + struct.pack(">I", zlib.crc32(body)) + body + payload


header_fields = st.tuples(
    st.integers(0, 12),
    st.sampled_from([0, 1, 2, 3, 0x4000, 0x8000, 0x8001, 0xC000, 0x100]),
    st.integers(0, 3),
    u64,
    u64,
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 12),
)
frames = st.builds(
    frame,
    header_fields,
    st.one_of(st.binary(max_size=130), vids.map(str.encode)),
    st.binary(max_size=64),
    st.booleans(),
)


@FAST
@given(st.lists(frames, min_size=1, max_size=6), st.sampled_from(Role), st.booleans())
def test_well_checksummed_nonsense_never_raises(wire: list[bytes], role: Role, hello: bool) -> None:
    conn = handshake()[role is Role.SERVER] if hello else Connection(role)
    if hello and role is Role.CLIENT:
        for rid in range(4):
            conn.send(Request(Op.READ, rid, "v", 1, 0, rid * 8))
    check_invariants(conn, conn.receive_data(b"".join(wire)))


mutations = st.lists(
    st.tuples(st.sampled_from(["flip", "insert", "delete"]), u64, st.integers(1, 255)),
    min_size=1,
    max_size=3,
)


def mutate(wire: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(wire)
    for kind, where, value in edits:
        pos = where % (len(buf) + (kind == "insert"))
        if kind == "flip":
            buf[pos] ^= value
        elif kind == "insert":
            buf.insert(pos, value)
        else:
            del buf[pos]
    return bytes(buf)


@FAST
@given(st.data(), mutations, st.booleans(), st.booleans())
def test_mutated_write_is_never_delivered_corrupt(
    data: st.DataObject, edits: list[tuple[str, int, int]], crc: bool, buffered: bool
) -> None:
    client, server = handshake(crc)
    # Built directly: filtering generic requests for non-empty WRITEs rejects too many.
    payload = data.draw(st.binary(min_size=1, max_size=5000))
    req = Request(
        Op.WRITE, 7, data.draw(vids), data.draw(u64),
        data.draw(st.integers(0, U64 + 1 - len(payload))), len(payload),
        data.draw(st.sampled_from([Flag.NONE, Flag.FUA])), payload,
    )
    wire = mutate(client.send(req), edits)
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=3))
    events = feed(server, wire, cuts, buffered)
    check_invariants(server, events)
    for event in events:
        if isinstance(event, Request):
            # The header crc always guards the fields; the payload crc guards the data.
            assert event.op is Op.WRITE and event.request_id == 7
            assert (event.volume_id, event.epoch, event.offset) == (
                req.volume_id,
                req.epoch,
                req.offset,
            )
            assert event.length == req.length and event.flags == req.flags
            assert not crc or event.payload == req.payload


@FAST
@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=5), st.sampled_from(Role))
def test_splitting_never_changes_the_outcome(wire: bytes, cuts: list[int], role: Role) -> None:
    whole = handshake()[role is Role.SERVER]
    split = handshake()[role is Role.SERVER]
    wire = b"TDM1" + wire
    assert feed(split, wire, cuts) == whole.receive_data(wire)


@FAST
@given(
    st.builds(
        Hello,
        st.text(ID_CHARS, min_size=1, max_size=253),
        st.binary(max_size=4096),
        st.integers(1, 255),
    ),
    st.builds(StatInfo, u64, u64, u64, st.booleans()),
    specs,
)
def test_typed_payloads_round_trip(hello: Hello, stat: StatInfo, spec: ChecksumSpec) -> None:
    assert Hello.decode(hello.encode()) == hello
    assert StatInfo.decode(stat.encode()) == stat
    assert ChecksumSpec.decode(spec.encode()) == spec
