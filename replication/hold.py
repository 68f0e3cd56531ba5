"""Holding I/O while ownership cannot be confirmed, and regaining it (``queue_if_no_path``).

When the target's lease may have lapsed (etcd unreachable, say), it must stop
acknowledging (self-fencing, I6), but it need not fail the I/O: like multipath's
``queue_if_no_path``, requests wait while a background task asks the ``Authority`` to take
the claim again at the same epoch. If it does, every held request proceeds as if nothing
happened; if another owner took over meanwhile, the target is fenced and held requests
fail with EIO; after ``timeout_s`` without success they fail with EIO too, and new ones fail
at once, while regaining goes on in the background (a volume heals when etcd does, without
a restage).

Must not: decide anything about ownership itself (the Authority does) or touch replicas.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Callable

from replication.authority import Authority, AuthorityUnavailableError, FencedError
from replication.backend import BackendIOError

log = logging.getLogger(__name__)

DEFAULT_HOLD_S = 30.0
REGAIN_RETRY_S = 0.25


class HeldError(BackendIOError):
    """Not acknowledged *yet*: ownership is being regained; wait on ``Hold.wait()``."""

    def __init__(self) -> None:
        super().__init__(errno.EAGAIN, "holding I/O: ownership lease not confirmed")


class Hold:
    def __init__(self, authority: Authority, timeout_s: float,
                 fence: Callable[[str], None], ctx: str) -> None:
        self._authority = authority
        self.timeout_s = timeout_s
        self._fence = fence  # called once with the reason when someone else took over
        self._ctx = ctx
        self.since: float | None = None  # monotonic start of the current hold
        self.expired = False  # held longer than timeout_s: I/O fails until regained
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._task: asyncio.Task[None] | None = None
        self.regained = 0  # how many holds ended well (for operators and tests)

    @property
    def active(self) -> bool:
        return self.since is not None

    def begin(self) -> None:
        """Start holding (idempotent); the caller raises or waits."""
        if self.since is not None:
            return
        self.since = time.monotonic()
        self.expired = False
        self._resumed.clear()
        log.warning("%s ownership lease not confirmed: holding I/O up to %g s while the "
                    "claim is regained", self._ctx, self.timeout_s)
        self._task = asyncio.get_running_loop().create_task(self._regain())

    def check(self) -> None:
        """Raise what a request must see during a hold: HeldError, or EIO once expired."""
        if self.since is None:
            return
        if self.expired:
            raise BackendIOError(errno.EIO, f"ownership not confirmed for over {self.timeout_s:g}"
                                 " s (etcd unreachable?): I/O fails until it is regained")
        raise HeldError()

    async def wait(self) -> None:
        """Wait until the hold ends (regained, fenced or expired); the caller re-checks."""
        if self.since is None or self.expired:
            return
        remaining = self.since + self.timeout_s - time.monotonic()
        try:
            await asyncio.wait_for(self._resumed.wait(), max(remaining, 0.0))
        except TimeoutError:
            if self.since is not None and not self.expired:
                self.expired = True
                log.error("%s held I/O for %g s without regaining ownership: failing it",
                          self._ctx, self.timeout_s)

    async def _regain(self) -> None:
        while True:
            try:
                await self._authority.regain()
                self.regained += 1
                break
            except FencedError as exc:
                self._fence(f"ownership lost while holding I/O: {exc}")
                break
            except AuthorityUnavailableError as exc:
                log.debug("%s %s", self._ctx, exc)
            except Exception:  # keep trying: a crashed task would hold I/O forever
                log.exception("%s regaining ownership failed unexpectedly", self._ctx)
            await asyncio.sleep(REGAIN_RETRY_S)
        held = time.monotonic() - (self.since or time.monotonic())
        self.since = None
        self.expired = False
        self._resumed.set()
        log.warning("%s hold ended after %.1f s", self._ctx, held)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
