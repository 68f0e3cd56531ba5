"""ReplicaServer (as ``python -m replication.replica_server_cli``) driven by ReplicaClient.

Each test runs a real server process on 127.0.0.1 over a FilePool in a temporary directory;
the test creates replicas through its own FilePool on the same directory (the pool's file
lock makes that safe) and talks to the server from its own event loop. Failures are real:
SIGKILL, SIGSTOP, garbage on a raw socket. The server process is always killed and reaped.
"""

from __future__ import annotations

import asyncio
import os
import random
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Coroutine, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

from replication.errors import ReplicaStatusError, ReplicaUnavailableError, StaleEpochError
from replication.messages import ChecksumAlgo, Op, Response, Role, Status
from replication.payloads import StatInfo, WriteBatch, block_digests
from replication.pool.file import FilePool
from replication.protocol import Connection
from replication.replica_client import ReplicaClient
from replication.replica_connection import expect_ok
from tests.credentials import auth, write_secret

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20
SIZE = 64 * MIB
VOL = "vol-a"
_T = TypeVar("_T")


class ServerProcess:
    """One replica server process over ``base``/pool and ``base``/meta."""

    def __init__(self, base: Path, local_writers: Path | None = None) -> None:
        self.base = base
        self.local_writers = local_writers
        self.pool = FilePool(base / "pool", 1 << 30)
        self.secret_file = write_secret(base / "secret")
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.log = base / "server.log"

    def start(self) -> None:
        argv = [sys.executable, "-m", "replication.replica_server_cli"]
        argv += ["--pool-dir", str(self.base / "pool"), "--pool-size", str(1 << 30)]
        argv += ["--meta-dir", str(self.base / "meta"), "--node-id", "node-b"]
        argv += ["--listen", f"127.0.0.1:{self.port}"]  # 0 first, then the same port again
        argv += ["--secret-file", str(self.secret_file)]
        argv += ["--local-writers-dir", str(self.local_writers)] if self.local_writers else []
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=log)
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            ready = sel.select(timeout=15)
        line = self.proc.stdout.readline().decode() if ready else ""
        assert line.startswith("listening "), f"server did not start: {self.log.read_text()}"
        self.port = int(line.rsplit(":", 1)[1])

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped process dies too, but be plain
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(timeout=10)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
        self.proc = None


def serving(srv: ServerProcess, size: int = SIZE) -> Iterator[ServerProcess]:
    """Create the test replica, start ``srv``, yield it, always kill it."""
    srv.pool.create(VOL, size)
    try:
        srv.start()
        yield srv
    finally:
        srv.kill()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    yield from serving(ServerProcess(tmp_path))


def run(coro: Coroutine[Any, Any, _T]) -> _T:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


async def connect(srv: ServerProcess, timeout: float = 5.0) -> ReplicaClient:
    return await ReplicaClient.connect("127.0.0.1", srv.port, auth("node-a"),
                                       request_timeout_s=timeout)


async def fenced(srv: ServerProcess, epoch: int = 1) -> ReplicaClient:
    client = await connect(srv)
    expect_ok(await client.fence(VOL, epoch))
    return client


async def read_all(client: ReplicaClient, epoch: int, offset: int, length: int) -> bytes:
    chunks = [
        client.read(VOL, epoch, pos, min(MIB, offset + length - pos))
        for pos in range(offset, offset + length, MIB)
    ]
    return b"".join(bytes(expect_ok(r).payload) for r in await asyncio.gather(*chunks))


def image(srv: ServerProcess) -> Path:
    return srv.base / "pool" / f"{VOL}.img"


def test_hello_names_the_replica_node(server: ServerProcess) -> None:
    async def body() -> None:
        client = await connect(server)
        assert (client.node_id, client.address, client.closed) == (
            "node-b",
            ("127.0.0.1", server.port),
            False,
        )
        client.close()
        assert client.closed

    run(body())


def test_pipelined_random_writes_read_back_and_match_the_file(server: ServerProcess) -> None:
    rng = random.Random(1)
    model = bytearray(16 * MIB)

    async def body() -> None:
        client = await fenced(server)
        futures = []
        for _ in range(1000):  # random byte offsets: overlaps must apply in order
            offset = rng.randrange(len(model) - 4096)
            data = rng.randbytes(4096)
            model[offset : offset + 4096] = data
            futures.append(client.write(VOL, 1, offset, data))
        assert client.in_flight == 1000
        for response in await asyncio.gather(*futures):
            expect_ok(response)
        assert await read_all(client, 1, 0, len(model)) == model
        big = await client.read(VOL, 1, MIB, 4 * MIB)  # a worker-thread read
        assert bytes(expect_ok(big).payload) == model[MIB : 5 * MIB]
        expect_ok(await client.flush(VOL, 1))
        client.close()

    run(body())
    with open(image(server), "rb") as f:
        assert f.read(len(model)) == model


def test_write_batches_apply_in_order_all_or_nothing(server: ServerProcess) -> None:
    rng = random.Random(7)
    model = bytearray(8 * MIB)

    async def body() -> None:
        client = await fenced(server, 3)
        futures = []
        for _ in range(40):  # overlapping writes within and across batches, some > 64 KiB
            writes = []
            for _ in range(rng.randrange(1, 20)):
                offset = rng.randrange(len(model) - 200_000)
                data = rng.randbytes(rng.choice([512, 4096, 200_000]))
                model[offset:offset + len(data)] = data
                writes.append((offset, data))
            futures.append(client.write_batch(VOL, 3, WriteBatch.build(writes)))
        for response in await asyncio.gather(*futures):
            assert response.op is Op.WRITE_BATCH and expect_ok(response).epoch == 3
        assert await read_all(client, 3, 0, len(model)) == model
        # One entry beyond the end: none of the batch lands.
        bad = WriteBatch.build([(0, b"n" * 4096), (SIZE - 100, b"x" * 4096)])
        assert (await client.write_batch(VOL, 3, bad)).status is Status.OUT_OF_RANGE
        stale = await client.write_batch(VOL, 2, WriteBatch.build([(0, b"s" * 4096)]))
        assert (stale.status, stale.epoch) == (Status.STALE_EPOCH, 3)
        assert await read_all(client, 3, 0, 4096) == model[:4096]
        durable = WriteBatch.build([(4096, b"f" * 4096)])
        expect_ok(await client.write_batch(VOL, 3, durable, fua=True))
        model[4096:8192] = b"f" * 4096
        client.close()

    run(body())
    with open(image(server), "rb") as f:
        assert f.read(len(model)) == model


def test_checksums_equal_locally_computed_digests(server: ServerProcess) -> None:
    data = random.Random(2).randbytes(3 * MIB + 1536)

    async def body() -> None:
        client = await fenced(server)
        expect_ok(await client.write(VOL, 1, 8192, data))
        for algo in ChecksumAlgo:
            for length in (64 * 1024, len(data)):  # inline, and in a worker thread
                for epoch in (1, 0):  # the owner, and an observer
                    got = await client.checksum(VOL, epoch, 8192, length, 4096, algo)
                    assert bytes(expect_ok(got).payload) == block_digests(data[:length], 4096, algo)
        big = await client.checksum(VOL, 1, 0, 2 * MIB, 1 << 20, ChecksumAlgo.CRC32)
        local = bytes(8192) + data[: 2 * MIB - 8192]
        assert bytes(expect_ok(big).payload) == block_digests(local, 1 << 20, ChecksumAlgo.CRC32)
        client.close()

    run(body())


def test_trim_frees_blocks_and_reads_back_zeros(server: ServerProcess) -> None:
    data = random.Random(3).randbytes(MIB)

    async def body() -> None:
        client = await fenced(server)
        for i in range(8):
            expect_ok(await client.write(VOL, 1, i * MIB, data))
        expect_ok(await client.flush(VOL, 1))
        before = image(server).stat().st_blocks * 512
        assert before >= 8 * MIB
        expect_ok(await client.trim(VOL, 1, 0, 4 * MIB))  # worker thread + barrier
        expect_ok(await client.trim(VOL, 1, 4 * MIB, 64 * 1024, fua=True))  # inline
        after = image(server).stat().st_blocks * 512
        assert before - after >= 4 * MIB + 64 * 1024
        assert await read_all(client, 1, 0, 4 * MIB + 64 * 1024) == bytes(4 * MIB + 64 * 1024)
        assert await read_all(client, 1, 5 * MIB, MIB) == data
        client.close()

    run(body())


def test_write_zeroes_reads_back_zeros_with_and_without_holes(server: ServerProcess) -> None:
    data = random.Random(4).randbytes(MIB)

    async def body() -> None:
        client = await fenced(server)
        for i in range(6):
            expect_ok(await client.write(VOL, 1, i * MIB, data))
        expect_ok(await client.flush(VOL, 1))
        before = image(server).stat().st_blocks * 512
        expect_ok(await client.write_zeroes(VOL, 1, 0, MIB))  # punched, inline
        expect_ok(await client.write_zeroes(VOL, 1, MIB, 3 * MIB, no_hole=True))  # thread
        expect_ok(await client.write_zeroes(VOL, 1, 4 * MIB, 4096, no_hole=True, fua=True))
        assert await read_all(client, 1, 0, 4 * MIB + 4096) == bytes(4 * MIB + 4096)
        assert await read_all(client, 1, 4 * MIB + 4096, 4096) == data[4096:8192]
        freed = before - image(server).stat().st_blocks * 512
        assert MIB <= freed < 2 * MIB  # only the punched MiB: NO_HOLE kept its blocks
        client.close()

    run(body())


def test_a_big_range_op_holds_back_the_requests_behind_it(server: ServerProcess) -> None:
    data = random.Random(5).randbytes(4096)

    async def body() -> None:
        client = await fenced(server)
        expect_ok(await client.write(VOL, 1, 0, random.Random(6).randbytes(8 * MIB)))
        # One tick, one batch: the write must land after the zeroing, the read after both.
        zero = client.write_zeroes(VOL, 1, 0, 8 * MIB, no_hole=True)
        write = client.write(VOL, 1, 4 * MIB, data)
        read = client.read(VOL, 1, 4 * MIB - 4096, 3 * 4096)
        for response in await asyncio.gather(zero, write):
            expect_ok(response)
        assert bytes(expect_ok(await read).payload) == bytes(4096) + data + bytes(4096)
        client.close()

    run(body())


def test_epoch_rules(server: ServerProcess) -> None:
    async def body() -> None:
        client = await connect(server)
        unfenced = await client.write(VOL, 0, 0, b"x" * 4096)
        assert (unfenced.status, unfenced.epoch) == (Status.INVALID, 0)
        expect_ok(await client.fence(VOL, 5))
        stale = await client.write(VOL, 4, 0, b"x" * 4096)
        assert (stale.status, stale.epoch) == (Status.STALE_EPOCH, 5)
        with pytest.raises(StaleEpochError) as caught:
            expect_ok(stale)
        assert caught.value.fenced_epoch == 5
        ahead = await client.write(VOL, 6, 0, b"x" * 4096)
        assert (ahead.status, ahead.epoch) == (Status.INVALID, 5)
        assert b"not fenced at epoch 6" in bytes(ahead.payload)
        refused = await client.fence(VOL, 4)
        assert (refused.status, refused.epoch) == (Status.STALE_EPOCH, 5)
        for request in (client.flush, client.stat):
            assert (await request(VOL, 3)).status is Status.STALE_EPOCH
        assert (await client.settle(VOL, 0, 1)).status is Status.STALE_EPOCH
        expect_ok(await client.read(VOL, 0, 0, 4096))  # an observer may read
        expect_ok(await client.write(VOL, 5, 0, b"x" * 4096))
        stat = StatInfo.decode(expect_ok(await client.stat(VOL, 0)).payload)
        assert stat == StatInfo(SIZE, 5, 1, True)
        expect_ok(await client.fence(VOL, 5))  # the same epoch again: no new generation
        expect_ok(await client.fence(VOL, 7))
        expect_ok(await client.settle(VOL, 7, 99))
        stat = StatInfo.decode(expect_ok(await client.stat(VOL, 7)).payload)
        assert stat == StatInfo(SIZE, 7, 2, False)
        client.close()

    run(body())


def test_the_fence_survives_a_kill_9(server: ServerProcess) -> None:
    async def before() -> None:
        client = await fenced(server, 5)
        expect_ok(await client.write(VOL, 5, 0, b"y" * 4096))
        client.close()

    async def after() -> None:
        client = await connect(server)
        stale = await client.write(VOL, 4, 0, b"z" * 4096)
        assert (stale.status, stale.epoch) == (Status.STALE_EPOCH, 5)
        stat = StatInfo.decode(expect_ok(await client.stat(VOL, 0)).payload)
        assert stat == StatInfo(SIZE, 5, 1, True)  # dirty was durable before the write
        assert bytes(expect_ok(await client.read(VOL, 5, 0, 4096)).payload) == b"y" * 4096
        client.close()

    run(before())
    server.kill()
    server.start()
    run(after())


def test_bounds_and_missing_replicas(server: ServerProcess) -> None:
    async def body() -> None:
        client = await fenced(server)
        beyond = await client.write(VOL, 1, SIZE - 100, b"x" * 4096)
        assert (beyond.status, beyond.epoch) == (Status.OUT_OF_RANGE, 1)
        for response in await asyncio.gather(
            client.read(VOL, 1, SIZE, 1),
            client.trim(VOL, 1, SIZE - 4096, 8192),
            client.checksum(VOL, 1, SIZE - 4096, 8192, 4096),
        ):
            assert response.status is Status.OUT_OF_RANGE
        expect_ok(await client.write(VOL, 1, SIZE - 4096, b"x" * 4096))  # the last block
        missing = await client.fence("vol-nope", 1)
        assert missing.status is Status.NOT_FOUND
        with pytest.raises(ReplicaStatusError) as caught:
            expect_ok(missing)
        assert caught.value.status == Status.NOT_FOUND
        server.pool.create("vol-late", 8 * MIB)  # created while the server runs
        expect_ok(await client.fence("vol-late", 1))
        expect_ok(await client.write("vol-late", 1, 0, b"x" * 4096))
        client.close()

    run(body())


def test_a_replica_deleted_under_the_server_is_noticed(server: ServerProcess) -> None:
    async def body() -> None:
        client = await fenced(server)
        expect_ok(await client.write(VOL, 1, 0, b"x" * 4096))
        server.pool.delete(VOL)
        deadline = time.monotonic() + 3
        while (await client.read(VOL, 0, 0, 4096)).status is not Status.NOT_FOUND:
            assert time.monotonic() < deadline, "the server still serves a deleted replica"
            await asyncio.sleep(0.1)
        server.pool.create(VOL, SIZE)
        assert bytes(expect_ok(await client.read(VOL, 1, 0, 4096)).payload) == bytes(4096)
        client.close()

    run(body())


def test_garbage_closes_only_that_connection(server: ServerProcess) -> None:
    async def body() -> None:
        client = await fenced(server)
        for garbage in (b"GARBAGE!" * 16, b"TDM1" + bytes(60)):
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
                raw.sendall(garbage)
                assert raw.recv(4096) == b""  # closed by the server, nothing sent back
        expect_ok(await client.write(VOL, 1, 0, b"x" * 4096))  # the others keep working
        other = await connect(server)
        expect_ok(await other.read(VOL, 0, 0, 4096))
        other.close()
        client.close()

    run(body())
    assert "protocol error" in server.log.read_text()
    assert server.proc is not None and server.proc.poll() is None


def test_a_peer_without_the_secret_is_refused(server: ServerProcess) -> None:
    """Issue 11 #1/#2: with different secrets neither side can prove itself: the client
    notices first and never sends a proof of its own. The right secret works. (A client
    that sends a guessed proof anyway: tests/fault/test_hostile_clients.py.)"""

    async def body() -> None:
        with pytest.raises(ReplicaUnavailableError, match="failed to authenticate"):
            await ReplicaClient.connect("127.0.0.1", server.port, auth("node-a", b"w" * 32))
        client = await connect(server)
        assert client.node_id == "node-b"
        client.close()

    run(body())


def test_connect_to_nothing_is_unavailable(server: ServerProcess) -> None:
    server.kill()

    async def body() -> None:
        with pytest.raises(ReplicaUnavailableError):
            await connect(server)

    run(body())


def test_a_killed_server_fails_pending_requests_at_once(server: ServerProcess) -> None:
    async def body() -> None:
        client = await fenced(server)
        lost: list[str] = []
        client.on_lost(lost.append)
        server.signal(signal.SIGSTOP)  # so the requests are surely still pending
        futures = [client.write(VOL, 1, i * 4096, b"x" * 4096) for i in range(32)]
        await client.drain()  # the requests have left for the stopped server
        start = time.monotonic()
        server.kill()
        results = await asyncio.gather(*futures, return_exceptions=True)
        assert time.monotonic() - start < 1.0  # EOF/RST, not the 5 s request deadline
        assert all(isinstance(r, ReplicaUnavailableError) for r in results)
        assert len(lost) == 1 and client.closed
        late: list[str] = []
        client.on_lost(late.append)  # registered after the death: still told, once
        await asyncio.sleep(0)
        assert late == lost
        with pytest.raises(ReplicaUnavailableError):
            await client.write(VOL, 1, 0, b"x" * 4096)
        with pytest.raises(ReplicaUnavailableError):
            await client.drain()

    run(body())


def test_a_stopped_server_fails_requests_at_their_deadline(server: ServerProcess) -> None:
    async def body() -> None:
        client = await connect(server, timeout=1.0)
        expect_ok(await client.fence(VOL, 1))
        lost: list[str] = []
        client.on_lost(lost.append)
        server.signal(signal.SIGSTOP)
        try:
            start = time.monotonic()
            futures = [client.write(VOL, 1, 0, b"x" * 4096), client.flush(VOL, 1)]
            results: list[Response | BaseException] = await asyncio.gather(
                *futures, return_exceptions=True
            )
            elapsed = time.monotonic() - start
        finally:
            server.signal(signal.SIGCONT)
        assert all(isinstance(r, ReplicaUnavailableError) for r in results)
        assert elapsed >= 1.0  # never failed before its deadline (how soon after: no bound)
        assert len(lost) == 1 and "1 s" in lost[0]

    run(body())


def test_the_client_also_runs_on_the_default_event_loop(server: ServerProcess) -> None:
    async def body() -> None:
        client = await fenced(server)
        futures = [client.write(VOL, 1, i * 4096, os.urandom(4096), fua=i == 9) for i in range(10)]
        for response in await asyncio.gather(*futures):
            expect_ok(response)
        await client.drain()
        client.close()

    asyncio.run(body())


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10
    raise AssertionError(f"no VmRSS for {pid}")


def test_pipelined_reads_for_a_peer_that_does_not_read_stay_bounded(
    server: ServerProcess,
) -> None:
    """Issue 11 #5: 256 pipelined 1 MiB READs in one 19 KiB send made the server build
    256 MiB of replies at once. Replies now wait for a peer that does not read them (the
    server stops reading its requests too); once the peer reads, every reply arrives."""
    assert server.proc is not None
    conn = Connection(Role.CLIENT, auth=auth("node-a"))
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"".join(conn.encode_request(Op.HELLO, 1)))
        assert _responses(sock, conn, 1)[0].status is Status.OK
        sock.sendall(b"".join(conn.encode_auth(2)))
        assert _responses(sock, conn, 1)[0].status is Status.OK
        before = _rss(server.proc.pid)
        burst = b"".join(b"".join(conn.encode_request(Op.READ, 10 + i, VOL, 0, (i % 64) * MIB,
                                                      MIB)) for i in range(256))
        sock.sendall(burst)
        time.sleep(1.5)  # the server has done all it will do for a peer that does not read
        grown = _rss(server.proc.pid) - before
        replies = _responses(sock, conn, 256)
    print(f"256 unread 1 MiB READs grew the server by {grown / MIB:.1f} MiB")
    assert grown < 48 * MIB, f"the server grew by {grown >> 20} MiB for unread replies"
    assert [r.request_id for r in replies] == list(range(10, 266))
    assert all(r.status is Status.OK and len(r.payload) == MIB for r in replies)


def _responses(sock: socket.socket, conn: Connection, count: int) -> list[Response]:
    out: list[Response] = []
    while len(out) < count:
        data = sock.recv(1 << 20)
        assert data, "the server closed the connection"
        for ev in conn.receive_data(data):
            assert isinstance(ev, Response), ev
            out.append(replace(ev, payload=bytes(ev.payload)))
    return out
