"""Dirty-region bitmaps: which regions a replica missed while it was out of the ISR.

Pure data structure plus a file format; the target marks regions on the write path (O(1)
per write for the common case of a write inside one region), and rebuild copies only the
marked regions. A bitmap is persisted atomically (tmp + fsync + rename), so a crash leaves
either the old or the new map, never half of one.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

DEFAULT_REGION = 1 << 20
_HEADER = struct.Struct(">4sQQ")  # magic, volume size, region size
_MAGIC = b"TDB1"


class DirtyBitmap:
    def __init__(self, size: int, region_size: int = DEFAULT_REGION) -> None:
        if size <= 0 or region_size <= 0 or region_size & (region_size - 1):
            raise ValueError("size must be > 0 and region_size a power of two")
        self.size = size
        self.region_size = region_size
        self._shift = region_size.bit_length() - 1
        self.regions = -(-size // region_size)
        self._bits = bytearray(-(-self.regions // 8))
        self._count = 0

    def mark(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        first = offset >> self._shift
        last = min((offset + length - 1) >> self._shift, self.regions - 1)
        for region in range(first, last + 1):
            byte, bit = region >> 3, 1 << (region & 7)
            if not self._bits[byte] & bit:
                self._bits[byte] |= bit
                self._count += 1

    def mark_all(self) -> None:
        self.mark(0, self.size)

    def clear(self, region: int) -> None:
        byte, bit = region >> 3, 1 << (region & 7)
        if self._bits[byte] & bit:
            self._bits[byte] &= ~bit & 0xFF
            self._count -= 1

    def is_marked(self, region: int) -> bool:
        return bool(self._bits[region >> 3] & (1 << (region & 7)))

    @property
    def dirty_regions(self) -> int:
        return self._count

    @property
    def dirty_bytes(self) -> int:
        return sum(length for _, length in self.ranges())

    def ranges(self) -> Iterator[tuple[int, int]]:
        """(offset, length) of every marked region, clipped to the volume size."""
        for region in range(self.regions):
            if self._bits[region >> 3] and self.is_marked(region):
                offset = region << self._shift
                yield offset, min(self.region_size, self.size - offset)

    def merge(self, other: DirtyBitmap) -> None:
        if (other.size, other.region_size) != (self.size, self.region_size):
            raise ValueError("bitmaps of different geometry")
        for region in range(self.regions):
            if other.is_marked(region):
                self.mark(region << self._shift, 1)

    def to_bytes(self) -> bytes:
        return _HEADER.pack(_MAGIC, self.size, self.region_size) + bytes(self._bits)

    @classmethod
    def from_bytes(cls, data: bytes) -> DirtyBitmap:
        if len(data) < _HEADER.size:
            raise ValueError("bitmap file too short")
        magic, size, region_size = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise ValueError("not a tandem bitmap")
        bitmap = cls(size, region_size)
        body = data[_HEADER.size:]
        if len(body) != len(bitmap._bits):
            raise ValueError("bitmap length does not match its geometry")
        bitmap._bits[:] = body
        bitmap._count = sum(bin(b).count("1") for b in body)
        return bitmap

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(self.to_bytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    @classmethod
    def load(cls, path: Path) -> DirtyBitmap:
        return cls.from_bytes(path.read_bytes())
