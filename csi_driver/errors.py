"""The control plane's exception hierarchy.

Every error a CSI or agent RPC can answer with is one of these types; ``rpc.py`` maps them
(and the store's and data plane's errors) to gRPC status codes in one table. Code that
raises never picks a status code itself.
"""

from __future__ import annotations


class TandemError(Exception):
    """Root of the control plane's domain errors."""


class InvalidArgumentError(TandemError):
    """A request field is missing or has a value the driver does not accept."""


class NotFoundError(TandemError):
    """The volume (or node, or path) named by the request does not exist."""


class AlreadyExistsError(TandemError):
    """A volume with this name/path exists but is incompatible with the request."""


class OutOfRangeError(TandemError):
    """The requested capacity cannot be honoured."""


class ResourceExhaustedError(TandemError):
    """Not enough nodes or space (within the topology constraints) to place the volume."""


class FailedPreconditionError(TandemError):
    """The volume is in a state that does not allow the operation (in use, held elsewhere)."""


class OperationPendingError(TandemError):
    """Another operation on the same volume is in flight; the caller retries later."""


class UnavailableError(TandemError):
    """A dependency (etcd, a node agent) cannot be reached right now; retryable."""


class UnimplementedError(TandemError):
    """The RPC or feature is not supported by this driver (capabilities say so)."""


class InternalError(TandemError):
    """An invariant broke or a command failed unexpectedly; logged with its cause."""
