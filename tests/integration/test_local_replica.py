"""LocalReplica (direct I/O on the owner's own replica) against a real replica server process.

The test process plays the target: it fences, registers as direct writer and writes the
replica through its own descriptor, while a second connection observes through the server.
The fencing side is checked with a stand-in writer process (the server SIGKILLs writers it
finds below a new fence, and the test process must not be the one it kills).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from replication.local_replica import LocalReplica
from replication.local_writers import LocalWriters
from replication.messages import Op, Status
from replication.payloads import StatInfo, WriteBatch
from replication.replica_client import ReplicaClient
from replication.replica_connection import expect_ok
from tests.credentials import auth
from tests.integration.test_replica_server import VOL, ServerProcess, connect, run, serving

pytestmark = pytest.mark.integration

SIZE = 16 << 20


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    yield from serving(ServerProcess(tmp_path, local_writers=tmp_path / "writers"), SIZE)


def replica_path(srv: ServerProcess) -> str:
    info = srv.pool.get(VOL)
    assert info is not None
    return str(info.path)


async def open_local(srv: ServerProcess, epoch: int) -> LocalReplica:
    local = await LocalReplica.connect("127.0.0.1", srv.port, auth("node-a"))
    local.enable_direct(replica_path(srv), LocalWriters(srv.base / "writers"))
    expect_ok(await local.fence(VOL, epoch))
    return local


async def server_read(client: ReplicaClient, offset: int, length: int) -> bytes:
    return bytes(expect_ok(await client.read(VOL, 0, offset, length)).payload)


def test_direct_io_lands_in_the_replica_and_marks_it_dirty_first(server: ServerProcess) -> None:
    async def go() -> None:
        local = await open_local(server, 1)
        observer = await connect(server)
        try:
            assert local.direct
            entry = server.base / "writers" / f"{VOL}.1.writer"
            assert entry.exists(), "a direct writer is registered before it writes"
            for i in range(64):
                expect_ok(await local.write(VOL, 1, i * 4096, bytes([i]) * 4096))
            stat = StatInfo.decode(expect_ok(await observer.stat(VOL, 0)).payload)
            assert stat.dirty, "the first write (through the server) marked the replica dirty"
            assert await server_read(observer, 0, 64 * 4096) == b"".join(
                bytes([i]) * 4096 for i in range(64))
            # Reads come back from the descriptor; FUA writes are synced in a thread.
            expect_ok(await local.write(VOL, 1, 1 << 20, b"f" * 8192, fua=True))
            got = expect_ok(await local.read(VOL, 1, 1 << 20, 8192)).payload
            assert bytes(got) == b"f" * 8192
            expect_ok(await local.flush(VOL, 1))
        finally:
            local.close()
            observer.close()
        assert not entry.exists(), "closing the last connection unregisters"

    run(go())


def test_ops_through_the_server_keep_the_issue_order(server: ServerProcess) -> None:
    """A write issued after a TRIM must land after it, as on every remote replica."""
    async def go() -> None:
        local = await open_local(server, 1)
        observer = await connect(server)
        try:
            expect_ok(await local.write(VOL, 1, 0, b"a" * 4096))  # through the server
            for round_ in range(20):
                payload = bytes([0x41 + round_ % 26]) * 65536
                before = local.write(VOL, 1, 0, b"z" * 65536)
                trim = local.trim(VOL, 1, 0, 65536)
                after = local.write(VOL, 1, 0, payload)
                for fut in (before, trim, after):
                    expect_ok(await fut)
                assert await server_read(observer, 0, 65536) == payload, f"round {round_}"
        finally:
            local.close()
            observer.close()

    run(go())


def test_batches_go_direct_and_keep_the_issue_order(server: ServerProcess) -> None:
    """Batches are written through the descriptor (the first one through the server, which
    marks the replica dirty), and behind a TRIM still in flight they follow it."""
    async def go() -> None:
        local = await open_local(server, 1)
        observer = await connect(server)
        try:
            first = WriteBatch.build([(0, b"a" * 4096), (8192, b"b" * 4096)])
            assert expect_ok(await local.write_batch(VOL, 1, first)).op is Op.WRITE_BATCH
            stat = StatInfo.decode(expect_ok(await observer.stat(VOL, 0)).payload)
            assert stat.dirty
            for round_ in range(20):
                payload = bytes([0x41 + round_ % 26]) * 65536
                before = local.write_batch(VOL, 1, WriteBatch.build([(0, b"z" * 65536)]))
                assert before.done(), "a batch with nothing in flight is written directly"
                trim = local.trim(VOL, 1, 0, 65536)
                after = local.write_batch(VOL, 1, WriteBatch.build([(0, payload)]))
                for fut in (before, trim, after):
                    expect_ok(await fut)
                assert await server_read(observer, 0, 65536) == payload, f"round {round_}"
            fua = local.write_batch(VOL, 1, WriteBatch.build([(1 << 20, b"f" * 4096)]), fua=True)
            expect_ok(await fua)
            assert await server_read(observer, 1 << 20, 4096) == b"f" * 4096
        finally:
            local.close()
            observer.close()

    run(go())


def test_fence_above_a_direct_writer_ends_it_before_the_reply(server: ServerProcess) -> None:
    writers = LocalWriters(server.base / "writers")
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        async def go() -> None:
            owner = await connect(server)
            expect_ok(await owner.fence(VOL, 1))
            writers.register(VOL, 1, pid=stand_in.pid)
            same = await connect(server)
            expect_ok(await same.fence(VOL, 1))  # the same epoch again: nobody is ended
            assert stand_in.poll() is None
            newer = await connect(server)
            response = await newer.fence(VOL, 2)
            assert response.status is Status.OK
            # Answered only once the writer is gone (it exited; its zombie is ours to reap).
            assert stand_in.wait(timeout=1) == -9
            stale = await owner.write(VOL, 1, 0, b"x" * 4096)
            assert stale.status is Status.STALE_EPOCH
            for client in (owner, same, newer):
                client.close()

        run(go())
    finally:
        stand_in.kill()
        stand_in.wait()


def test_a_replica_fenced_higher_is_never_opened(server: ServerProcess) -> None:
    async def go() -> None:
        newer = await connect(server)
        expect_ok(await newer.fence(VOL, 5))
        local = await LocalReplica.connect("127.0.0.1", server.port, auth("node-a"))
        local.enable_direct(replica_path(server), LocalWriters(server.base / "writers"))
        response = await local.fence(VOL, 4)
        assert response.status is Status.STALE_EPOCH
        assert not local.direct
        assert list((server.base / "writers").glob("*.writer")) == []
        local.close()
        newer.close()

    run(go())


def test_without_a_usable_path_it_falls_back_to_the_server(server: ServerProcess) -> None:
    async def go() -> None:
        local = await LocalReplica.connect("127.0.0.1", server.port, auth("node-a"))
        local.enable_direct(os.fspath(server.base / "no-such-file"),
                            LocalWriters(server.base / "writers"))
        expect_ok(await local.fence(VOL, 1))
        assert not local.direct
        expect_ok(await local.write(VOL, 1, 0, b"s" * 4096))
        assert bytes(expect_ok(await local.read(VOL, 1, 0, 4096)).payload) == b"s" * 4096
        assert list((server.base / "writers").glob("*.writer")) == []
        local.close()

    run(go())
