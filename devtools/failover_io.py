"""Crash-consistency I/O through a published block device: writer threads and read-back.

The I/O edge of ``crashcheck``: ``BlockWriter`` runs threads that write self-describing
4 KiB blocks (``crashcheck.encode_block``) with O_DIRECT ``pwrite`` + ``fsync`` through a
device file (the CSI target path of a published block volume: loop -> nbdfuse -> NBD ->
target -> every in-sync replica), logging each write as issued, acknowledged or failed in a
``WriterLog``. ``read_and_check`` reads a whole device back with O_DIRECT and hands it to
``crashcheck.check``.

Each thread owns the blocks ``i, i + threads, ...`` so writes to one block never overlap
in time: the order of a block's writes is the order they were issued, which the checker's
"last acknowledged value" rule relies on. Must not: talk CSI or etcd, or judge the data
itself (crashcheck does).
"""

from __future__ import annotations

import itertools
import mmap
import os
import random
import threading
import time
from pathlib import Path

from devtools.crashcheck import (
    BLOCK_SIZE,
    PAYLOAD_SIZE,
    CheckResult,
    WriterLog,
    check,
    encode_block,
    payload_digest,
)

VOLUME_BYTES = 64 << 20  # the failover benchmark's and fault tests' volumes
READ_CHUNK = 1 << 20
# After a failed write, wait a little before the next: a dead device fails at once, and a
# writer spinning on EIO would only bloat the log.
ERROR_PAUSE_S = 0.05


def new_writer_id() -> int:
    """A random 64-bit writer id: distinct per writer, independent of the volume's epoch."""
    return random.SystemRandom().getrandbits(63) | 1


def _open_direct(device: Path, flags: int) -> int:
    return os.open(device, flags | os.O_DIRECT | os.O_CLOEXEC)


def write_block(
    fd: int, buf: mmap.mmap, log: WriterLog, writer: int, block: int, seq: int,
) -> bool:
    """One O_DIRECT pwrite + fsync of a fresh block; logged; True if acknowledged."""
    payload = os.urandom(PAYLOAD_SIZE)
    buf[:] = encode_block(writer, block, seq, payload)
    record = log.issue(writer, block, seq, payload_digest(payload), time.monotonic())
    try:
        if os.pwrite(fd, buf, block * BLOCK_SIZE) != BLOCK_SIZE:
            raise OSError("short write")
        os.fsync(fd)
    except OSError:
        log.complete(record, time.monotonic(), acked=False)
        return False
    log.complete(record, time.monotonic(), acked=True)
    return True


def write_one(device: Path, log: WriterLog, writer: int, block: int, seq: int) -> float | None:
    """A single acknowledged-or-not write; the monotonic ack time, or None if it failed."""
    buf = mmap.mmap(-1, BLOCK_SIZE)  # page-aligned, as O_DIRECT requires
    try:
        fd = _open_direct(device, os.O_RDWR)
        try:
            return time.monotonic() if write_block(fd, buf, log, writer, block, seq) else None
        finally:
            os.close(fd)
    finally:
        buf.close()


class BlockWriter:
    """Threads writing blocks ``0 .. blocks-1`` of a device until stopped (or max_seconds)."""

    def __init__(
        self, device: Path, log: WriterLog, writer: int, blocks: int, *, threads: int = 4,
        max_seconds: float = 600.0, seed: int | None = None,
    ) -> None:
        if blocks < threads:
            raise ValueError(f"need at least one block per thread ({blocks} < {threads})")
        self.device = device
        self.log = log
        self.writer = writer
        self._blocks = blocks
        self._threads_wanted = threads
        self._max_seconds = max_seconds
        self._rng = random.Random(seed)
        self._seq = itertools.count(1)
        self._seq_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.open_errors: list[str] = []

    def next_seq(self) -> int:
        with self._seq_lock:
            return next(self._seq)

    def start(self) -> None:
        for i in range(self._threads_wanted):
            seed = self._rng.getrandbits(32)
            thread = threading.Thread(target=self._run, args=(i, seed), daemon=True,
                                      name=f"block-writer-{i}")
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout_s: float = 60.0) -> bool:
        """Ask every thread to stop; False if one is still stuck in I/O after timeout_s."""
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def _run(self, index: int, seed: int) -> None:
        rng = random.Random(seed)
        mine = range(index, self._blocks, self._threads_wanted)
        deadline = time.monotonic() + self._max_seconds
        buf = mmap.mmap(-1, BLOCK_SIZE)
        try:
            fd = _open_direct(self.device, os.O_RDWR)
        except OSError as exc:
            self.open_errors.append(f"thread {index}: {exc}")
            buf.close()
            return
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                if not write_block(fd, buf, self.log, self.writer, rng.choice(mine),
                                   self.next_seq()):
                    self._stop.wait(ERROR_PAUSE_S)
        finally:
            os.close(fd)
            buf.close()


def read_device(device: Path, size: int) -> bytes:
    """The first ``size`` bytes of a device, read with O_DIRECT (no page cache)."""
    out = bytearray()
    buf = mmap.mmap(-1, READ_CHUNK)
    try:
        fd = _open_direct(device, os.O_RDONLY)
        try:
            for offset in range(0, size, READ_CHUNK):
                want = min(READ_CHUNK, size - offset)
                got = os.preadv(fd, [buf], offset)
                if got < want:
                    raise OSError(f"short read at {offset}: {got} of {want} bytes")
                out += buf[:want]
        finally:
            os.close(fd)
    finally:
        buf.close()
    return bytes(out)


class BlockReader:
    """``read_block`` for the checker over an image read with ``read_device``."""

    def __init__(self, image: bytes) -> None:
        self._image = image

    @property
    def block_count(self) -> int:
        return len(self._image) // BLOCK_SIZE

    def __call__(self, index: int) -> bytes:
        return self._image[index * BLOCK_SIZE:(index + 1) * BLOCK_SIZE]


def read_and_check(device: Path, log: WriterLog, size: int = VOLUME_BYTES) -> CheckResult:
    """Read the whole device back (O_DIRECT) and check it against the writer log."""
    return check(log, BlockReader(read_device(device, size)), size // BLOCK_SIZE)
