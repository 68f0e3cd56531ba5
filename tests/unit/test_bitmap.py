"""Dirty bitmaps: marking, ranges, persistence."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replication.bitmap import DirtyBitmap

MIB = 1 << 20


def test_mark_and_ranges() -> None:
    bm = DirtyBitmap(10 * MIB + 5)
    bm.mark(0, 1)
    bm.mark(3 * MIB - 1, 2)  # spans regions 2 and 3
    bm.mark(10 * MIB, 5)  # the short last region
    assert bm.dirty_regions == 4
    assert list(bm.ranges()) == [(0, MIB), (2 * MIB, MIB), (3 * MIB, MIB), (10 * MIB, 5)]
    assert bm.dirty_bytes == 3 * MIB + 5
    bm.clear(2)
    assert not bm.is_marked(2) and bm.dirty_regions == 3


def test_mark_all_and_zero_length() -> None:
    bm = DirtyBitmap(4 * MIB)
    bm.mark(MIB, 0)
    assert bm.dirty_regions == 0
    bm.mark_all()
    assert bm.dirty_bytes == 4 * MIB


def test_save_load_roundtrip(tmp_path: Path) -> None:
    bm = DirtyBitmap(64 * MIB)
    bm.mark(5 * MIB, 3 * MIB)
    bm.save(tmp_path / "x.bitmap")
    loaded = DirtyBitmap.load(tmp_path / "x.bitmap")
    assert list(loaded.ranges()) == list(bm.ranges())
    assert loaded.dirty_regions == 3


@pytest.mark.parametrize("data", [b"", b"XXXX" + bytes(16), DirtyBitmap(MIB).to_bytes() + b"x"])
def test_rejects_bad_files(data: bytes) -> None:
    with pytest.raises(ValueError):
        DirtyBitmap.from_bytes(data)


def test_rejects_bad_geometry() -> None:
    with pytest.raises(ValueError):
        DirtyBitmap(0)
    with pytest.raises(ValueError):
        DirtyBitmap(MIB, region_size=3000)


@given(st.lists(st.tuples(st.integers(0, 63 * MIB), st.integers(1, 4 * MIB)), max_size=20))
def test_every_marked_byte_is_covered(writes: list[tuple[int, int]]) -> None:
    size = 64 * MIB
    bm = DirtyBitmap(size)
    for offset, length in writes:
        bm.mark(offset, min(length, size - offset))
    covered = list(bm.ranges())
    for offset, length in writes:
        end = min(offset + length, size)
        for probe in (offset, end - 1):
            assert any(o <= probe < o + n for o, n in covered)
    merged = DirtyBitmap(size)
    merged.merge(bm)
    assert list(merged.ranges()) == covered
