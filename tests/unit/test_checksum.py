"""The wire CRC is zlib's CRC-32 whichever implementation computes it (peers may differ)."""

from __future__ import annotations

import zlib

from hypothesis import given, settings
from hypothesis import strategies as st

from replication import checksum


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=70_000), st.integers(0, 0xFFFFFFFF), st.integers(0, 64))
def test_same_values_as_zlib(data: bytes, start: int, skip: int) -> None:
    view = memoryview(data)[skip:]
    assert checksum.crc32(view) == zlib.crc32(view)
    assert checksum.crc32(bytearray(view), start) == zlib.crc32(view, start)


def test_the_fast_implementation_is_installed() -> None:
    # isal is a dependency; zlib is only the fallback for platforms without its wheels.
    assert checksum.IMPLEMENTATION == "isal"
