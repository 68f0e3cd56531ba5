"""Block backends: what the NBD front end reads from and writes to.

Owns the `BlockBackend` contract (async, offset/length-shaped, like a disk with a
volatile write cache), its one error type `BackendIOError(errno)`, the optional
`SyncFastPath` a backend may offer for cheap small I/O, and `FileBackend`, a
local file or block device.

Must not: know NBD wire formats, sockets or replication; classify errors by
message text; swallow an I/O error (every failure surfaces as BackendIOError).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, Protocol, TypeVar, runtime_checkable

from replication.replica_io import pwrite_all

Payload = bytes | memoryview

FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02
FALLOC_FL_ZERO_RANGE: Final = 0x10
_ZERO_CHUNK: Final = bytes(1 << 20)
# fallocate errnos that mean "this file system or device cannot": fall back.
_UNSUPPORTED: Final = frozenset({errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV})
_T = TypeVar("_T")


class BackendIOError(Exception):
    """An I/O request failed; `errno` says how (the front end maps it to the wire)."""

    def __init__(self, err: int, detail: str = "") -> None:
        super().__init__(err, detail or os.strerror(err))
        self.errno = err


class BlockBackend(Protocol):
    """A fixed-size block store served to one or more NBD connections.

    Concurrent requests may complete in any order; overlapping in-flight writes
    have no defined order (as on a disk). Every method raises only
    `BackendIOError` for an I/O failure.
    """

    @property
    def size(self) -> int:
        """Export size in bytes; constant for the backend's life."""
        ...

    async def read(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes, reflecting every write completed before the call."""
        ...

    async def write(self, offset: int, data: Payload, fua: bool) -> None:
        """Visible to later reads on return; also durable on return if `fua`.

        `data` may be a view into a receive buffer: copy it if kept after return.
        """
        ...

    async def flush(self) -> None:
        """Make durable every write that completed before this call."""
        ...

    async def trim(self, offset: int, length: int) -> None:
        """Discard a range; its content is unspecified until rewritten."""
        ...

    async def write_zeroes(self, offset: int, length: int, no_hole: bool) -> None:
        """Range reads back as zeroes; `no_hole` asks for it to stay allocated."""
        ...


@runtime_checkable
class SyncFastPath(Protocol):
    """Optional synchronous variants a backend may offer for small, cheap I/O.

    Called on the event loop thread, so they must not wait on the network or a
    device queue for long. They may decline (None / False), and the caller then
    uses the async method. Not used for FUA writes.
    """

    def read_now(self, offset: int, length: int) -> bytes | None: ...

    def write_now(self, offset: int, data: Payload) -> bool: ...


@runtime_checkable
class CallbackWritePath(Protocol):
    """Optional: start a write now and be told when it is done, without a task per write.

    ``done(None)`` once the write may be acknowledged, ``done(error)`` if it must fail;
    called later from the event loop (or at once). False: not started, use ``write``.
    """

    def write_soon(self, offset: int, data: Payload, fua: bool,
                   done: Callable[[BackendIOError | None], None]) -> bool: ...


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.fallocate64
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    func.restype = ctypes.c_int
    return func


_fallocate = _load_fallocate()


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (os.posix_fallocate has none); raises OSError."""
    if _fallocate is None:
        raise OSError(errno.EOPNOTSUPP, "fallocate is not available")
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class FileBackend:
    """A local file or block device; the first `BlockBackend`.

    Small reads and non-FUA writes are plain pread/pwrite on the calling (event
    loop) thread: into the page cache they take microseconds, far less than a
    hand-off to a thread. Large I/O, FUA writes, flush, trim and zeroing run in a
    small private thread pool because they can wait on the device.
    """

    def __init__(self, path: str, *, fast_path_max: int = 256 * 1024) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            st = os.fstat(self._fd)
            if stat.S_ISREG(st.st_mode):
                self._size = st.st_size
            else:  # a block device reports its size only through lseek
                self._size = os.lseek(self._fd, 0, os.SEEK_END)
        except OSError:
            os.close(self._fd)
            raise
        self._fast_path_max = fast_path_max
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="file-backend")
        self._dsync = hasattr(os, "RWF_DSYNC")

    @property
    def size(self) -> int:
        return self._size

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        os.close(self._fd)

    def read_now(self, offset: int, length: int) -> bytes | None:
        return self._pread(offset, length) if length <= self._fast_path_max else None

    def write_now(self, offset: int, data: Payload) -> bool:
        if len(data) > self._fast_path_max:
            return False
        self._pwrite(offset, data)
        return True

    async def read(self, offset: int, length: int) -> bytes:
        if length <= self._fast_path_max:
            return self._pread(offset, length)
        return await self._in_pool(self._pread, offset, length)

    async def write(self, offset: int, data: Payload, fua: bool) -> None:
        if fua:
            await self._in_pool(self._pwrite_durable, offset, data)
        elif len(data) <= self._fast_path_max:
            self._pwrite(offset, data)
        else:
            await self._in_pool(self._pwrite, offset, data)

    async def flush(self) -> None:
        await self._in_pool(os.fdatasync, self._fd)

    async def trim(self, offset: int, length: int) -> None:
        # Zeroes rather than "unspecified": replicas must stay byte-identical.
        await self._in_pool(self._zero, offset, length, False)

    async def write_zeroes(self, offset: int, length: int, no_hole: bool) -> None:
        await self._in_pool(self._zero, offset, length, no_hole)

    async def _in_pool(self, func: Callable[..., _T], *args: Any) -> _T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, func, *args)
        except OSError as exc:
            raise BackendIOError(exc.errno or errno.EIO, str(exc)) from exc

    def _pread(self, offset: int, length: int) -> bytes:
        try:
            data = os.pread(self._fd, length, offset)
            if len(data) == length:
                return data
            parts, got = [data], len(data)
            while got < length:
                more = os.pread(self._fd, length - got, offset + got)
                if not more:  # the file shrank underneath the export
                    raise BackendIOError(errno.EIO, f"short read at {offset + got}")
                parts.append(more)
                got += len(more)
            return b"".join(parts)
        except OSError as exc:
            raise BackendIOError(exc.errno or errno.EIO, str(exc)) from exc

    def _pwrite(self, offset: int, data: Payload) -> None:
        try:
            pwrite_all(self._fd, data, offset)
        except OSError as exc:
            raise BackendIOError(exc.errno or errno.EIO, str(exc)) from exc

    def _pwrite_durable(self, offset: int, data: Payload) -> None:
        # RWF_DSYNC persists just this range; fdatasync would also flush every
        # other dirty page of the file, which FUA does not ask for.
        if self._dsync:
            try:
                done = os.pwritev(self._fd, [data], offset, os.RWF_DSYNC)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise BackendIOError(exc.errno or errno.EIO, str(exc)) from exc
                self._dsync = False
            else:
                if done == len(data):
                    return
                offset, data = offset + done, memoryview(data)[done:]
        self._pwrite(offset, data)
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            raise BackendIOError(exc.errno or errno.EIO, str(exc)) from exc

    def _zero(self, offset: int, length: int, no_hole: bool) -> None:
        zero_range = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
        punch = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        modes = [zero_range] if no_hole else [punch, zero_range]
        for mode in modes if length else []:
            try:
                fallocate(self._fd, mode, offset, length)
                return
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise BackendIOError(exc.errno or errno.EIO, str(exc)) from exc
        end = offset + length
        while offset < end:
            n = min(len(_ZERO_CHUNK), end - offset)
            self._pwrite(offset, memoryview(_ZERO_CHUNK)[:n])
            offset += n
