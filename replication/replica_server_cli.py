"""``python -m replication.replica_server_cli``: serve a file pool's replicas (manual and
integration testing; the node runs its ReplicaServer in process)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from replication.heap import keep_large_buffers_on_heap
from replication.local_writers import LocalWriters
from replication.peer_auth import PeerAuth, SecretError, load_secret
from replication.pool.base import Pool
from replication.replica_server import ReplicaServer

log = logging.getLogger(__name__)


def _parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"--listen must be HOST:PORT, not {listen!r}")
    return host.strip("[]"), int(port)


async def _serve(args: argparse.Namespace, pool: Pool) -> None:
    auth = PeerAuth(load_secret(Path(args.secret_file)), args.node_id)
    writers = LocalWriters(args.local_writers_dir) if args.local_writers_dir else None
    server = ReplicaServer(pool, Path(args.meta_dir), auth, local_writers=writers)
    host, port = args.listen
    await server.start(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening {host}:{server.port}", flush=True)  # the readiness line scripts wait for
    try:
        await stop.wait()
    finally:
        await server.close()


def main(argv: list[str] | None = None) -> int:
    """Manual and integration testing: serve a file pool's replicas."""
    from replication.pool.file import FilePool  # only the CLI picks a backend

    parser = argparse.ArgumentParser(prog="python -m replication.replica_server")
    parser.add_argument("--pool-dir", required=True)
    parser.add_argument("--pool-size", required=True, type=int, help="capacity in bytes")
    parser.add_argument("--meta-dir", required=True)
    parser.add_argument("--listen", required=True, type=_parse_listen, help="HOST:PORT")
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--secret-file", required=True,
                        help="the cluster secret peers must prove they hold (mode 0600)")
    parser.add_argument("--local-writers-dir",
                        help="registry of processes writing replicas directly (ended on fence)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
    )
    try:
        import uvloop
    except ImportError:  # plain asyncio works, ~3x slower per round trip
        runner = asyncio.Runner()
    else:
        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    keep_large_buffers_on_heap()
    try:
        with runner:
            runner.run(_serve(args, FilePool(args.pool_dir, args.pool_size)))
    except SecretError as exc:
        log.error("replica server: %s", exc)
        return 2
    except OSError as exc:
        log.error("replica server cannot serve on %s: %s", args.listen, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
