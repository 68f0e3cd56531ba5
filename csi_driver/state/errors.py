"""Store error hierarchy: every failure the state store reports to its callers.

Callers map these to gRPC status codes elsewhere; this module deliberately
knows nothing about gRPC so the store contract stays transport-neutral.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from csi_driver.state.model import Versioned, VolumeRecord


class StoreError(Exception):
    """Base of every store failure (also raised for unexpected backend errors)."""


class StoreUnavailableError(StoreError):
    """The backend could not be reached, or did not answer within the deadline.

    The operation may or may not have been applied: callers must re-read before
    assuming either outcome.
    """


class ConflictError(StoreError):
    """A compare-and-swap lost: the record changed (or vanished) since it was read.

    ``current`` is the record as it is now, or None if it no longer exists.
    """

    def __init__(self, message: str, current: Versioned[VolumeRecord] | None) -> None:
        super().__init__(message)
        self.current = current


class AlreadyExistsError(StoreError):
    """A create-if-absent found the id or the name already taken.

    ``existing`` is the volume holding the id or name, or None when the name
    index points at a volume that no longer exists.
    """

    def __init__(self, message: str, existing: Versioned[VolumeRecord] | None) -> None:
        super().__init__(message)
        self.existing = existing


class InvariantError(StoreError, ValueError):
    """The write would break a record invariant (I1b): refused, nothing written.

    A bug in the caller, never a transient condition: do not retry it.
    """


class LeaseExpiredError(StoreError):
    """The lease is unknown to the backend: it expired or was revoked."""


class CompactedError(StoreError):
    """A watch asked for history that etcd has already compacted away.

    The watcher must re-list and watch again from the listing's revision.
    """

    def __init__(self, message: str, compact_revision: int) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision
