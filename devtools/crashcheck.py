"""Crash-consistency model for failover: self-describing blocks, a writer log, a checker.

Pure logic (no I/O), shared by the failover benchmark and the fault tests.

- **Block format** (4 KiB): magic, writer id, block index, sequence number, payload, and a
  crc32 of everything before it. A writer id names one writer (one owner's writer threads),
  independent of the volume's epoch, so a block read back says *who* wrote it, *where* it
  was meant to go and *which* write it was; the crc tells a torn or garbled block.
- **Writer log** (``WriterLog``): every write as issued (writer, block, sequence, payload
  digest, issue time), completed (ack time, or failure time) or still in flight, plus the
  takeover point and which writers belong to the old owner.
- **Checker** (``check``): reads every block back and proves
  1. every acknowledged write is present: a block holds its last acknowledged value or a
     value that may legitimately have replaced it (a write not finished before that ack
     was issued);
  2. no block holds a value that was never written (torn, garbled, misplaced, unknown);
  3. no write the old owner issued after the takeover is present, and the old owner
     acknowledged nothing after the takeover.

Time is one monotonic clock of the process that drives the writers and the takeover.
"""

from __future__ import annotations

import enum
import hashlib
import math
import struct
import threading
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

BLOCK_SIZE = 4096
MAGIC = b"TNDMCC01"
_HEADER = struct.Struct("<8sQQQ")  # magic, writer id, block index, sequence number
_CRC = struct.Struct("<I")
PAYLOAD_SIZE = BLOCK_SIZE - _HEADER.size - _CRC.size
_ZERO_BLOCK = bytes(BLOCK_SIZE)


class CorruptBlockError(ValueError):
    """A block that is neither blank nor a well-formed block of this format."""


@dataclass(frozen=True)
class BlockHeader:
    """What a well-formed block says about itself."""

    writer: int
    block: int
    seq: int
    digest: int


def payload_digest(payload: bytes) -> int:
    """The log's checksum of a payload (64-bit BLAKE2b: collisions are not a concern)."""
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little")


def encode_block(writer: int, block: int, seq: int, payload: bytes) -> bytes:
    if len(payload) != PAYLOAD_SIZE:
        raise ValueError(f"payload must be {PAYLOAD_SIZE} bytes, got {len(payload)}")
    body = _HEADER.pack(MAGIC, writer, block, seq) + payload
    return body + _CRC.pack(zlib.crc32(body))


def decode_block(data: bytes) -> BlockHeader | None:
    """None for a blank (all-zero) block; CorruptBlockError for anything not well-formed."""
    if len(data) != BLOCK_SIZE:
        raise CorruptBlockError(f"block is {len(data)} bytes, not {BLOCK_SIZE}")
    if data == _ZERO_BLOCK:
        return None
    magic, writer, block, seq = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CorruptBlockError(f"bad magic {magic!r}")
    (crc,) = _CRC.unpack_from(data, BLOCK_SIZE - _CRC.size)
    if zlib.crc32(data[: BLOCK_SIZE - _CRC.size]) != crc:
        raise CorruptBlockError(f"crc mismatch (writer {writer:#x}, seq {seq}): torn block")
    payload = data[_HEADER.size : BLOCK_SIZE - _CRC.size]
    return BlockHeader(writer, block, seq, payload_digest(payload))


@dataclass
class WriteRecord:
    """One write as the writer saw it. ``completed`` is None while it is in flight."""

    writer: int
    block: int
    seq: int
    digest: int
    issued: float
    completed: float | None = None
    acked: bool = False


class WriterLog:
    """Every write issued, with its outcome, and the takeover point. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._writes: dict[tuple[int, int], WriteRecord] = {}
        self.takeover_at: float | None = None
        self.old_writers: frozenset[int] = frozenset()

    def issue(self, writer: int, block: int, seq: int, digest: int, now: float) -> WriteRecord:
        record = WriteRecord(writer, block, seq, digest, issued=now)
        with self._lock:
            if (writer, seq) in self._writes:
                raise ValueError(f"writer {writer:#x} reused sequence number {seq}")
            self._writes[(writer, seq)] = record
        return record

    def complete(self, record: WriteRecord, now: float, acked: bool) -> None:
        with self._lock:
            record.completed = now
            record.acked = acked

    def mark_takeover(self, now: float, old_writers: Iterable[int]) -> None:
        """From ``now`` on, the writers in ``old_writers`` must have no visible effect."""
        with self._lock:
            self.takeover_at = now
            self.old_writers = frozenset(old_writers)

    def writes(self) -> list[WriteRecord]:
        with self._lock:
            return list(self._writes.values())

    def find(self, writer: int, seq: int) -> WriteRecord | None:
        with self._lock:
            return self._writes.get((writer, seq))

    def acked(self, writer: int | None = None) -> list[WriteRecord]:
        return [w for w in self.writes() if w.acked and writer in (None, w.writer)]


class ViolationKind(enum.Enum):
    LOST_ACK = "lost-ack"  # an acknowledged value is gone (an older one, or blank, is there)
    CORRUPT = "corrupt"  # torn, garbled, or a well-formed block at the wrong index
    NEVER_WRITTEN = "never-written"  # well-formed, but no such write was ever issued
    STALE_WRITE = "stale-write"  # the old owner's write issued after the takeover is visible
    LATE_ACK = "late-ack"  # the old owner acknowledged a write after the takeover


@dataclass(frozen=True)
class Violation:
    kind: ViolationKind
    block: int | None
    detail: str

    def __str__(self) -> str:
        where = "" if self.block is None else f"block {self.block}: "
        return f"{self.kind.value}: {where}{self.detail}"


@dataclass(frozen=True)
class CheckResult:
    blocks_checked: int
    acked_writes: int
    # Blocks whose last acknowledged value (or a legitimate successor) is not present.
    lost_acks: int
    violations: tuple[Violation, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.violations

    def summary(self, limit: int = 5) -> str:
        head = (f"{self.blocks_checked} blocks, {self.acked_writes} acknowledged writes, "
                f"{self.lost_acks} lost, {len(self.violations)} violations")
        return "; ".join([head, *(str(v) for v in self.violations[:limit])])


def _effective_end(write: WriteRecord, log: WriterLog) -> float:
    """Until when ``write`` may still land on the replicas.

    An unfinished write may land any time, except that nothing of the old owner lands
    after the takeover: the new owner fenced every replica before serving (I2).
    """
    end = math.inf if write.completed is None else write.completed
    if log.takeover_at is not None and write.writer in log.old_writers:
        end = min(end, log.takeover_at)
    return end


def _allowed(value: WriteRecord | None, acked: list[WriteRecord], log: WriterLog) -> bool:
    """A present value is fine unless an acknowledged write was issued after it ended."""
    end = -math.inf if value is None else _effective_end(value, log)
    return not any(a is not value and a.issued > end for a in acked)


def _check_block(
    index: int, data: bytes, writes: list[WriteRecord], log: WriterLog
) -> list[Violation]:
    acked = [w for w in writes if w.acked]
    try:
        header = decode_block(data)
    except CorruptBlockError as exc:
        return [Violation(ViolationKind.CORRUPT, index, str(exc))]
    value: WriteRecord | None = None
    if header is not None:
        if header.block != index:
            return [Violation(ViolationKind.CORRUPT, index,
                              f"holds the block written for index {header.block}")]
        value = log.find(header.writer, header.seq)
        if value is None or value.block != index or value.digest != header.digest:
            return [Violation(ViolationKind.NEVER_WRITTEN, index,
                              f"writer {header.writer:#x} seq {header.seq} was never issued "
                              "here with this payload")]
    found: list[Violation] = []
    if (value is not None and log.takeover_at is not None
            and value.writer in log.old_writers and value.issued > log.takeover_at):
        found.append(Violation(ViolationKind.STALE_WRITE, index,
                               f"old owner's seq {value.seq} issued "
                               f"{value.issued - log.takeover_at:.3f} s after the takeover"))
    if not _allowed(value, acked, log):
        last = max(acked, key=lambda w: w.issued)
        have = "blank" if value is None else f"writer {value.writer:#x} seq {value.seq}"
        found.append(Violation(ViolationKind.LOST_ACK, index,
                               f"acknowledged writer {last.writer:#x} seq {last.seq} "
                               f"missing; found {have}"))
    return found


def _late_acks(log: WriterLog) -> list[Violation]:
    if log.takeover_at is None:
        return []
    return [
        Violation(ViolationKind.LATE_ACK, w.block,
                  f"old owner acknowledged seq {w.seq} "
                  f"{w.completed - log.takeover_at:.3f} s after the takeover")
        for w in log.writes()
        if w.acked and w.writer in log.old_writers and w.completed is not None
        and w.completed > log.takeover_at
    ]


def check(
    log: WriterLog, read_block: Callable[[int], bytes], block_count: int | None = None,
) -> CheckResult:
    """Check blocks ``0 .. block_count-1`` as read by ``read_block`` against the log.

    Pass the volume's block count so blocks never written are checked too (they must be
    blank); by default only up to the highest block in the log is checked.
    """
    if block_count is None:
        block_count = 1 + max((w.block for w in log.writes()), default=-1)
    by_block: dict[int, list[WriteRecord]] = {}
    for write in log.writes():
        if not 0 <= write.block < block_count:
            raise ValueError(f"logged write to block {write.block} outside 0..{block_count - 1}")
        by_block.setdefault(write.block, []).append(write)
    violations = _late_acks(log)
    lost = 0
    for index in range(block_count):
        writes = by_block.get(index, [])
        found = _check_block(index, read_block(index), writes, log)
        if any(w.acked for w in writes) and any(
            v.kind is not ViolationKind.STALE_WRITE for v in found
        ):
            lost += 1
        violations.extend(found)
    return CheckResult(
        blocks_checked=block_count,
        acked_writes=sum(1 for w in log.writes() if w.acked),
        lost_acks=lost,
        violations=tuple(violations),
    )
