"""The crash-consistency checker on hand-built logs and images, one failure class at a time.

Each test builds a writer log and a volume image (a dict of block index -> 4 KiB) by hand,
so every verdict can be traced to a rule: lost acknowledged writes, torn or never-written
blocks, stale writes of the old owner after the takeover, and what is *allowed* (in-flight
writes that may or may not have landed, overwrites, blank never-written blocks).
"""

from __future__ import annotations

import os

import pytest

from devtools.crashcheck import (
    BLOCK_SIZE,
    PAYLOAD_SIZE,
    CorruptBlockError,
    ViolationKind,
    WriterLog,
    decode_block,
    encode_block,
    payload_digest,
)
from devtools.crashcheck import check as run_check

OLD, NEW = 0xA1, 0xB2
BLANK = bytes(BLOCK_SIZE)


class Image:
    """A tiny volume: writes go through the log and, if they 'landed', into the image."""

    def __init__(self, blocks: int = 8) -> None:
        self.blocks = blocks
        self.data: dict[int, bytes] = {}
        self.log = WriterLog()
        self._seq = 0

    def write(
        self, writer: int, block: int, issued: float, completed: float | None,
        acked: bool, landed: bool,
    ) -> bytes:
        self._seq += 1
        payload = os.urandom(PAYLOAD_SIZE)
        raw = encode_block(writer, block, self._seq, payload)
        record = self.log.issue(writer, block, self._seq, payload_digest(payload), issued)
        if completed is not None:
            self.log.complete(record, completed, acked)
        if landed:
            self.data[block] = raw
        return raw

    def read(self, index: int) -> bytes:
        return self.data.get(index, BLANK)

    def check(self) -> tuple[set[ViolationKind], int]:
        result = run_check(self.log, self.read, self.blocks)
        return {v.kind for v in result.violations}, result.lost_acks


def test_block_round_trip_and_blank() -> None:
    payload = os.urandom(PAYLOAD_SIZE)
    raw = encode_block(7, 3, 42, payload)
    assert len(raw) == BLOCK_SIZE
    header = decode_block(raw)
    assert header is not None
    assert (header.writer, header.block, header.seq) == (7, 3, 42)
    assert header.digest == payload_digest(payload)
    assert decode_block(BLANK) is None
    with pytest.raises(ValueError):
        encode_block(7, 3, 42, b"short")


@pytest.mark.parametrize("damage", ["flip-payload-bit", "torn-half", "bad-magic", "short"])
def test_damaged_blocks_do_not_decode(damage: str) -> None:
    raw = bytearray(encode_block(1, 2, 3, os.urandom(PAYLOAD_SIZE)))
    if damage == "flip-payload-bit":
        raw[100] ^= 0x01
    elif damage == "torn-half":
        raw[2048:] = encode_block(1, 2, 4, os.urandom(PAYLOAD_SIZE))[2048:]
    elif damage == "bad-magic":
        raw[0:8] = b"XXXXXXXX"
    else:
        raw = raw[:1024]
    with pytest.raises(CorruptBlockError):
        decode_block(bytes(raw))


def test_clean_history_passes() -> None:
    img = Image()
    img.write(OLD, 0, 1.0, 1.1, acked=True, landed=True)
    img.write(OLD, 0, 1.2, 1.3, acked=True, landed=True)  # overwrite: the last one is there
    img.write(OLD, 1, 1.4, 1.5, acked=True, landed=True)
    result = run_check(img.log, img.read, img.blocks)
    assert result.ok, result.summary()
    assert result.acked_writes == 3 and result.lost_acks == 0
    assert result.blocks_checked == img.blocks


def test_lost_ack_blank_block() -> None:
    img = Image()
    img.write(OLD, 2, 1.0, 1.1, acked=True, landed=False)
    kinds, lost = img.check()
    assert kinds == {ViolationKind.LOST_ACK} and lost == 1


def test_lost_ack_older_value_after_overwrite() -> None:
    img = Image()
    img.write(OLD, 2, 1.0, 1.1, acked=True, landed=True)
    img.write(OLD, 2, 1.2, 1.3, acked=True, landed=False)  # acked, but the disk kept the old one
    kinds, lost = img.check()
    assert kinds == {ViolationKind.LOST_ACK} and lost == 1


def test_in_flight_write_may_or_may_not_land() -> None:
    for landed in (True, False):
        img = Image()
        img.write(OLD, 3, 1.0, 1.1, acked=True, landed=True)
        img.write(OLD, 3, 1.2, None, acked=False, landed=landed)  # issued, never answered
        img.write(OLD, 4, 1.3, 1.9, acked=False, landed=landed)  # failed (EIO)
        kinds, lost = img.check()
        assert kinds == set() and lost == 0


def test_a_later_in_flight_value_may_replace_the_last_ack() -> None:
    img = Image()
    img.write(OLD, 3, 1.0, 1.1, acked=True, landed=False)
    img.write(OLD, 3, 1.2, None, acked=False, landed=True)
    kinds, _ = img.check()
    assert kinds == set()


def test_failed_write_cannot_replace_a_later_ack() -> None:
    """A write that failed before the next one was issued is older than that one."""
    img = Image()
    img.write(OLD, 3, 1.0, 1.1, acked=False, landed=True)
    img.write(OLD, 3, 1.2, 1.3, acked=True, landed=False)
    kinds, lost = img.check()
    assert kinds == {ViolationKind.LOST_ACK} and lost == 1


def test_torn_block_is_corrupt_and_loses_the_ack() -> None:
    img = Image()
    raw = img.write(OLD, 5, 1.0, 1.1, acked=True, landed=True)
    img.data[5] = raw[:2048] + os.urandom(2048)
    kinds, lost = img.check()
    assert kinds == {ViolationKind.CORRUPT} and lost == 1


def test_garbage_in_an_unwritten_block_is_corrupt() -> None:
    img = Image()
    img.data[6] = os.urandom(BLOCK_SIZE)
    kinds, lost = img.check()
    assert kinds == {ViolationKind.CORRUPT} and lost == 0


def test_misplaced_block_is_corrupt() -> None:
    img = Image()
    raw = img.write(OLD, 1, 1.0, 1.1, acked=True, landed=True)
    img.data[2] = raw  # block 1's content at index 2
    kinds, _ = img.check()
    assert kinds == {ViolationKind.CORRUPT}


def test_never_written_value_is_detected() -> None:
    img = Image()
    img.write(OLD, 1, 1.0, 1.1, acked=True, landed=True)
    img.data[1] = encode_block(OLD, 1, 999, os.urandom(PAYLOAD_SIZE))  # seq never issued
    img.data[4] = encode_block(NEW, 4, 1, os.urandom(PAYLOAD_SIZE))  # unknown write, blank log
    kinds, lost = img.check()
    assert kinds == {ViolationKind.NEVER_WRITTEN} and lost == 1


def test_same_seq_other_payload_is_never_written() -> None:
    img = Image()
    img.write(OLD, 1, 1.0, 1.1, acked=True, landed=True)
    record = img.log.writes()[0]
    img.data[1] = encode_block(OLD, 1, record.seq, os.urandom(PAYLOAD_SIZE))
    kinds, _ = img.check()
    assert kinds == {ViolationKind.NEVER_WRITTEN}


def test_takeover_new_owner_overwrites_old_in_flight() -> None:
    img = Image()
    img.write(OLD, 0, 1.0, 1.1, acked=True, landed=False)
    img.write(OLD, 0, 1.2, None, acked=False, landed=False)  # in flight at the kill
    img.log.mark_takeover(5.0, {OLD})
    img.write(NEW, 0, 5.5, 5.6, acked=True, landed=True)
    kinds, lost = img.check()
    assert kinds == set() and lost == 0


def test_old_in_flight_write_landing_after_the_new_owner_is_lost_ack() -> None:
    """A stale epoch winning: the old owner's unanswered write over the new owner's ack."""
    img = Image()
    img.write(OLD, 0, 1.2, None, acked=False, landed=True)  # what the disk ends up with
    img.log.mark_takeover(5.0, {OLD})
    img.write(NEW, 0, 5.5, 5.6, acked=True, landed=False)
    kinds, lost = img.check()
    assert kinds == {ViolationKind.LOST_ACK} and lost == 1


def test_old_owner_write_issued_after_takeover_is_stale() -> None:
    img = Image()
    img.write(OLD, 1, 1.0, 1.1, acked=True, landed=True)
    img.log.mark_takeover(5.0, {OLD})
    img.write(OLD, 1, 6.0, 6.5, acked=False, landed=True)  # failed, but it is on disk
    kinds, lost = img.check()
    assert kinds == {ViolationKind.STALE_WRITE} and lost == 0


def test_old_owner_ack_after_takeover_is_late_ack() -> None:
    img = Image()
    img.log.mark_takeover(5.0, {OLD})
    img.write(OLD, 1, 4.0, 5.5, acked=True, landed=True)  # issued before, acked after
    kinds, _ = img.check()
    assert ViolationKind.LATE_ACK in kinds


def test_old_owner_write_issued_before_takeover_and_failed_may_be_present() -> None:
    img = Image()
    img.write(OLD, 1, 4.0, 7.0, acked=False, landed=True)
    img.log.mark_takeover(5.0, {OLD})
    kinds, _ = img.check()
    assert kinds == set()


def test_log_rejects_reused_sequence_and_out_of_range_blocks() -> None:
    log = WriterLog()
    log.issue(OLD, 1, 1, 0, 1.0)
    with pytest.raises(ValueError):
        log.issue(OLD, 2, 1, 0, 1.0)
    log.issue(NEW, 99, 1, 0, 1.0)  # another writer may use the same number
    with pytest.raises(ValueError):
        run_check(log, lambda _: BLANK, 8)
    assert [w.writer for w in log.acked()] == []


def test_block_count_defaults_to_the_highest_logged_block() -> None:
    img = Image()
    img.write(OLD, 5, 1.0, 1.1, acked=True, landed=True)
    result = run_check(img.log, img.read)
    assert result.ok and result.blocks_checked == 6
