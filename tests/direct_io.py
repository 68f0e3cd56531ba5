"""O_DIRECT reads and writes through a block device for tests (page-aligned buffers), so
what is checked is what the device returns, not the page cache."""

from __future__ import annotations

import mmap
import os
from pathlib import Path


def direct_write(device: Path, offset: int, data: bytes) -> None:
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    fd = os.open(device, os.O_WRONLY | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [buf], offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)
        buf.close()


def direct_read(device: Path, offset: int, size: int) -> bytes:
    buf = mmap.mmap(-1, size)
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.preadv(fd, [buf], offset) == size
        return bytes(buf)
    finally:
        os.close(fd)
        buf.close()
