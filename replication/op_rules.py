"""Which header fields and payload each replication op may carry, requests and replies.

Owns: the per-op rules, applied to requests both when we encode them (a bug on our side) and
when we decode them (the peer's); fields not listed must be 0, and responses have offset =
length = 0::

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
    AUTH          -       32-byte proof         -      (no volume id, no epoch)

"range" means offset + length must fit in u64. Error replies (status != OK) carry an
optional UTF-8 message of at most 1 KiB.
Must not: know connection state (handshake, request ids in flight: ``replication.protocol``)
or the frame layout (``replication.frames``); do I/O; import csi_driver, grpc or etcd.
"""

from __future__ import annotations

from replication.messages import (
    AUTH_PROOF_SIZE,
    MAX_ERROR_MESSAGE,
    U64_MAX,
    Buffer,
    Flag,
    Op,
    Status,
)
from replication.payloads import STAT_SIZE, ChecksumSpec, Hello, StatInfo, write_batch_entries

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
