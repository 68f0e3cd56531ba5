"""Writing replica data through the page cache, in pieces the page cache handles well.

Owns ``pwrite_all``, the one way replica bytes reach a file (the replica server's writes
and zeroing, a target's direct writes to its own node's replica, the plain
``FileBackend``), and the replica server's whole-range helpers that run in worker threads
(exact reads, zeroing, range digests). Must not: sync, choose descriptors, or know about
volumes and epochs.

Why pieces: the page cache sizes a folio after the write that creates it (large folios,
ext4 since Linux 6.x: up to 2 MiB), and a later small write into a big folio walks every
block of it in ``ext4_block_write_begin``. Measured on this machine's kernel (6.18, ext4):
a 4 KiB pwrite costs 1.4 us into a file last written in 4 KiB pieces, 3.8 us after 64 KiB
pieces and 12-22 us after 1 MiB pieces; sequential rewrites in 1 MiB pieces ran at
1.2 GB/s against 5.9 GB/s in 64 KiB pieces. A volume sees both (a filesystem streams file
data, then updates metadata in 4 KiB blocks), and every replica pays it, so each write is
issued in pieces of at most ``PWRITE_CHUNK``: one extra syscall per 64 KiB of big writes.
"""

from __future__ import annotations

import errno
import os

from replication.messages import Buffer
from replication.payloads import ChecksumSpec, block_digests

PWRITE_CHUNK = 64 << 10
RANGE_CHUNK = 1 << 20  # zeroing and digests work on pieces of this size
_ZEROS = bytes(RANGE_CHUNK)


def pwrite_all(fd: int, data: Buffer, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (short writes are finished; OSError propagates)."""
    n = len(data)
    if n <= PWRITE_CHUNK:
        done = os.pwrite(fd, data, offset)
        if done == n:
            return
    else:
        done = 0
    view = memoryview(data)
    while done < n:  # short writes happen (signals, some devices): finish them too
        done += os.pwrite(fd, view[done:done + PWRITE_CHUNK], offset + done)


def pread_exact(fd: int, offset: int, length: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise OSError(errno.EIO, "short read")
    return data


def write_zeros(fd: int, offset: int, length: int) -> None:
    zeros = memoryview(_ZEROS)
    end = offset + length
    while offset < end:
        n = min(end - offset, len(zeros))
        pwrite_all(fd, zeros[:n], offset)
        offset += n


def range_digests(fd: int, offset: int, length: int, spec: ChecksumSpec) -> bytes:
    """``block_digests`` of a range, read in pieces (whole blocks: both are powers of 2)."""
    chunk = max(spec.block_size, RANGE_CHUNK)
    parts = []
    for pos in range(offset, offset + length, chunk):
        size = min(chunk, offset + length - pos)
        parts.append(block_digests(pread_exact(fd, pos, size), spec.block_size, spec.algo))
    return b"".join(parts)
