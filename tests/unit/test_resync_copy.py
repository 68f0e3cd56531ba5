"""A rebuild's copy loop keeps what it did not copy marked (replication/resync.py).

The dirty bitmap a rebuild works from outlives it: it is saved, and the next rebuild of the
same replica trusts it instead of comparing checksums. A region cleared but never copied
(the copy failed, or the rebuild was aborted mid-copy) would never be copied again, and the
replica could join the ISR without acknowledged writes. The backend and the replica client
here are stand-ins for the few calls the copy loop makes; what is checked is the bitmap.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest

from replication.bitmap import DirtyBitmap
from replication.errors import ReplicaUnavailableError
from replication.messages import Op, Response, Status
from replication.resync import Resync, ResyncFailedError

REGION = 1 << 16
REGIONS = 4


class Backend:
    volume_id = "vol-1"
    epoch = 3
    size = REGIONS * REGION

    def __init__(self) -> None:
        self.joined: list[str] = []

    async def quiesce(self) -> None:
        return None

    async def read_source(self, offset: int, length: int) -> bytes:
        return bytes([offset // REGION]) * length

    @contextlib.asynccontextmanager
    async def writes_paused(self) -> AsyncIterator[None]:
        yield

    async def join(self, node: str) -> None:
        self.joined.append(node)

    async def report_progress(self, node: str, progress: object) -> None:
        return None


class Client:
    """Copies succeed until ``fail_at`` (the n-th write, from 1): then ``outcome``."""

    node_id = "node-2"

    def __init__(self, fail_at: int, outcome: str) -> None:
        self.fail_at, self.outcome = fail_at, outcome
        self.written: list[int] = []
        self.started = asyncio.Event()

    async def write(self, volume_id: str, epoch: int, offset: int, data: bytes) -> Response:
        if len(self.written) + 1 == self.fail_at:
            if self.outcome == "status":
                return Response(Op.WRITE, 1, Status.EIO)
            if self.outcome == "raise":
                raise ReplicaUnavailableError("connection lost")
            self.started.set()
            await asyncio.Event().wait()  # "hang": the rebuild is aborted (cancelled) here
        self.written.append(offset)
        return Response(Op.WRITE, 1)


def _resync(client: Client, marked: list[int]) -> tuple[Resync, DirtyBitmap]:
    bitmap = DirtyBitmap(REGIONS * REGION, REGION)
    for index in marked:
        bitmap.mark(index * REGION, REGION)
    resync = Resync(cast(Any, Backend()), client.node_id, cast(Any, client), bitmap, join=True)
    return resync, bitmap


@pytest.mark.parametrize("outcome", ["status", "raise"])
def test_a_failed_copy_leaves_its_region_and_the_rest_marked(outcome: str) -> None:
    client = Client(fail_at=2, outcome=outcome)
    resync, bitmap = _resync(client, [0, 1, 3])
    with pytest.raises((ResyncFailedError, ReplicaUnavailableError)):
        asyncio.run(resync.run())
    assert client.written == [0]  # region 0 copied
    assert [i for i in range(REGIONS) if bitmap.is_marked(i)] == [1, 3]


def test_an_aborted_copy_leaves_its_region_marked() -> None:
    client = Client(fail_at=2, outcome="hang")
    resync, bitmap = _resync(client, [0, 2])

    async def go() -> None:
        task = asyncio.create_task(resync.run())
        await client.started.wait()
        task.cancel()  # the replica was dropped again mid-rebuild
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    assert [i for i in range(REGIONS) if bitmap.is_marked(i)] == [2]


def test_the_next_rebuild_copies_what_the_failed_one_did_not() -> None:
    first = Client(fail_at=1, outcome="raise")
    resync, bitmap = _resync(first, [1, 2])
    with pytest.raises(ReplicaUnavailableError):
        asyncio.run(resync.run())
    second = Client(fail_at=0, outcome="")
    again = Resync(cast(Any, Backend()), "node-2", cast(Any, second), bitmap, join=False)
    asyncio.run(again._copy_marked())
    assert second.written == [1 * REGION, 2 * REGION]
    assert not any(bitmap.is_marked(i) for i in range(REGIONS))
