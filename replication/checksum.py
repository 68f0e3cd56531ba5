"""CRC-32 (the zlib / gzip polynomial) for the replication wire, as fast as this host allows.

Owns the choice of implementation: ISA-L's (``isal``: carry-less multiply, ~40 GB/s here)
when it imports, else ``zlib.crc32`` (~4-6 GB/s). Both compute the same values, so peers
using either interoperate; only the CPU cost differs. That cost mattered: every replicated
byte is checksummed by the owner and by each replica, which took ~15 % of their CPU during
1 MiB sequential writes with zlib. Must not: change the polynomial (it is on the wire), or
import other replication modules (the codec imports this one).
"""

from __future__ import annotations

import zlib
from typing import Protocol, cast


class Crc32(Protocol):
    def __call__(self, data: bytes | bytearray | memoryview, value: int = 0, /) -> int: ...


try:
    from isal import isal_zlib
except ImportError:  # still correct, just slower
    crc32 = cast(Crc32, zlib.crc32)
    IMPLEMENTATION = "zlib"
else:
    crc32 = cast(Crc32, isal_zlib.crc32)
    IMPLEMENTATION = "isal"

__all__ = ["IMPLEMENTATION", "Crc32", "crc32"]
