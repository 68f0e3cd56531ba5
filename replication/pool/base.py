"""The storage-pool interface every backend implements, its value types and input rules.

A pool turns a node's local storage into replicas: one block-addressable space per volume
id. This module owns the contract (``Pool``), the shared validation of volume ids and sizes,
and the ``open_pool`` factory. It must not touch storage itself, and the interface is
synchronous on purpose: callers on the event loop run pool methods in a worker thread.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from replication.errors import InvalidReplicaIdError, InvalidSizeError

BLOCK_SIZE = 4096

# Same shape as the control plane's volume ids. The leading alphanumeric rules out "." and
# ".." and hidden names; "/" is not in the class, so an id is always one path component.
_VOLUME_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class ReplicaInfo:
    volume_id: str
    size_bytes: int
    path: str
    allocated_bytes: int


@dataclass(frozen=True)
class PoolCapacity:
    total_bytes: int
    free_bytes: int


class Pool(ABC):
    """One node's storage for replicas. Every method is safe to call from several threads."""

    kind: ClassVar[str]

    @abstractmethod
    def capacity(self) -> PoolCapacity:
        """Total and free bytes as this backend accounts them (see each backend)."""

    @abstractmethod
    def create(self, volume_id: str, size_bytes: int) -> ReplicaInfo:
        """Create a replica; idempotent when one of the same size exists.

        Raises ReplicaConflictError when it exists with another size, PoolFullError when
        there is no room.
        """

    @abstractmethod
    def delete(self, volume_id: str) -> None:
        """Remove a replica; removing a missing one is a success."""

    @abstractmethod
    def resize(self, volume_id: str, size_bytes: int) -> ReplicaInfo:
        """Grow a replica. The same size is a no-op; a smaller one is ReplicaConflictError.

        Raises ReplicaNotFoundError when it does not exist, PoolFullError when there is no room.
        """

    @abstractmethod
    def get(self, volume_id: str) -> ReplicaInfo | None:
        """The replica, or None when it does not exist."""

    @abstractmethod
    def list(self) -> list[ReplicaInfo]:
        """Every replica in the pool, sorted by volume id."""

    @abstractmethod
    def punch_hole(self, volume_id: str, offset: int, length: int) -> None:
        """Discard (TRIM) a byte range: it reads back as zeros and may free space."""


def is_valid_volume_id(volume_id: object) -> bool:
    return isinstance(volume_id, str) and _VOLUME_ID_RE.fullmatch(volume_id) is not None


def check_volume_id(volume_id: str) -> None:
    """Raise InvalidReplicaIdError unless ``volume_id`` can safely name a replica."""
    if not is_valid_volume_id(volume_id):
        raise InvalidReplicaIdError(f"invalid volume id {volume_id!r}")


def check_size(size_bytes: int) -> None:
    """Raise InvalidSizeError unless ``size_bytes`` is a positive multiple of BLOCK_SIZE."""
    # bool is an int subclass; True as a size is a caller bug, not 1 byte.
    if isinstance(size_bytes, bool) or not isinstance(size_bytes, int):
        raise InvalidSizeError(f"size must be an int, got {size_bytes!r}")
    if size_bytes <= 0 or size_bytes % BLOCK_SIZE:
        raise InvalidSizeError(
            f"size must be a positive multiple of {BLOCK_SIZE} bytes, got {size_bytes}"
        )


def check_range(offset: int, length: int, size_bytes: int) -> None:
    """Raise InvalidSizeError unless [offset, offset+length) lies inside a replica of size."""
    if offset < 0 or length < 0 or offset + length > size_bytes:
        raise InvalidSizeError(
            f"range offset={offset} length={length} is outside the replica (size {size_bytes})"
        )


def open_pool(kind: str, **options: Any) -> Pool:
    """Build the pool backend named ``kind`` ("file" or "lvm") from its constructor options.

    Unknown kinds are a ValueError; options the backend does not take are a TypeError.
    """
    # Imported here, not at the top: both backends import this module (an import cycle).
    from replication.pool.file import FilePool
    from replication.pool.lvm import LvmPool

    backends: dict[str, type[Pool]] = {FilePool.kind: FilePool, LvmPool.kind: LvmPool}
    try:
        backend = backends[kind]
    except KeyError:
        raise ValueError(
            f"unknown pool kind {kind!r}; expected one of {sorted(backends)}"
        ) from None
    pool: Pool = backend(**options)
    return pool
