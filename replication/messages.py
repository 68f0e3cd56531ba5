"""Vocabulary of the replication wire protocol: constants, enums, events, identifiers.

Owns: the limits both ends agree on, the op/flag/status numbering, the protocol errors, the
event dataclasses that ``replication.protocol.Connection`` yields and accepts, and the
validation of volume and node ids. What a frame looks like is ``replication.frames``; the
typed payloads are ``replication.payloads``; which fields each op may use is
``replication.op_rules``.
Must not: do I/O, keep connection state, read clocks, or import csi_driver, grpc or etcd;
renumber an enum member (they are on the wire; only add new ones).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import IntEnum, IntFlag

PROTOCOL_VERSION = 1

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


def valid_id(raw: bytes, limit: int) -> bool:
    """True if ``raw`` is 1..limit characters of [A-Za-z0-9_.-] (volume and node ids)."""
    return 0 < len(raw) <= limit and not raw.translate(None, _ID_CHARS)


# Cached: a node serves few volumes, and the hot path would otherwise re-validate each id.
@functools.lru_cache(maxsize=4096)
def encode_volume_id(volume_id: str) -> bytes:
    """Validated ASCII bytes of a volume id; raises LocalProtocolError if invalid."""
    raw = volume_id.encode("ascii", "replace")  # non-ASCII becomes "?", which is invalid
    if not valid_id(raw, MAX_VOLUME_ID):
        raise LocalProtocolError(f"invalid volume id {volume_id!r}")
    return raw


@functools.lru_cache(maxsize=4096)
def decode_volume_id(raw: bytes) -> str | None:
    """The volume id for wire bytes, or None if they are not a valid id."""
    return raw.decode("ascii") if valid_id(raw, MAX_VOLUME_ID) else None
