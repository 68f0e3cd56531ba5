"""The process-wide reply budget (issue 11 #5): many authenticated peers that pipeline big
READs and never read the replies together hold at most about the budget, not each its own
per-connection bound; once they read, every reply arrives."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import uvloop

from replication.access import ConnectionLimits
from replication.messages import Op, Response, Role, Status
from replication.pool.file import FilePool
from replication.protocol import Connection
from replication.replica_server import ReplicaServer
from tests.credentials import auth

MIB = 1 << 20
PEERS, READS = 12, 48
LIMITS = ConnectionLimits(reply_budget_bytes=16 * MIB, reply_floor_bytes=MIB)


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmRSS")


async def _handshake(port: int, node: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter,
                                                      Connection]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn = Connection(Role.CLIENT, auth=auth(node))
    writer.write(b"".join(conn.encode_request(Op.HELLO, 1)))
    await _responses(reader, conn, 1)
    writer.write(b"".join(conn.encode_auth(2)))
    await _responses(reader, conn, 1)
    return reader, writer, conn


async def _responses(reader: asyncio.StreamReader, conn: Connection, count: int
                     ) -> list[Response]:
    out: list[Response] = []
    while len(out) < count:
        data = await reader.read(1 << 20)
        assert data, "the server closed the connection"
        for ev in conn.receive_data(data):
            assert isinstance(ev, Response), ev
            out.append(replace(ev, payload=b"") if ev.status is Status.OK else ev)
    return out


async def _scenario(tmp_path: Path) -> tuple[int, int, list[int]]:
    pool = FilePool(tmp_path / "pool", 1 << 30)
    pool.create("vol-b", 64 * MIB)
    server = ReplicaServer(pool, tmp_path / "meta", auth("node-b"), limits=LIMITS)
    await server.start("127.0.0.1", 0)
    try:
        peers = [await _handshake(server.port, f"node-{i}") for i in range(PEERS)]
        before = _rss()
        for _reader, writer, conn in peers:
            writer.write(b"".join(b"".join(conn.encode_request(
                Op.READ, 10 + i, "vol-b", 0, (i % 64) * MIB, MIB)) for i in range(READS)))
        # All the server will do while nobody reads; well within TCP_USER_TIMEOUT (3 s),
        # after which a peer whose window stays shut is cut off anyway.
        await asyncio.sleep(1.5)
        held = server.replies.queued
        grown = _rss() - before
        answered = [len(r) for r in await asyncio.gather(
            *(_responses(r, c, READS) for r, _w, c in peers))]
        for _r, writer, _c in peers:
            writer.close()
        return held, grown, answered
    finally:
        await server.close()


def test_unread_replies_of_many_peers_stay_within_the_process_budget(tmp_path: Path) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        held, grown, answered = runner.run(_scenario(tmp_path))
    print(f"{PEERS} peers x {READS} unread 1 MiB READs: {held / MIB:.1f} MiB queued, "
          f"RSS +{grown / MIB:.1f} MiB (per-connection bounds alone: ~{PEERS * 12} MiB)")
    # The budget, plus each peer's floor and the one reply that crossed it.
    assert held <= LIMITS.reply_budget_bytes + PEERS * (LIMITS.reply_floor_bytes + 2 * MIB)
    assert grown < 80 * MIB
    assert answered == [READS] * PEERS  # nothing lost: every reply arrives once read
