"""Benchmark: one ReplicaClient writing 4 KiB blocks to one replica server on loopback.

Owns: nothing the product imports; run ``.venv/bin/python bench/bench_replica.py``.
Must not: be imported by the driver or the tests.

The server runs as its own process (``python -m replication.replica_server_cli``, uvloop) over
a FilePool in a temporary directory, as on a replica node; the client keeps ``--qd`` writes
in flight (a new one is submitted as each completes, so batches form naturally per tick)
at random 4 KiB-aligned offsets for ``--seconds`` and reports writes/s and latency.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop

from replication.peer_auth import PeerAuth
from replication.pool.file import FilePool
from replication.replica_client import ReplicaClient
from replication.replica_connection import expect_ok

REPO = Path(__file__).resolve().parents[1]
VOLUME = "bench-vol"
SIZE = 1 << 30
BLOCK = 4096
SECRET = os.urandom(32).hex().encode()  # this run's cluster secret


def start_server(base: Path) -> tuple[subprocess.Popen[bytes], int]:
    FilePool(base / "pool", SIZE).create(VOLUME, SIZE)
    argv = [sys.executable, "-m", "replication.replica_server_cli"]
    argv += ["--pool-dir", str(base / "pool")]
    argv += ["--pool-size", str(SIZE), "--meta-dir", str(base / "meta"), "--node-id", "bench"]
    argv += ["--listen", "127.0.0.1:0", "--log-level", "WARNING"]
    secret = base / "secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    argv += ["--secret-file", str(secret)]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("listening "):
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}")
    return proc, int(line.rsplit(":", 1)[1])


async def bench(port: int, qd: int, seconds: float) -> tuple[int, float, list[float]]:
    """Writes done, seconds taken and each write's latency (connect and FENCE excluded)."""
    client = await ReplicaClient.connect("127.0.0.1", port, PeerAuth(SECRET, "bench-owner"))
    expect_ok(await client.fence(VOLUME, 1))
    payload = os.urandom(BLOCK)
    rng = random.Random(0)
    blocks = SIZE // BLOCK
    latencies: list[float] = []
    done = 0
    start = time.perf_counter()
    deadline = start + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            expect_ok(await client.write(VOLUME, 1, rng.randrange(blocks) * BLOCK, payload))
            latencies.append(time.perf_counter() - t0)
            done += 1

    await asyncio.gather(*(worker() for _ in range(qd)))
    elapsed = time.perf_counter() - start
    expect_ok(await client.flush(VOLUME, 1))
    client.close()
    return done, elapsed, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qd", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-replica-") as tmp:
        proc, port = start_server(Path(tmp))
        try:
            done, elapsed, lat = uvloop.run(bench(port, args.qd, args.seconds))
        finally:
            proc.kill()
            proc.wait()
    lat.sort()
    p50, p99 = (lat[int(len(lat) * q)] * 1e6 for q in (0.5, 0.99))
    print(
        f"4 KiB writes, QD {args.qd}, {elapsed:.1f} s: {done / elapsed:,.0f} writes/s "
        f"({done / elapsed * BLOCK / (1 << 20):.0f} MiB/s), latency p50 {p50:.0f} us, "
        f"p99 {p99:.0f} us, mean {statistics.fmean(lat) * 1e6:.0f} us"
    )


if __name__ == "__main__":
    main()
