"""Vocabulary of the replication wire protocol: constants, enums, events, payload codecs.

Owns: the frame header ``Struct``, the op/flag/status numbering, the event dataclasses that
``replication.protocol.Connection`` yields and accepts, the typed payloads carried by HELLO,
STAT and CHECKSUM, and the per-op rules that say which header fields a valid request or
response may use. The byte layout of a frame is documented in ``replication.protocol``;
the rules per op (fields not listed must be 0; responses have offset = length = 0)::

    op            range   request payload       OK reply payload
    HELLO         -       Hello                 Hello (no volume id, no epoch on either)
    WRITE         yes     length bytes          -
    READ          yes     -                     length bytes
    FLUSH         -       -                     -
    TRIM          yes     -                     -
    WRITE_ZEROES  yes     -                     -
    FENCE         -       -                     -      (raises min epoch to ``epoch``)
    STAT          -       -                     StatInfo
    CHECKSUM      yes     ChecksumSpec          one digest per block
    SETTLE        offset  -                     -      (offset = settled sequence number)
    WRITE_BATCH   length  WriteBatch            -      (length = data bytes; offset 0)

"range" means offset + length must fit in u64. Error replies (status != OK) carry an
optional UTF-8 message of at most 1 KiB.
Must not: do I/O, keep connection state, read clocks, or import csi_driver, grpc or etcd;
renumber an enum member (they are on the wire; only add new ones).
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from replication.checksum import crc32

PROTOCOL_VERSION = 1
MAGIC = b"TDM1"
HEADER = struct.Struct("!4sIBBHQQQIIIBB")  # fields tabled in replication.protocol
HEADER_SIZE = HEADER.size
# The same header split at the crc, for encoding: crc32(body) must be known before the prefix.
HEADER_PREFIX = struct.Struct("!4sI")
HEADER_BODY = struct.Struct("!BBHQQQIIIBB")
HEADER_CRC_START = 8  # the header crc covers every header byte after itself

U64_MAX = (1 << 64) - 1
# Epochs are issued by etcd CAS one at a time and a real one never comes near this: a
# request above it is a protocol error, so no FENCE can exhaust the epoch space.
MAX_EPOCH = (1 << 48) - 1
MAX_VOLUME_ID = 128
MAX_NODE_ID = 253  # a Kubernetes node name is a DNS subdomain: at most 253 characters
MAX_TOKEN = 4096
# Before the handshake completes a peer is a stranger: its frames may carry this much at
# most (a HELLO with the longest node id and token fits), so a header announcing 32 MiB
# costs nothing but a closed connection.
HANDSHAKE_MAX_PAYLOAD = 4 + MAX_NODE_ID + 256
AUTH_PROOF_SIZE = 32
MAX_ERROR_MESSAGE = 1024
DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024
DEFAULT_MAX_IN_FLIGHT = 4096
MAX_BATCH_WRITES = 4096

Buffer = bytes | bytearray | memoryview


class LocalProtocolError(Exception):
    """Our own code misused the API (bad field, wrong state): a bug on this side."""


class RemoteProtocolError(Exception):
    """The peer sent something invalid; surfaced as a ProtocolErrorEvent, never raised out."""

    def __init__(self, reason: str, reply: bytes = b"") -> None:
        super().__init__(reason)
        self.reply = reply


class Role(IntEnum):
    CLIENT = 1
    SERVER = 2


class Op(IntEnum):
    HELLO = 1
    WRITE = 2
    READ = 3
    FLUSH = 4
    TRIM = 5
    WRITE_ZEROES = 6
    FENCE = 7
    STAT = 8
    CHECKSUM = 9
    SETTLE = 10
    WRITE_BATCH = 11  # many writes in one frame: the owner's per-tick batch
    AUTH = 12  # the client's proof, after the HELLO exchange (replication.peer_auth)


class Flag(IntFlag):
    NONE = 0
    FUA = 0x0001  # durable before the reply (WRITE, WRITE_BATCH, TRIM, WRITE_ZEROES)
    NO_HOLE = 0x0002  # WRITE_ZEROES must allocate, not punch a hole
    NO_PAYLOAD_CRC = 0x4000  # wire only: payload crc field is 0 and not checked
    REPLY = 0x8000  # wire only: the frame is a response


EVENT_FLAGS = Flag.FUA | Flag.NO_HOLE  # the rest are set by the codec, never by events
RESPONSE_WIRE_FLAGS = Flag.REPLY | Flag.NO_PAYLOAD_CRC


class Status(IntEnum):
    OK = 0
    EIO = 1
    ENOSPC = 2
    STALE_EPOCH = 3  # request epoch below the replica's fenced epoch
    NOT_FOUND = 4
    INVALID = 5
    UNSUPPORTED = 6
    AUTH_FAILED = 7
    BUSY = 8  # retryable, e.g. the replica is being rebuilt
    OUT_OF_RANGE = 9


class ChecksumAlgo(IntEnum):
    # CRC32 is cheap but a rebuild trusting it could miss 1 in 2**32 differing blocks and
    # leave replicas silently divergent; BLAKE2B_128 is for rebuild/verify decisions.
    CRC32 = 1
    BLAKE2B_128 = 2


DIGEST_SIZE = {ChecksumAlgo.CRC32: 4, ChecksumAlgo.BLAKE2B_128: 16}

# Dict lookups instead of Enum(value) calls: enum construction is slow on the hot path.
STATUSES: dict[int, Status] = {int(m): m for m in Status}
EVENT_FLAG_VALUES: dict[int, Flag] = {v: Flag(v) for v in range(int(EVENT_FLAGS) + 1)}


@dataclass(frozen=True, slots=True)
class Request:
    """A request frame. ``payload`` is bytes or a read-only memoryview; copy it to keep it."""

    op: Op
    request_id: int
    volume_id: str = ""
    epoch: int = 0
    offset: int = 0
    length: int = 0
    flags: Flag = Flag.NONE
    payload: Buffer = b""


@dataclass(frozen=True, slots=True)
class Response:
    """A response frame; ``epoch`` is the epoch the replica is fenced at (0 if unknown)."""

    op: Op
    request_id: int
    status: Status = Status.OK
    epoch: int = 0
    payload: Buffer = b""


@dataclass(frozen=True, slots=True)
class ProtocolErrorEvent:
    """The peer broke the protocol and the connection is closed; send ``reply`` if any
    (an AUTH_FAILED HELLO reply; a peer that sends garbage is not worth answering)."""

    reason: str
    reply: bytes = b""


Event = Request | Response | ProtocolErrorEvent

# The frozen __init__ sets each field through object.__setattr__ (~0.7 us per event); the
# slot descriptors called directly take half that, and the decoder makes ~100k events/s.
_new = object.__new__
_q0, _q1, _q2, _q3, _q4, _q5, _q6, _q7 = (vars(Request)[f].__set__ for f in Request.__slots__)
_r0, _r1, _r2, _r3, _r4 = (vars(Response)[f].__set__ for f in Response.__slots__)


def new_request(
    op: Op, rid: int, vid: str, epoch: int, off: int, length: int, flags: Flag, payload: Buffer
) -> Request:
    """``Request(...)`` with every field given, for the decoder's hot path."""
    req: Request = _new(Request)
    _q0(req, op)
    _q1(req, rid)
    _q2(req, vid)
    _q3(req, epoch)
    _q4(req, off)
    _q5(req, length)
    _q6(req, flags)
    _q7(req, payload)
    return req


def new_response(op: Op, rid: int, status: Status, epoch: int, payload: Buffer) -> Response:
    """``Response(...)`` with every field given, for the decoder's hot path."""
    rsp: Response = _new(Response)
    _r0(rsp, op)
    _r1(rsp, rid)
    _r2(rsp, status)
    _r3(rsp, epoch)
    _r4(rsp, payload)
    return rsp


_ID_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-"


def _valid_id(raw: bytes, limit: int) -> bool:
    return 0 < len(raw) <= limit and not raw.translate(None, _ID_CHARS)


# Cached: a node serves few volumes, and the hot path would otherwise re-validate each id.
@functools.lru_cache(maxsize=4096)
def encode_volume_id(volume_id: str) -> bytes:
    """Validated ASCII bytes of a volume id; raises LocalProtocolError if invalid."""
    raw = volume_id.encode("ascii", "replace")  # non-ASCII becomes "?", which is invalid
    if not _valid_id(raw, MAX_VOLUME_ID):
        raise LocalProtocolError(f"invalid volume id {volume_id!r}")
    return raw


@functools.lru_cache(maxsize=4096)
def decode_volume_id(raw: bytes) -> str | None:
    """The volume id for wire bytes, or None if they are not a valid id."""
    return raw.decode("ascii") if _valid_id(raw, MAX_VOLUME_ID) else None


_HELLO = struct.Struct("!BBH")


@dataclass(frozen=True, slots=True)
class Hello:
    """HELLO payload: u8 version, u8 node id length, u16 token length, node id, token.

    ``version`` is the highest version the sender speaks (HELLO frames are always in
    version 1 framing), so that a later version can negotiate down."""

    node_id: str
    token: bytes = b""
    version: int = PROTOCOL_VERSION

    def encode(self) -> bytes:
        node = self.node_id.encode("ascii", "replace")
        if not _valid_id(node, MAX_NODE_ID) or len(self.token) > MAX_TOKEN:
            raise ValueError("invalid HELLO node id or token")
        if not 1 <= self.version <= 255:
            raise ValueError("invalid HELLO version")
        return _HELLO.pack(self.version, len(node), len(self.token)) + node + self.token

    @classmethod
    def decode(cls, payload: Buffer) -> Hello:
        raw = bytes(payload)
        if len(raw) < _HELLO.size:
            raise ValueError("HELLO payload too short")
        version, node_len, token_len = _HELLO.unpack_from(raw)
        if len(raw) != _HELLO.size + node_len + token_len or token_len > MAX_TOKEN:
            raise ValueError("HELLO payload length mismatch")
        node = raw[_HELLO.size : _HELLO.size + node_len]
        if version < 1 or not _valid_id(node, MAX_NODE_ID):
            raise ValueError("invalid HELLO version or node id")
        return cls(node.decode("ascii"), raw[_HELLO.size + node_len :], version)


_STAT = struct.Struct("!QQQB")


@dataclass(frozen=True, slots=True)
class StatInfo:
    """STAT reply payload: u64 size, u64 fenced epoch, u64 generation, u8 dirty (0 or 1)."""

    size: int
    fenced_epoch: int
    generation: int
    dirty: bool

    def encode(self) -> bytes:
        return _STAT.pack(self.size, self.fenced_epoch, self.generation, int(self.dirty))

    @classmethod
    def decode(cls, payload: Buffer) -> StatInfo:
        if len(payload) != _STAT.size:
            raise ValueError("STAT payload length mismatch")
        size, epoch, generation, dirty = _STAT.unpack(payload)
        if dirty > 1:
            raise ValueError("STAT dirty byte must be 0 or 1")
        return cls(size, epoch, generation, bool(dirty))


STAT_SIZE = _STAT.size
_CHECKSUM = struct.Struct("!IB")


@dataclass(frozen=True, slots=True)
class ChecksumSpec:
    """CHECKSUM request payload: u32 block size (a power of two >= 512), u8 algorithm.

    The reply: one digest per block of [offset, offset+length), the last maybe short."""

    block_size: int
    algo: ChecksumAlgo = ChecksumAlgo.BLAKE2B_128

    def encode(self) -> bytes:
        return _CHECKSUM.pack(self.block_size, self.algo)

    @classmethod
    def decode(cls, payload: Buffer) -> ChecksumSpec:
        if len(payload) != _CHECKSUM.size:
            raise ValueError("CHECKSUM payload length mismatch")
        block_size, algo = _CHECKSUM.unpack(payload)
        if block_size < 512 or block_size & (block_size - 1):
            raise ValueError("CHECKSUM block size must be a power of two >= 512")
        if algo not in DIGEST_SIZE:
            raise ValueError("unknown CHECKSUM algorithm")
        return cls(block_size, ChecksumAlgo(algo))

    def reply_size(self, length: int) -> int:
        return -(-length // self.block_size) * DIGEST_SIZE[self.algo]


_BATCH_COUNT = struct.Struct("!I")
_BATCH_ENTRY = struct.Struct("!QI")


@dataclass(frozen=True, slots=True)
class WriteBatch:
    """WRITE_BATCH payload: u32 count, count x (u64 offset, u32 length), then the data of
    every entry in table order. The writes are applied in that order, as if sent one by one.

    Built once by the owner and framed for every replica: ``table`` and ``data`` go to
    ``transport.writelines`` as they are (no copy of the data), ``crc`` is computed once."""

    table: bytes
    offsets: tuple[int, ...]  # also in the table; kept for a local replica's pwrites
    data: tuple[Buffer, ...]
    length: int  # data bytes: the header's length field
    crc: int  # CRC-32 of the whole payload

    @classmethod
    def build(cls, writes: Sequence[tuple[int, Buffer]]) -> WriteBatch:
        """``writes``: (offset, data) pairs; raises ValueError if one cannot be framed."""
        if not 0 < len(writes) <= MAX_BATCH_WRITES:
            raise ValueError(f"a batch holds 1..{MAX_BATCH_WRITES} writes, not {len(writes)}")
        pack = _BATCH_ENTRY.pack
        try:
            table = _BATCH_COUNT.pack(len(writes)) + b"".join(
                [pack(offset, len(data)) for offset, data in writes])
        except struct.error as exc:
            raise ValueError(f"write not framable: {exc}") from None
        crc = crc32(table)
        length = 0
        for offset, data in writes:
            n = len(data)
            if not n or offset + n > U64_MAX + 1:
                raise ValueError("batch entries need data and must end within u64")
            length += n
            crc = crc32(data, crc)
        offsets, datas = zip(*writes, strict=True)
        return cls(table, offsets, datas, length, crc)

    def payload(self) -> bytes:
        """The payload in one piece (tests, and senders that want one buffer)."""
        return self.table + b"".join(self.data)


def write_batch_entries(payload: Buffer, length: int) -> list[tuple[int, int, int]]:
    """Decode a WRITE_BATCH payload to (offset, length, payload position of the data) per
    write; raises ValueError unless it is well formed and carries exactly ``length`` bytes."""
    if len(payload) < _BATCH_COUNT.size:
        raise ValueError("WRITE_BATCH payload too short")
    (count,) = _BATCH_COUNT.unpack_from(payload)
    start = _BATCH_COUNT.size + count * _BATCH_ENTRY.size
    if not 0 < count <= MAX_BATCH_WRITES or start + length != len(payload):
        raise ValueError("WRITE_BATCH table does not match its payload")
    entries = []
    pos = start
    for offset, n in _BATCH_ENTRY.iter_unpack(memoryview(payload)[_BATCH_COUNT.size:start]):
        if not n or offset + n > U64_MAX + 1:
            raise ValueError("WRITE_BATCH entry is empty or ends beyond u64")
        entries.append((offset, n, pos))
        pos += n
    if pos != len(payload):
        raise ValueError("WRITE_BATCH entry lengths do not add up to its length")
    return entries


def block_digests(data: Buffer, block_size: int, algo: ChecksumAlgo) -> bytes:
    """The CHECKSUM reply payload for ``data`` (both ends must agree on this definition)."""
    view = memoryview(data)
    blocks = (view[i : i + block_size] for i in range(0, len(view), block_size))
    if algo is ChecksumAlgo.CRC32:
        return b"".join(crc32(block).to_bytes(4, "big") for block in blocks)
    return b"".join(hashlib.blake2b(block, digest_size=16).digest() for block in blocks)


# Request shapes: which of offset/length/payload an op uses (the rest must be zero).
_HELLO_K, _NONE_K, _SEQ_K, _WRITE_K, _RANGE_K, _READ_K, _CHECKSUM_K, _BATCH_K, _AUTH_K = range(9)
_FUA = int(Flag.FUA)
_REQUEST_RULES: dict[int, tuple[Op, int, int]] = {  # flags as ints: IntFlag ops are slow
    Op.HELLO: (Op.HELLO, 0, _HELLO_K),
    Op.WRITE: (Op.WRITE, _FUA, _WRITE_K),
    Op.READ: (Op.READ, 0, _READ_K),
    Op.FLUSH: (Op.FLUSH, 0, _NONE_K),
    Op.TRIM: (Op.TRIM, _FUA, _RANGE_K),
    Op.WRITE_ZEROES: (Op.WRITE_ZEROES, _FUA | int(Flag.NO_HOLE), _RANGE_K),
    Op.FENCE: (Op.FENCE, 0, _NONE_K),
    Op.STAT: (Op.STAT, 0, _NONE_K),
    Op.CHECKSUM: (Op.CHECKSUM, 0, _CHECKSUM_K),
    Op.SETTLE: (Op.SETTLE, 0, _SEQ_K),
    Op.WRITE_BATCH: (Op.WRITE_BATCH, _FUA, _BATCH_K),
    Op.AUTH: (Op.AUTH, 0, _AUTH_K),
}


def check_request(
    op: int,
    flags: int,
    vid: str | bytes,
    epoch: int,
    offset: int,
    length: int,
    payload: Buffer,
    max_payload: int,
) -> tuple[Op, int]:
    """Validate a request (``flags`` without wire bits); raises ValueError with the reason.

    Returns the op and the payload length an OK reply must have (-1: checked by decoding)."""
    rule = _REQUEST_RULES.get(op)
    if rule is None:
        raise ValueError(f"unknown op {op}")
    member, allowed, kind = rule
    if flags & ~allowed:
        raise ValueError(f"flags {flags:#x} not allowed on {member.name}")
    if kind == _HELLO_K:
        if vid or epoch or offset or length:
            raise ValueError("HELLO carries no volume id, epoch, offset or length")
        Hello.decode(payload)
        return member, -1
    if kind == _AUTH_K:
        if vid or epoch or offset or length or len(payload) != AUTH_PROOF_SIZE:
            raise ValueError(f"AUTH carries exactly a {AUTH_PROOF_SIZE}-byte proof")
        return member, 0
    if not vid:
        raise ValueError(f"{member.name} needs a volume id")
    plen, expected = len(payload), 0
    if kind == _WRITE_K:
        if plen != length:
            raise ValueError("WRITE length differs from its payload length")
    elif kind == _BATCH_K:
        if offset:
            raise ValueError("WRITE_BATCH carries its offsets in the payload")
        write_batch_entries(payload, length)
        return member, 0
    elif kind == _CHECKSUM_K:
        expected = ChecksumSpec.decode(payload).reply_size(length)
        if expected > max_payload:
            raise ValueError("CHECKSUM reply would exceed the maximum payload")
    elif plen:
        raise ValueError(f"{member.name} carries no payload")
    if kind == _NONE_K:
        if offset or length:
            raise ValueError(f"{member.name} carries no offset or length")
        return member, STAT_SIZE if member is Op.STAT else 0
    if kind == _SEQ_K:
        if length:
            raise ValueError("SETTLE carries its sequence number in offset, no length")
        return member, 0
    if offset + length > U64_MAX + 1:
        raise ValueError("offset + length overflows u64")
    if kind == _READ_K and length > max_payload:
        raise ValueError("READ length exceeds the maximum payload")
    return member, length if kind == _READ_K else expected


def check_response(op: Op, status: Status, payload: Buffer, expected: int) -> None:
    """Validate a response payload against its request; raises ValueError with the reason."""
    if status is not Status.OK:
        if len(payload) > MAX_ERROR_MESSAGE:
            raise ValueError("error message too long")
    elif expected >= 0:
        if len(payload) != expected:
            raise ValueError(f"{op.name} reply payload is {len(payload)} bytes, not {expected}")
        if op is Op.STAT:
            StatInfo.decode(payload)
    else:
        Hello.decode(payload)
