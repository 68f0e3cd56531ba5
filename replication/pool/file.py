"""Replicas as sparse files in one directory: for tests, dev clusters and nodes without LVM.

Each replica is ``<directory>/<volume_id>.img``. This module owns that directory's layout,
its capacity accounting and its crash safety. It must not: show a half-created replica under
its final name, let two creators (threads or processes) over-commit the pool, or touch a
path outside the directory (volume ids are validated, opens never follow symlinks).

Accounting is thick on logical sizes: free = configured capacity - sum of the replicas'
sizes, whatever blocks the sparse files really use. Counting allocated blocks instead would
let the pool promise more than the disk holds, and a replica would hit ENOSPC in the middle
of a write long after its creation succeeded. The configured capacity is trusted: the
operator keeps it at or below what the filesystem can hold.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import logging
import os
import secrets
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from replication.errors import (
    InvalidSizeError,
    PoolError,
    PoolFullError,
    ReplicaConflictError,
    ReplicaNotFoundError,
)
from replication.pool.base import (
    Pool,
    PoolCapacity,
    ReplicaInfo,
    check_range,
    check_size,
    check_volume_id,
    is_valid_volume_id,
)

log = logging.getLogger(__name__)

_SUFFIX = ".img"
# Valid ids start with an alphanumeric, so a dot-prefixed name can never be a replica.
_TEMP_PREFIX = ".tmp-"
_LOCK_NAME = ".pool.lock"

# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


class FilePool(Pool):
    """Sparse-file replicas under ``directory``, at most ``capacity_bytes`` provisioned."""

    kind = "file"

    def __init__(self, directory: str | os.PathLike[str], capacity_bytes: int) -> None:
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int):
            raise InvalidSizeError(f"capacity must be an int, got {capacity_bytes!r}")
        if capacity_bytes <= 0:
            raise InvalidSizeError(f"capacity must be positive, got {capacity_bytes}")
        Path(directory).mkdir(parents=True, exist_ok=True)
        # Absolute, so ReplicaInfo.path stays valid whatever the caller's cwd becomes.
        self._dir = Path(directory).resolve()
        self._capacity = capacity_bytes
        self._lock = threading.Lock()
        with self._exclusive():
            self._remove_stale_temps()

    @property
    def directory(self) -> Path:
        return self._dir

    def capacity(self) -> PoolCapacity:
        # Clamped: a restart with a smaller configured capacity must not report negative.
        return PoolCapacity(self._capacity, max(self._free_bytes(), 0))

    def create(self, volume_id: str, size_bytes: int) -> ReplicaInfo:
        check_volume_id(volume_id)
        check_size(size_bytes)
        with self._exclusive():
            existing = self.get(volume_id)
            if existing is not None:
                if existing.size_bytes != size_bytes:
                    raise ReplicaConflictError(
                        f"replica {volume_id} exists with size {existing.size_bytes}, "
                        f"not {size_bytes}"
                    )
                return existing
            free = self._free_bytes()
            if size_bytes > free:
                raise PoolFullError(
                    f"replica {volume_id} needs {size_bytes} bytes, pool has {max(free, 0)} free"
                )
            self._write_new(volume_id, size_bytes)
            return self._require(volume_id)

    def delete(self, volume_id: str) -> None:
        check_volume_id(volume_id)
        with self._exclusive():
            try:
                self._path(volume_id).unlink()
            except FileNotFoundError:
                return
            _fsync_dir(self._dir)

    def resize(self, volume_id: str, size_bytes: int) -> ReplicaInfo:
        check_volume_id(volume_id)
        check_size(size_bytes)
        with self._exclusive():
            current = self._require(volume_id)
            if size_bytes == current.size_bytes:
                return current
            if size_bytes < current.size_bytes:
                raise ReplicaConflictError(
                    f"replica {volume_id} is {current.size_bytes} bytes; shrinking to "
                    f"{size_bytes} is not supported"
                )
            growth = size_bytes - current.size_bytes
            free = self._free_bytes()
            if growth > free:
                raise PoolFullError(
                    f"growing {volume_id} needs {growth} bytes, pool has {max(free, 0)} free"
                )
            with self._open(volume_id) as fd:
                os.ftruncate(fd, size_bytes)
                os.fsync(fd)
            return self._require(volume_id)

    def get(self, volume_id: str) -> ReplicaInfo | None:
        check_volume_id(volume_id)
        path = self._path(volume_id)
        try:
            st = path.lstat()
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):
            raise PoolError(f"{path} is not a regular file")
        return _info(volume_id, path, st)

    def list(self) -> list[ReplicaInfo]:
        return sorted(self._scan(), key=lambda info: info.volume_id)

    def punch_hole(self, volume_id: str, offset: int, length: int) -> None:
        check_volume_id(volume_id)
        current = self._require(volume_id)
        check_range(offset, length, current.size_bytes)
        if length == 0:
            return
        with self._open(volume_id) as fd:
            _punch_hole(fd, offset, length)

    # -- internals ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Serialise mutations: the thread lock within this process, flock across processes.

        Both are needed: flock belongs to an open file description, so it does not keep this
        process's own threads apart.
        """
        with self._lock:
            fd = os.open(self._dir / _LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    def _path(self, volume_id: str) -> Path:
        return self._dir / f"{volume_id}{_SUFFIX}"

    def _require(self, volume_id: str) -> ReplicaInfo:
        info = self.get(volume_id)
        if info is None:
            raise ReplicaNotFoundError(f"replica {volume_id} does not exist")
        return info

    @contextlib.contextmanager
    def _open(self, volume_id: str) -> Iterator[int]:
        flags = os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(self._path(volume_id), flags)
        except FileNotFoundError:
            raise ReplicaNotFoundError(f"replica {volume_id} does not exist") from None
        try:
            yield fd
        finally:
            os.close(fd)

    def _free_bytes(self) -> int:
        return self._capacity - sum(info.size_bytes for info in self._scan())

    def _scan(self) -> Iterator[ReplicaInfo]:
        with os.scandir(self._dir) as entries:
            for entry in entries:
                volume_id = entry.name.removesuffix(_SUFFIX)
                if volume_id == entry.name or not is_valid_volume_id(volume_id):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # deleted while we listed
                if stat.S_ISREG(st.st_mode):
                    yield _info(volume_id, Path(entry.path), st)

    def _write_new(self, volume_id: str, size_bytes: int) -> None:
        """Create the sparse file under a temp name, then rename it into place."""
        temp = self._dir / f"{_TEMP_PREFIX}{volume_id}.{secrets.token_hex(4)}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size_bytes)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            temp.unlink(missing_ok=True)
            raise
        os.close(fd)
        # Under _exclusive() and after get() said no: nothing can sit at the final name.
        os.rename(temp, self._path(volume_id))
        _fsync_dir(self._dir)

    def _remove_stale_temps(self) -> None:
        """Remove temp files a crashed create left behind (only ever called under the lock)."""
        removed = 0
        with os.scandir(self._dir) as entries:
            for entry in entries:
                if entry.name.startswith(_TEMP_PREFIX):
                    Path(entry.path).unlink(missing_ok=True)
                    removed += 1
        if removed:
            log.info("file pool %s: removed %d stale temp file(s)", self._dir, removed)
            _fsync_dir(self._dir)


def _info(volume_id: str, path: Path, st: os.stat_result) -> ReplicaInfo:
    # st_blocks is always in 512-byte units, whatever the filesystem's block size.
    return ReplicaInfo(volume_id, st.st_size, str(path), st.st_blocks * 512)


def _fsync_dir(directory: Path) -> None:
    """Make a create/rename/unlink in ``directory`` durable (the entry lives in the dir)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@functools.cache
def _libc_fallocate() -> Callable[[int, int, int, int], int]:
    # os.posix_fallocate cannot take mode flags, so punching a hole needs libc's fallocate.
    libc = ctypes.CDLL(None, use_errno=True)
    # fallocate64 takes a 64-bit off_t even on 32-bit glibc; musl only has fallocate
    # (its off_t is always 64-bit).
    fn = getattr(libc, "fallocate64", None) or libc.fallocate
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


def _punch_hole(fd: int, offset: int, length: int) -> None:
    rc = _libc_fallocate()(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
    if rc != 0:
        err = ctypes.get_errno()
        if err == errno.EOPNOTSUPP:
            raise PoolError("this filesystem cannot punch holes (fallocate EOPNOTSUPP)")
        raise PoolError(f"fallocate(PUNCH_HOLE) failed: {os.strerror(err)}")
