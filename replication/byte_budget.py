"""The cap on a volume's write bytes in flight: writers wait (backpressure), memory does not
grow with a client that writes faster than the slowest replica answers.

Must not: fail a writer; it only makes it wait.
"""

from __future__ import annotations

import asyncio
from collections import deque


class ByteBudget:
    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._used = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def try_acquire(self, n: int) -> bool:
        """Synchronous fast path: no coroutine when the budget has room (the common case)."""
        n = min(n, self._limit)
        if self._waiters or self._used + n > self._limit:
            return False
        self._used += n
        return True

    async def acquire(self, n: int) -> None:
        n = min(n, self._limit)
        while self._used + n > self._limit:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter
        self._used += n

    def release(self, n: int) -> None:
        self._used -= min(n, self._limit)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
