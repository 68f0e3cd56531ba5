"""The per-volume target process: ``python -m csi_driver.node.target_main ...``.

One process per volume staged on a node (its own GIL and event loop, and no way for the
node process to deadlock on I/O to a device it serves itself). The node took ownership and
hands over the claim's lease (``--owner-lease``, ``--lease-granted-at``); the target becomes
the owner (keeps the lease alive, fences every replica, converges: the sequence is
csi_driver.node.takeover), rebuilds replicas that come back, and serves the NBD export on a
unix socket. SIGTERM flushes, releases the claim and exits 0. Exit status 3 means the
volume cannot be served (the message on stderr says why); 2 means bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from csi_driver.config import DEFAULT_LEASE_TTL_S, lease_ttl_arg

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from csi_driver.config import ConfigError, parse_etcd_endpoints
from csi_driver.node.ownership import OwnerLease
from csi_driver.node.takeover import (
    TakeoverRefusedError,
    become_owner,
    replica_endpoints,
)
from csi_driver.node.target_dump import dump_state
from csi_driver.state import errors as store_errors
from csi_driver.state.etcd import EtcdStore
from replication.atomic_file import write_atomic
from replication.backend import BackendIOError
from replication.fencing import connect_and_fence
from replication.heap import keep_large_buffers_on_heap
from replication.hold import DEFAULT_HOLD_S
from replication.local_replica import LocalReplica
from replication.local_writers import LocalWriters
from replication.nbd_server import NbdServer
from replication.peer_auth import PeerAuth, SecretError, load_secret
from replication.peer_tls import TlsConfigError, load_peer_tls, reload_forever
from replication.replica_client import ReplicaClient
from replication.target import ReplicaEndpoint, ReplicatedBackend

log = logging.getLogger("csi_driver.target")

REJOIN_INTERVAL_S = 2.0
CONDITION_EVERY_S = 1.0
FENCE_CONNECT_TIMEOUT_S = 1.0


class TargetStartError(Exception):
    """The volume cannot be served; exit 3 with this message."""


async def serve(args: argparse.Namespace) -> None:
    try:
        auth = PeerAuth(load_secret(Path(args.cluster_secret_file)), args.node_id)
        peer_tls = (load_peer_tls(Path(args.tls_cert_file), Path(args.tls_key_file),
                                  Path(args.tls_trust_file) if args.tls_trust_file else None)
                    if args.tls_cert_file else None)
        tls = peer_tls.client if peer_tls else None
    except (SecretError, TlsConfigError) as exc:
        raise TargetStartError(str(exc)) from None
    store = EtcdStore(parse_etcd_endpoints(args.etcd_endpoints), prefix=args.etcd_prefix)
    writers = LocalWriters(args.local_writers_dir) if args.local_replica_path else None

    async def connect(endpoint: ReplicaEndpoint) -> ReplicaClient:
        # A replica that does not answer within this is dropped from the ISR (and rebuilt
        # later): a takeover must not wait out a dead node's TCP timeout.
        if writers is None or endpoint.node_id != args.node_id:
            return await ReplicaClient.connect(endpoint.host, endpoint.port, auth, tls=tls,
                                               connect_timeout_s=FENCE_CONNECT_TIMEOUT_S)
        local = await LocalReplica.connect(endpoint.host, endpoint.port, auth, tls=tls,
                                           connect_timeout_s=FENCE_CONNECT_TIMEOUT_S)
        local.enable_direct(args.local_replica_path, writers)
        return local

    lease = OwnerLease(args.owner_lease, args.lease_ttl, args.lease_granted_at)
    owned = await become_owner(store, args.volume_id, args.node_id, lease,
                               Path(args.state_dir), connect, args.hold_io_timeout)
    authority, backend = owned.authority, owned.backend
    ctx = f"volume={args.volume_id} node={args.node_id} epoch={owned.record.epoch}"
    rejoiner = asyncio.get_running_loop().create_task(
        _rejoin_forever(store, backend, args.volume_id, connect)
    )
    reporter = asyncio.get_running_loop().create_task(
        _report_condition(backend, condition_path(Path(args.state_dir), args.volume_id))
    )
    reloader = asyncio.get_running_loop().create_task(
        reload_forever(peer_tls, log, ctx) if peer_tls else asyncio.sleep(0))
    server = NbdServer(args.socket, backend, export_name=args.volume_id)
    await server.start()
    log.info("%s serving nbd=%s isr=%s", ctx, args.socket, list(backend.isr))
    # Everything long-lived exists now: keep it out of the collector's way, and collect the
    # young generation less often (each write allocates a handful of short-lived objects).
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Before READY: a SIGTERM right after it (a stage undone at once) must stop us cleanly,
    # with a flush, not kill us with the default action.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, dump_state, backend, server)  # target_dump.py
    print("READY", flush=True)
    await stop.wait()
    log.info("%s stopping", ctx)
    server.close()
    rejoiner.cancel()
    reporter.cancel()
    reloader.cancel()
    try:
        if backend.fenced is None:
            await backend.flush()
            await backend.settle()  # graceful: the next owner need not converge
            await backend.flush()
    finally:
        backend.close()
        await authority.release()
        await store.close()


async def _rejoin_forever(
    store: EtcdStore, backend: ReplicatedBackend, volume_id: str,
    connect: Callable[[ReplicaEndpoint], Awaitable[ReplicaClient]],
) -> None:
    """Bring back replicas that are out of the ISR once their node is live (rebuild, I5)."""
    while backend.fenced is None:
        await asyncio.sleep(REJOIN_INTERVAL_S)
        try:
            found = await store.get_volume(volume_id)
            if found is None or found.value.epoch != backend.epoch:
                continue  # fenced soon: a write's CAS or a replica will tell the backend
            endpoints = await replica_endpoints(store, found.value)
        except store_errors.StoreError:
            continue
        for endpoint in endpoints:
            if backend.is_member(endpoint.node_id):
                continue
            try:
                client = await connect_and_fence(endpoint, volume_id, backend.epoch, connect)
            except Exception as exc:  # still unreachable: try again next round
                log.debug("volume=%s replica=%s not back yet: %s", volume_id,
                          endpoint.node_id, exc)
                continue
            backend.start_resync(endpoint.node_id, client, join=True)


def condition_path(state_dir: Path, volume_id: str) -> Path:
    """Where a target publishes its volume's condition for NodeGetVolumeStats."""
    return state_dir / f"{volume_id}.condition.json"


async def _report_condition(backend: ReplicatedBackend, path: Path) -> None:
    """Publish ``backend.condition()`` whenever it changes (checked every second)."""
    last: tuple[bool, str] | None = None
    while True:
        now = backend.condition()
        if now != last:
            try:
                write_atomic(path, json.dumps({"abnormal": now[0], "message": now[1]}).encode())
                last = now
            except OSError as exc:  # a full state dir: try again next round
                log.warning("volume=%s condition not published: %s", backend.volume_id, exc)
        await asyncio.sleep(CONDITION_EVERY_S)


def _standby_argv() -> list[str] | None:
    """Standby mode: everything is imported already; wait for our arguments on stdin.

    The node keeps one such warm process so a stage (and so a takeover) does not pay the
    interpreter start and imports (0.3-0.8 s here). EOF means the node went away.
    """
    line = sys.stdin.readline()
    if not line:
        return None
    argv = json.loads(line)
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise SystemExit("tandem-target: standby expects a JSON list of arguments")
    return argv


async def run(args: argparse.Namespace) -> int:
    """Serve; a volume that cannot be served is reported from inside the loop, so the node
    hears FAILED before the loop teardown (grpc channel shutdown is unbounded) can delay it."""
    try:
        await serve(args)
    except (TargetStartError, TakeoverRefusedError, ConfigError) as exc:
        return _failed(str(exc))
    except BackendIOError as exc:  # e.g. no in-sync replica could be fenced
        return _failed(str(exc.args[-1]))
    except store_errors.StoreError as exc:
        return _failed(f"etcd: {exc}")
    except OSError as exc:
        return _failed(f"cannot serve: {exc}")
    return 0


def _failed(reason: str) -> int:
    """Tell the node (stdout) and the log why the volume is not served; exit status 3."""
    print(f"tandem-target: {reason}", file=sys.stderr, flush=True)
    print(f"FAILED {reason}", flush=True)
    return 3


def main(argv: list[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else argv) == ["--standby"]:
        argv = _standby_argv()
        if argv is None:
            return 0
    parser = argparse.ArgumentParser(prog="tandem-target", description=__doc__)
    parser.add_argument("--volume-id", required=True)
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--etcd-endpoints", required=True)
    parser.add_argument("--etcd-prefix", default="/tandem/")
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--cluster-secret-file", required=True,
                        help="the replication secret (the node passes its own)")
    parser.add_argument("--tls-cert-file", help="replication over TLS (the node's setting)")
    parser.add_argument("--tls-key-file")
    parser.add_argument("--tls-trust-file")
    parser.add_argument("--lease-ttl", type=lease_ttl_arg, default=DEFAULT_LEASE_TTL_S)
    parser.add_argument("--owner-lease", type=lambda v: int(v, 0), required=True,
                        help="the etcd lease the node bound our claim to (we keep it alive)")
    parser.add_argument("--lease-granted-at", type=float, required=True,
                        help="CLOCK_MONOTONIC time at which that lease's grant was sent")
    parser.add_argument("--hold-io-timeout", type=float, default=DEFAULT_HOLD_S,
                        help="how long I/O waits while ownership is unconfirmed (etcd down)")
    parser.add_argument("--local-replica-path",
                        help="this node's replica of the volume, for direct I/O (the node "
                        "passes it only with --local-writers-dir, its fencing registry)")
    parser.add_argument("--local-writers-dir")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-file", help="append logs (stderr) here")
    args = parser.parse_args(argv)
    if bool(args.tls_cert_file) != bool(args.tls_key_file):
        parser.error("--tls-cert-file and --tls-key-file go together")
    if args.tls_trust_file and not args.tls_cert_file:
        parser.error("--tls-trust-file needs --tls-cert-file and --tls-key-file")
    if args.local_replica_path and not args.local_writers_dir:
        parser.error("--local-replica-path needs --local-writers-dir (the fencing registry)")
    if args.log_file:
        with open(args.log_file, "ab") as log_file:
            os.dup2(log_file.fileno(), sys.stderr.fileno())
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
    )
    import uvloop

    keep_large_buffers_on_heap()
    return uvloop.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
