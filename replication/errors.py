"""The data plane's exception hierarchy (pools, replicas, external commands).

Everything under ``replication`` raises one of these (or a builtin for programming errors),
so the control plane can map a whole family to a status code in one table. This module owns
only the types: no logic, no imports from the rest of the project, and never a gRPC code.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence


class ReplicationError(Exception):
    """Root of every data-plane error."""


class CommandError(ReplicationError):
    """An external command failed: non-zero exit (or, for subclasses, did not run to the end).

    ``returncode`` is None when the command never produced one (timeout, missing binary).
    """

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str) -> None:
        self.argv: tuple[str, ...] = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr
        detail = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        super().__init__(
            f"{shlex.join(self.argv)} exited with {returncode}" + (f": {detail}" if detail else "")
        )


class CommandTimeout(CommandError):
    """The command ran past its timeout; it was killed and reaped."""

    def __init__(self, argv: Sequence[str], timeout: float, stderr: str = "") -> None:
        super().__init__(argv, None, stderr)
        self.timeout = timeout
        self.args = (f"{shlex.join(self.argv)} timed out after {timeout:g}s",)


class CommandNotFound(CommandError):
    """The executable does not exist (or is not on PATH)."""

    def __init__(self, argv: Sequence[str], reason: str = "") -> None:
        super().__init__(argv, None, reason)
        self.args = (f"command not found: {self.argv[0] if self.argv else '?'}",)


class PoolError(ReplicationError):
    """A storage pool could not do what was asked."""


class PoolFullError(PoolError):
    """Not enough free space in the pool for the new or grown replica."""


class ReplicaNotFoundError(PoolError):
    """The replica named by the call does not exist in this pool."""


class ReplicaConflictError(PoolError):
    """The replica exists but is incompatible with the request (other size, shrink)."""


class InvalidReplicaIdError(PoolError, ValueError):
    """The volume id cannot name a replica (bad characters, path tricks, too long)."""


class InvalidSizeError(PoolError, ValueError):
    """A size or byte range is not positive or not a multiple of the block size."""


class ReplicaUnavailableError(ReplicationError):
    """A replica connection is dead (refused, reset, closed, timed out, protocol error).

    Every request still pending on that connection fails with this; ``reason`` says why.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ReplicaStatusError(ReplicationError):
    """A replica answered with a non-OK status; ``status`` is the wire number."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class StaleEpochError(ReplicationError):
    """The replica is fenced at ``fenced_epoch``, above the caller's: the caller is stale."""

    def __init__(self, fenced_epoch: int, message: str = "") -> None:
        super().__init__(message or f"replica is fenced at epoch {fenced_epoch}")
        self.fenced_epoch = fenced_epoch


class ReplicaMetaError(ReplicationError):
    """A replica's persisted metadata is unreadable or invalid; the replica is not served."""
