"""Unit and property tests for the sans-IO NBD server protocol (replication/nbd_codec.py,
nbd_negotiation.py, nbd_messages.py).

Byte strings are built here from the spec (reference/nbd-protocol.md), not from
the module's own encoders, so a shared misunderstanding cannot hide.
"""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replication import nbd_codec, nbd_messages
from replication.nbd_codec import NbdServerConnection, State
from replication.nbd_messages import (
    Disconnect,
    FlushRequest,
    HandshakeComplete,
    ProtocolError,
    ReadRequest,
    TrimRequest,
    WriteRequest,
    WriteZeroesRequest,
)

SIZE = 64 * 1024 * 1024
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
REPLY_MAGIC = 0x67446698
ERR = 1 << 31
# Transmission flags we must advertise: HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM,
# SEND_WRITE_ZEROES (bits 0, 2, 3, 5, 6).
BASE_TFLAGS = 0b1101101


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def go_data(name: bytes = b"", infos: tuple[int, ...] = ()) -> bytes:
    return (
        struct.pack(">I", len(name)) + name + struct.pack(f">H{len(infos)}H", len(infos), *infos)
    )


def option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split option replies into (option, reply type, payload)."""
    out, pos = [], 0
    while pos < len(data):
        magic, opt, rep, length = struct.unpack_from(">QIII", data, pos)
        assert magic == OPT_REPLY_MAGIC
        out.append((opt, rep, data[pos + 20 : pos + 20 + length]))
        pos += 20 + length
    return out


def request(cmd: int, handle: int, offset: int, length: int, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, handle, offset, length)


def write(handle: int, offset: int, payload: bytes, flags: int = 0) -> bytes:
    return request(1, handle, offset, len(payload), flags) + payload


def sent(conn: NbdServerConnection) -> bytes:
    return b"".join(bytes(p) for p in conn.data_to_send())


def simple_replies(data: bytes) -> list[tuple[int, int]]:
    """(error, handle) of header-only simple replies."""
    assert len(data) % 16 == 0
    out = []
    for pos in range(0, len(data), 16):
        magic, err, handle = struct.unpack_from(">IIQ", data, pos)
        assert magic == REPLY_MAGIC
        out.append((err, handle))
    return out


def ready(size: int = SIZE, *, block_size: bool = True, name: str = "") -> NbdServerConnection:
    conn = NbdServerConnection(size, name)
    conn.data_to_send()
    infos = (3,) if block_size else ()
    events = conn.receive_data(struct.pack(">I", 3) + option(7, go_data(name.encode(), infos)))
    assert events == [HandshakeComplete(name, block_size)]
    conn.data_to_send()
    return conn


# -- handshake ---------------------------------------------------------------


def test_greeting_is_fixed_newstyle_with_no_zeroes() -> None:
    conn = NbdServerConnection(SIZE)
    assert sent(conn) == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"
    assert conn.state is State.CLIENT_FLAGS


def test_unknown_client_flag_hangs_up() -> None:
    conn = NbdServerConnection(SIZE)
    events = conn.receive_data(struct.pack(">I", 4))
    assert isinstance(events[0], ProtocolError)
    assert conn.state is State.CLOSED
    assert conn.receive_data(b"anything") == []


def test_go_with_block_size_replies_export_block_size_name_ack() -> None:
    conn = NbdServerConnection(SIZE, "vol", multi_conn=True)
    conn.data_to_send()
    events = conn.receive_data(struct.pack(">I", 3) + option(7, go_data(b"vol", (3, 1))))
    assert events == [HandshakeComplete("vol", True)]
    assert conn.state is State.TRANSMISSION
    replies = option_replies(sent(conn))
    assert replies[-1] == (7, 1, b"")
    infos = {struct.unpack_from(">H", data)[0]: data[2:] for _o, rep, data in replies[:-1]}
    assert all(rep == 3 for _o, rep, _d in replies[:-1])
    assert infos[0] == struct.pack(">QH", SIZE, BASE_TFLAGS | 1 << 8)
    assert infos[3] == struct.pack(">III", 512, 4096, 32 * 1024 * 1024)
    assert infos[1] == b"vol"


def test_multi_conn_only_when_configured() -> None:
    assert NbdServerConnection(SIZE).transmission_flags == BASE_TFLAGS
    assert NbdServerConnection(SIZE, multi_conn=True).transmission_flags & (1 << 8)


def test_info_then_go_and_default_name() -> None:
    conn = NbdServerConnection(SIZE, "vol")
    conn.data_to_send()
    assert conn.receive_data(struct.pack(">I", 1) + option(6, go_data())) == []
    assert option_replies(sent(conn))[-1] == (6, 1, b"")
    assert conn.state is State.OPTIONS
    assert conn.receive_data(option(7, go_data())) == [HandshakeComplete("vol", False)]


@pytest.mark.parametrize(
    ("opt", "data", "expected"),
    [
        (7, go_data(b"other"), ERR + 6),  # unknown export
        (7, b"\x00\x00\x00\x09abc\x00\x00", ERR + 3),  # name longer than the data
        (7, go_data() + b"x", ERR + 3),  # trailing garbage
        (8, b"", ERR + 1),  # structured replies: we only do simple ones
        (9, b"", ERR + 1),  # LIST_META_CONTEXT
        (99, b"whatever", ERR + 1),  # unknown option
        (5, b"", ERR + 2),  # STARTTLS without TLS configured
        (3, b"x", ERR + 3),  # LIST takes no data
    ],
)
def test_refused_options_keep_negotiating(opt: int, data: bytes, expected: int) -> None:
    conn = NbdServerConnection(SIZE, "vol")
    conn.data_to_send()
    assert conn.receive_data(struct.pack(">I", 1) + option(opt, data)) == []
    [(o, rep, _msg)] = option_replies(sent(conn))
    assert (o, rep) == (opt, expected)
    assert conn.state is State.OPTIONS
    assert conn.receive_data(option(7, go_data(b"vol"))) == [HandshakeComplete("vol", False)]


def test_list_names_the_export() -> None:
    conn = NbdServerConnection(SIZE, "vol")
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", 1) + option(3))
    assert option_replies(sent(conn)) == [(3, 2, b"\x00\x00\x00\x03vol"), (3, 1, b"")]


def test_abort_acks_and_disconnects() -> None:
    conn = NbdServerConnection(SIZE)
    conn.data_to_send()
    events = conn.receive_data(struct.pack(">I", 1) + option(2))
    assert [type(e) for e in events] == [Disconnect]
    assert option_replies(sent(conn)) == [(2, 1, b"")]
    assert conn.state is State.CLOSED


@pytest.mark.parametrize(("client_flags", "tail"), [(3, b""), (1, bytes(124))])
def test_export_name_answers_size_flags_and_zeroes(client_flags: int, tail: bytes) -> None:
    conn = NbdServerConnection(SIZE, "vol")
    conn.data_to_send()
    events = conn.receive_data(struct.pack(">I", client_flags) + option(1, b"vol"))
    assert events == [HandshakeComplete("vol", False)]
    assert sent(conn) == struct.pack(">QH", SIZE, BASE_TFLAGS) + tail


def test_export_name_unknown_hangs_up() -> None:
    conn = NbdServerConnection(SIZE, "vol")
    conn.data_to_send()
    events = conn.receive_data(struct.pack(">I", 3) + option(1, b"nope"))
    assert isinstance(events[0], ProtocolError)
    assert sent(conn) == b""


@pytest.mark.parametrize(
    "header",
    [
        struct.pack(">QII", 0x1234, 7, 0),  # bad option magic
        struct.pack(">QII", IHAVEOPT, 99, 1 << 20),  # would make us buffer 1 MiB
    ],
)
def test_bad_option_header_hangs_up(header: bytes) -> None:
    conn = NbdServerConnection(SIZE)
    events = conn.receive_data(struct.pack(">I", 3) + header)
    assert isinstance(events[0], ProtocolError)


def test_handshake_split_byte_by_byte() -> None:
    conn = NbdServerConnection(SIZE)
    conn.data_to_send()
    stream = struct.pack(">I", 3) + option(7, go_data(b"", (3,))) + request(3, 9, 0, 0)
    events = [e for i in range(len(stream)) for e in conn.receive_data(stream[i : i + 1])]
    assert events == [HandshakeComplete("", True), FlushRequest(9)]


def test_min_block_is_one_when_size_is_not_a_multiple_of_512() -> None:
    assert NbdServerConnection(1000).min_block == 1
    assert NbdServerConnection(4096).min_block == 512


# -- transmission ------------------------------------------------------------


def test_batch_of_requests_in_one_chunk_zero_copy() -> None:
    conn = ready()
    chunk = (
        write(1, 4096, b"a" * 4096, flags=1)
        + request(0, 2, 0, 512)
        + request(3, 3, 0, 0)
        + request(4, 4, 8192, 4096)
        + request(6, 5, 0, 4096, flags=2)
        + write(6, 0, b"b" * 512)
    )
    events = conn.receive_data(chunk)
    assert events == [
        WriteRequest(1, 4096, b"a" * 4096, True),
        ReadRequest(2, 0, 512, 0),
        FlushRequest(3),
        TrimRequest(4, 8192, 4096, False),
        WriteZeroesRequest(5, 0, 4096, True, False),
        WriteRequest(6, 0, b"b" * 512, False),
    ]
    first = events[0]
    assert isinstance(first, WriteRequest) and isinstance(first.data, memoryview)
    assert first.data.obj is chunk  # a view into what we were given, not a copy
    assert sent(conn) == b""


def test_frames_split_anywhere_give_the_same_events() -> None:
    stream = write(1, 0, bytes(range(256)) * 16) + request(0, 2, 512, 1024)
    stream += write(3, 512, b"z" * 512)
    whole = ready().receive_data(stream)
    for cut in range(1, len(stream)):
        conn = ready()
        assert conn.receive_data(stream[:cut]) + conn.receive_data(stream[cut:]) == whole


@pytest.mark.parametrize(
    ("frame", "error"),
    [
        (request(0, 7, SIZE - 512, 1024), 22),  # read past the end: EINVAL
        (write(7, SIZE, b"x" * 512), 28),  # write past the end: ENOSPC
        (request(4, 7, SIZE, 512), 22),  # trim past the end: EINVAL
        (request(6, 7, SIZE - 512, 4096), 28),  # write zeroes past the end: ENOSPC
        (request(0, 7, 0, 32 * 1024 * 1024 + 512), 22),  # read above max payload
        (request(0, 7, 2**64 - 512, 1024), 22),  # offset + length overflows 64 bits
        (request(0, 7, 0, 512, flags=4), 22),  # DF without structured replies
        (request(6, 7, 0, 512, flags=16), 22),  # FAST_ZERO was not advertised
        (request(7, 7, 0, 512), 22),  # BLOCK_STATUS without meta contexts
        (request(42, 7, 0, 0), 22),  # unknown command
        (write(7, 100, b"x" * 512), 22),  # unaligned after negotiating block sizes
        (request(5, 7, 0, 4096), 0),  # CACHE: a hint, acknowledged without an event
    ],
)
def test_bad_requests_get_error_replies_and_parsing_continues(frame: bytes, error: int) -> None:
    conn = ready()
    assert conn.receive_data(frame + request(3, 8, 0, 0)) == [FlushRequest(8)]
    assert simple_replies(sent(conn)) == [(error, 7)]
    assert conn.state is State.TRANSMISSION


def test_unaligned_is_fine_without_block_size_negotiation() -> None:
    conn = ready(block_size=False)
    assert conn.receive_data(write(1, 100, b"x" * 3)) == [WriteRequest(1, 100, b"xxx", False)]


@pytest.mark.parametrize(
    "frame",
    [
        struct.pack(">IHHQQI", 0xDEADBEEF, 0, 0, 1, 0, 512),  # bad request magic
        request(1, 1, 0, 32 * 1024 * 1024 + 1),  # write payload above max: hang up
    ],
)
def test_protocol_errors_close_the_connection(frame: bytes) -> None:
    conn = ready()
    events = conn.receive_data(request(3, 1, 0, 0) + frame + request(3, 2, 0, 0))
    assert events[0] == FlushRequest(1)
    assert isinstance(events[1], ProtocolError) and len(events) == 2
    assert conn.state is State.CLOSED
    assert conn.receive_data(request(3, 3, 0, 0)) == []


def test_bad_magic_in_a_split_header() -> None:
    conn = ready()
    frame = struct.pack(">IHHQQI", 0xDEADBEEF, 0, 1, 1, 0, 4096)
    assert conn.receive_data(frame[:10]) == []
    assert isinstance(conn.receive_data(frame[10:])[0], ProtocolError)


def test_disconnect_stops_parsing() -> None:
    conn = ready()
    events = conn.receive_data(request(2, 0, 0, 0) + request(3, 1, 0, 0))
    assert [type(e) for e in events] == [Disconnect]
    assert conn.state is State.CLOSED


def test_reply_is_header_plus_uncopied_data() -> None:
    conn = ready()
    data = b"d" * 512
    header, payload = conn.reply(0x0102030405060708, 0, data)
    assert header == struct.pack(">IIQ", REPLY_MAGIC, 0, 0x0102030405060708)
    assert payload is data
    assert conn.reply(5, 5, data) == [struct.pack(">IIQ", REPLY_MAGIC, 5, 5)]
    assert conn.reply(5) == [struct.pack(">IIQ", REPLY_MAGIC, 0, 5)]


def test_constructor_rejects_bad_exports() -> None:
    with pytest.raises(ValueError):
        NbdServerConnection(-1)
    with pytest.raises(ValueError):
        NbdServerConnection(SIZE, "x" * 5000)


# -- properties --------------------------------------------------------------


@settings(max_examples=400)
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_arbitrary_bytes_during_handshake_never_raise(chunks: list[bytes]) -> None:
    conn = NbdServerConnection(SIZE)
    for chunk in chunks:
        conn.receive_data(chunk)
        conn.data_to_send()


@settings(max_examples=400)
@given(st.lists(st.binary(max_size=96), max_size=8), st.booleans())
def test_arbitrary_bytes_after_go_never_raise(chunks: list[bytes], magic: bool) -> None:
    conn = ready()
    for chunk in chunks:
        # Half the time start with a valid magic so parsing goes past the first check.
        data = struct.pack(">I", REQUEST_MAGIC) + chunk if magic else chunk
        for event in conn.receive_data(data):
            assert not isinstance(event, HandshakeComplete)
        conn.data_to_send()


_requests = st.one_of(
    st.builds(
        lambda h, o, n, f: write(h, o * 512, b"\x5a" * (n * 512), f),
        st.integers(0, 2**64 - 1), st.integers(0, 16), st.integers(0, 8), st.sampled_from([0, 1]),
    ),
    st.builds(
        lambda c, h, o, n, f: request(c, h, o * 512, n * 512, f),
        st.sampled_from([0, 3, 4, 5, 6, 42]), st.integers(0, 2**64 - 1),
        st.integers(0, 2**20), st.integers(0, 64), st.sampled_from([0, 1, 2, 8]),
    ),
)  # fmt: skip


def test_constants_match_the_spec() -> None:
    assert (nbd_messages.NBD_EINVAL, nbd_messages.NBD_ENOSPC, nbd_messages.NBD_EIO) == (22, 28, 5)
    assert nbd_messages.MAX_PAYLOAD == 32 * 1024 * 1024


def feed_buffered(conn: NbdServerConnection, stream: bytes, cuts: list[int]) -> list[object]:
    """Deliver ``stream`` as an asyncio.BufferedProtocol would: into get_buffer's buffer,
    never more than it offers, split at ``cuts`` too."""
    events: list[object] = []
    bounds = [0, *sorted(c % (len(stream) + 1) for c in cuts), len(stream)]
    for start, stop in itertools.pairwise(bounds):
        while start < stop:
            buf = conn.get_buffer(-1)
            assert len(buf) > 0
            n = min(len(buf), stop - start)
            buf[:n] = stream[start:start + n]
            start += n
            events += conn.buffer_updated(n)
    return events


_big_writes = st.builds(
    lambda h, o, n, f, b: write(h, o * 512, bytes([b]) * (n * 512), f),
    st.integers(0, 2**64 - 1), st.integers(0, 1 << 17), st.integers(100, 700),
    st.sampled_from([0, 1]), st.integers(0, 255),
)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(_requests, _big_writes), min_size=1, max_size=10), st.data(),
       st.booleans())
def test_any_chunking_of_a_request_stream_is_equivalent(
    frames: list[bytes], data: st.DataObject, buffered: bool
) -> None:
    """Cut anywhere, through receive_data or get_buffer/buffer_updated: the same events
    and replies as the whole stream at once."""
    stream = b"".join(frames)
    reference = ready()
    expected_events = reference.receive_data(stream)
    expected_replies = sent(reference)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    conn = ready()
    if buffered:
        events = feed_buffered(conn, stream, cuts)
    else:
        events = [e for start, stop in itertools.pairwise([0, *cuts, len(stream)])
                  for e in conn.receive_data(stream[start:stop])]
    assert events == expected_events
    assert sent(conn) == expected_replies
    assert len(events) + len(expected_replies) // 16 == len(frames)


def test_a_big_write_lands_in_a_buffer_of_its_own() -> None:
    conn = ready()
    payload = bytes(range(256)) * 1024  # 256 KiB: more than one read brings
    stream = write(1, 4096, payload) + request(3, 2, 0, 0) + write(3, SIZE, b"e" * 65536)
    events = feed_buffered(conn, stream, [100, 70_000])
    assert events == [WriteRequest(1, 4096, payload, False), FlushRequest(2)]
    data = events[0].data  # type: ignore[attr-defined]
    assert isinstance(data, memoryview) and data.readonly
    assert len(memoryview(data.obj)) == len(payload)
    assert simple_replies(sent(conn)) == [(28, 3)]  # the big write past the end: ENOSPC
    # Back to the scratch buffer once the payload is complete.
    assert len(conn.get_buffer(-1)) == nbd_codec.SCRATCH_SIZE
