"""Pool calls never stall the node's event loop (issue 10 #9).

An LVM lookup runs ``lvs`` (~65 ms); on 7f5cc85 the replica engine called the pool inline
(housekeeping every second per open replica, opening, size checks, STAT, small TRIMs), so N
open replicas stalled the node's CSI service, agent and lease renewal for N x 65 ms a
second. Here every pool call takes 0.4 s (a blocking sleep, as a slow subprocess is), and a
ticker on the same loop, standing in for the lease renewal, must keep running meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import uvloop

from replication.messages import Status
from replication.pool.base import ReplicaInfo
from replication.pool.file import FilePool
from replication.replica_client import ReplicaClient
from replication.replica_connection import expect_ok
from replication.replica_server import HOUSEKEEPING_S, ReplicaServer
from tests.credentials import auth

SLOW_S = 0.4
SIZE = 16 << 20


class SlowPool(FilePool):
    """A file pool whose lookups and discards block like a slow tool."""

    calls = 0

    def get(self, volume_id: str) -> ReplicaInfo | None:
        SlowPool.calls += 1
        time.sleep(SLOW_S)
        return super().get(volume_id)

    def punch_hole(self, volume_id: str, offset: int, length: int) -> None:
        SlowPool.calls += 1
        time.sleep(SLOW_S)
        super().punch_hole(volume_id, offset, length)


async def _ticker(lags: list[float], stop: asyncio.Event) -> None:
    period = 0.02
    while not stop.is_set():
        start = time.monotonic()
        await asyncio.sleep(period)
        lags.append(time.monotonic() - start - period)


async def _scenario(tmp_path: Path) -> tuple[list[float], int]:
    pool = SlowPool(tmp_path / "pool", 1 << 30)
    for i in range(3):
        FilePool(tmp_path / "pool", 1 << 30).create(f"vol-{i}", SIZE)
    server = ReplicaServer(pool, tmp_path / "meta", auth("node-b"))
    await server.start("127.0.0.1", 0)
    lags: list[float] = []
    stop = asyncio.Event()
    ticker = asyncio.create_task(_ticker(lags, stop))
    client = await ReplicaClient.connect("127.0.0.1", server.port, auth("node-a"),
                                         request_timeout_s=10)
    try:
        for i in range(3):  # open (a lookup), write, grow past the known size, trim, stat
            vid = f"vol-{i}"
            expect_ok(await client.fence(vid, 1))
            expect_ok(await client.write(vid, 1, 0, b"x" * 4096))
            assert (await client.write(vid, 1, SIZE, b"x" * 4096)).status is Status.OUT_OF_RANGE
            expect_ok(await client.trim(vid, 1, 0, 4096))
            expect_ok(await client.stat(vid, 1))
        await asyncio.sleep(2 * HOUSEKEEPING_S + 3 * SLOW_S)  # a housekeeping round or two
    finally:
        client.close()
        stop.set()
        await ticker
        await server.close()
    return lags, SlowPool.calls


def test_a_slow_pool_never_stalls_the_event_loop(tmp_path: Path) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        lags, calls = runner.run(_scenario(tmp_path))
    assert calls >= 15, f"the scenario made only {calls} pool calls"
    # Each pool call blocks for 0.4 s: inline, the ticker would lag that much.
    assert max(lags) < SLOW_S / 2, f"the event loop stalled for {max(lags):.3f} s"
