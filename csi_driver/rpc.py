"""The one place where errors become gRPC status codes, and the per-RPC log line.

``@rpc_method`` wraps every servicer method (CSI and agent): it logs one line per call with
its outcome and duration, and turns domain errors (``csi_driver.errors``), store errors and
data-plane errors into the status code the CSI spec names. Anything unexpected becomes
INTERNAL with the traceback logged, so a bad request can never crash a server.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from csi_driver import errors
from csi_driver.state import errors as store_errors
from csi_driver.validation import shown
from replication import errors as data_errors

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    Ctx = grpc.aio.ServicerContext[Any, Any]
else:  # the runtime class is not subscriptable
    Ctx = grpc.aio.ServicerContext

_STATUS_BY_TYPE: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (errors.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFoundError, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (errors.OutOfRangeError, grpc.StatusCode.OUT_OF_RANGE),
    (errors.ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.OperationPendingError, grpc.StatusCode.ABORTED),
    (errors.UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (errors.UnimplementedError, grpc.StatusCode.UNIMPLEMENTED),
    (errors.InternalError, grpc.StatusCode.INTERNAL),
    # The store: a lost CAS race is an operation that overlapped ours -> retry later.
    (store_errors.ConflictError, grpc.StatusCode.ABORTED),
    (store_errors.StoreUnavailableError, grpc.StatusCode.UNAVAILABLE),
    # The data plane (pools): agent RPCs surface these.
    (data_errors.PoolFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (data_errors.ReplicaNotFoundError, grpc.StatusCode.NOT_FOUND),
    (data_errors.ReplicaConflictError, grpc.StatusCode.ALREADY_EXISTS),
    (data_errors.InvalidReplicaIdError, grpc.StatusCode.INVALID_ARGUMENT),
    (data_errors.InvalidSizeError, grpc.StatusCode.INVALID_ARGUMENT),
)


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code for ``exc`` (INTERNAL for anything not in the table)."""
    for exc_type, code in _STATUS_BY_TYPE:
        if isinstance(exc, exc_type):
            return code
    return grpc.StatusCode.INTERNAL


R = TypeVar("R")
Handler = Callable[[Any, Any, Ctx], Awaitable[R]]


def _context_of(request: Any) -> str:
    """key=value context for the log line: the volume id when the request names one."""
    volume_id = getattr(request, "volume_id", "") or getattr(request, "name", "")
    if len(volume_id) > 128 or not volume_id.isprintable():
        volume_id = shown(volume_id)  # a hostile 2 MiB name must not become a 2 MiB log line
    return f" volume={volume_id}" if volume_id else ""


def rpc_method(fn: Handler[R]) -> Handler[R]:
    """Wrap a servicer coroutine: one log line per call, domain error -> status code."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: Ctx) -> R:
        started = time.monotonic()
        where = f"rpc={fn.__name__}{_context_of(request)}"
        try:
            response = await fn(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # every error must become a status, never a crash
            code = status_for(exc)
            ms = (time.monotonic() - started) * 1000
            if code is grpc.StatusCode.INTERNAL:
                log.exception("%s code=%s ms=%.1f", where, code.name, ms)
            else:
                log.info("%s code=%s ms=%.1f error=%s", where, code.name, ms, exc)
            await context.abort(code, str(exc) or type(exc).__name__)
        log.info("%s code=OK ms=%.1f", where, (time.monotonic() - started) * 1000)
        return response

    return wrapper
