"""``pwrite_all``: every byte lands, in pieces no bigger than PWRITE_CHUNK."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from replication.replica_io import PWRITE_CHUNK, pwrite_all


@pytest.mark.parametrize("size", [1, 4096, PWRITE_CHUNK, PWRITE_CHUNK + 1, 3 * PWRITE_CHUNK + 7])
def test_writes_everything_in_bounded_pieces(tmp_path: Path, size: int,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    pieces: list[int] = []
    real = os.pwrite

    def spy(fd: int, data: bytes, offset: int) -> int:
        pieces.append(len(data))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", spy)
    data = os.urandom(size)
    fd = os.open(tmp_path / "r", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        pwrite_all(fd, memoryview(data), 512)
        assert os.pread(fd, size + 512, 0) == bytes(512) + data
    finally:
        os.close(fd)
    assert sum(pieces) == size and max(pieces) <= PWRITE_CHUNK
    assert len(pieces) == -(-size // PWRITE_CHUNK)


def test_finishes_short_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.pwrite

    def short(fd: int, data: bytes, offset: int) -> int:  # as after a signal: part of it
        return real(fd, memoryview(data)[: max(1, len(data) // 3)], offset)

    monkeypatch.setattr(os, "pwrite", short)
    data = os.urandom(10_000)
    fd = os.open(tmp_path / "r", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        pwrite_all(fd, data, 0)
        assert os.pread(fd, len(data), 0) == data
    finally:
        os.close(fd)
