"""Typed payloads of the replication wire protocol: HELLO, STAT, CHECKSUM and WRITE_BATCH.

Owns: the byte layout of each payload that has one (encode, and a decode that raises
ValueError on anything malformed), and ``block_digests``, the one definition of a CHECKSUM
reply that both ends compute. The frame around a payload is ``replication.frames``; which
op carries which payload is ``replication.op_rules``.
Must not: do I/O, keep connection state, or import csi_driver, grpc or etcd.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from replication.checksum import crc32
from replication.messages import (
    DIGEST_SIZE,
    MAX_BATCH_WRITES,
    MAX_NODE_ID,
    MAX_TOKEN,
    PROTOCOL_VERSION,
    U64_MAX,
    Buffer,
    ChecksumAlgo,
    valid_id,
)

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
        if not valid_id(node, MAX_NODE_ID) or len(self.token) > MAX_TOKEN:
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
        if version < 1 or not valid_id(node, MAX_NODE_ID):
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
