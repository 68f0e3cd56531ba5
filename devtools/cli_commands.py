"""The dev tooling's sub-commands of ``tandem``: ``cluster ...`` (the local dev cluster),
``bench failover`` and ``volume ...`` (list, show, verify and export a dev cluster's volumes).

Registered by ``csi_driver.cli`` only when ``devtools`` is importable (a source checkout):
the installed package and the image ship none of it. Thin: parse flags, call the library,
print. Exit 1 when the operation fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from csi_driver import config as cfg
from csi_driver.config import DEFAULT_LEASE_TTL_S


def _cluster_up(args: argparse.Namespace) -> int:
    from devtools import devcluster

    spec = devcluster.up(
        Path(args.dir).resolve(), args.nodes, cfg.parse_size(args.pool_size),
        lease_ttl_s=args.lease_ttl, tls=args.tls,
    )
    print(f"cluster up: {len(spec.nodes)} nodes, etcd {spec.etcd_endpoints[0]}")
    for node in spec.nodes:
        print(f"  {node.id}: csi {node.csi_endpoint} agent {node.agent_address} netns {node.netns}")
    print(f"  controller: {spec.controller.csi_endpoint}")
    print(f"details: {Path(args.dir).resolve() / 'cluster.json'}")
    return 0


def _cluster_status(args: argparse.Namespace) -> int:
    from devtools import devcluster

    status = devcluster.status(Path(args.dir).resolve())
    print("\n".join(status.lines()))
    return 0


def _cluster_down(args: argparse.Namespace) -> int:
    from devtools import devcluster

    devcluster.down(Path(args.dir).resolve())
    print("cluster down")
    return 0


def _kill_node(args: argparse.Namespace) -> int:
    from devtools import devcluster

    devcluster.kill_node(Path(args.dir).resolve(), args.node_id, args.mode)
    print(f"{args.node_id} killed ({args.mode})")
    return 0


def _revive_node(args: argparse.Namespace) -> int:
    from devtools import devcluster

    devcluster.revive_node(Path(args.dir).resolve(), args.node_id)
    print(f"{args.node_id} revived")
    return 0


async def _volumes(cluster_dir: Path) -> list[dict[str, Any]]:
    from csi_driver.state.etcd import EtcdStore

    spec = json.loads((cluster_dir / "cluster.json").read_text())
    store = EtcdStore([spec["etcd_host_endpoint"]], prefix=spec.get("etcd_prefix", "/tandem/"))
    try:
        live = {v.value.node_id for v in await store.list_nodes()}
        out = []
        for versioned in await store.list_volumes():
            rec = versioned.value
            progress = await store.get_progress(rec.volume_id)
            out.append(
                {
                    "id": rec.volume_id, "name": rec.name, "size_bytes": rec.size_bytes,
                    "phase": rec.phase.value, "replicas": list(rec.replica_nodes()),
                    "isr": list(rec.isr), "owner": rec.owner, "epoch": rec.epoch,
                    "live_nodes": sorted(live),
                    "resync": {n: vars(p) for n, p in progress.items()},
                }
            )
        return out
    finally:
        await store.close()


def _volume_list(args: argparse.Namespace) -> int:
    volumes = asyncio.run(_volumes(Path(args.cluster).resolve()))
    if args.json:
        print(json.dumps(volumes, indent=2))
        return 0
    print(f"{'VOLUME':30} {'NAME':24} {'SIZE':>10} {'PHASE':9} {'OWNER':8} REPLICAS (ISR*)")
    for v in volumes:
        reps = " ".join(n + ("*" if n in v["isr"] else "") for n in v["replicas"])
        size = f"{v['size_bytes'] >> 20}Mi"
        print(f"{v['id']:30} {v['name'][:24]:24} {size:>10} {v['phase']:9} "
              f"{v['owner'] or '-':8} {reps}")
    return 0


def _volume_show(args: argparse.Namespace) -> int:
    volumes = asyncio.run(_volumes(Path(args.cluster).resolve()))
    match = [v for v in volumes if args.volume in (v["id"], v["name"])]
    if not match:
        print(f"tandem: no volume {args.volume!r}", file=sys.stderr)
        return 1
    v = match[0]
    if args.json:
        print(json.dumps(v, indent=2))
        return 0
    print(f"volume   {v['id']}  ({v['name']})")
    print(f"size     {v['size_bytes'] >> 20} MiB   phase {v['phase']}")
    print(f"owner    {v['owner'] or '-'}   epoch {v['epoch']}")
    for node in v["replicas"]:
        state = "in sync" if node in v["isr"] else "out of sync"
        if node not in v["live_nodes"]:
            state += ", node down"
        print(f"replica  {node:12} {state}")
        resync = v["resync"].get(node)
        if resync:
            print(f"         {progress_bar(resync)}")
    return 0


def progress_bar(p: dict[str, Any], width: int = 30) -> str:
    total = max(int(p["total_bytes"]), 1)
    done = min(int(p["done_bytes"]), total)
    filled = width * done // total
    return (f"{p['kind']:9} [{'#' * filled}{'.' * (width - filled)}] "
            f"{done >> 20}/{total >> 20} MiB of {int(p['volume_bytes']) >> 20} MiB, "
            f"{float(p['rate_bytes_s']) / (1 << 20):.1f} MiB/s")


async def _verify(cluster_dir: Path, volume: str) -> int:
    from csi_driver.state.etcd import EtcdStore
    from csi_driver.verify import verify_volume
    from devtools.devcluster import cluster_secret_path
    from devtools.devcluster.cluster import tls_paths
    from replication.peer_auth import PeerAuth, load_secret
    from replication.peer_tls import load_peer_tls

    spec = json.loads((cluster_dir / "cluster.json").read_text())
    # Reads at epoch 0 change nothing: any holder of the cluster secret may observe.
    auth = PeerAuth(load_secret(cluster_secret_path(cluster_dir)), "tandem-verify")
    tls = (load_peer_tls(*tls_paths(cluster_dir)).client if spec.get("replication_tls")
           else None)
    store = EtcdStore([spec["etcd_host_endpoint"]], prefix=spec.get("etcd_prefix", "/tandem/"))
    try:
        volume_id = await store.volume_id_for_name(volume) or volume
        report = await verify_volume(store, volume_id, auth, tls)
    except LookupError as exc:
        print(f"tandem: {exc}", file=sys.stderr)
        return 1
    finally:
        await store.close()
    print(f"volume {report.volume_id} ({report.size_bytes >> 20} MiB), "
          f"reference replica {report.reference}")
    for r in report.replicas:
        state = r.detail if r.reachable else f"not checked: unreachable ({r.detail})"
        state += "" if r.node_id in report.isr else " [not in ISR]"
        extra = f", {r.differing_bytes} bytes differ" if r.differing_bytes else ""
        print(f"  {r.node_id:12} {state}{extra}")
    print("in-sync replicas identical" if report.identical else "DIVERGENCE FOUND")
    return 0 if report.identical else 1


def _volume_verify(args: argparse.Namespace) -> int:
    return asyncio.run(_verify(Path(args.cluster).resolve(), args.volume))


def _volume_export(args: argparse.Namespace) -> int:
    from csi_driver.errors import TandemError
    from devtools.devcluster import ClusterError
    from devtools.export import ExportError, run_until_signalled

    try:
        return asyncio.run(run_until_signalled(
            Path(args.cluster).resolve(), args.volume, args.as_node, Path(args.socket).resolve(),
        ))
    except (ExportError, ClusterError, TandemError) as exc:
        print(f"tandem: {exc}", file=sys.stderr)
        return 1


def _bench_failover(args: argparse.Namespace) -> int:
    from devtools import failover_bench

    return failover_bench.run_from_args(args)


def add_commands(sub: Any) -> None:
    cluster = sub.add_parser("cluster", help="local multi-node dev cluster")
    csub = cluster.add_subparsers(dest="cluster_command", required=True)
    up = csub.add_parser("up", help="start etcd, a controller and N nodes")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--dir", required=True)
    up.add_argument("--pool-size", default="2G")
    up.add_argument("--lease-ttl", type=float, default=DEFAULT_LEASE_TTL_S)
    up.add_argument("--tls", action="store_true", help="replication over TLS")
    up.set_defaults(func=_cluster_up)
    bench = sub.add_parser("bench", help="benchmarks against a local dev cluster")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    failover = bsub.add_parser("failover", help="kill owners mid-write; time and check takeover")
    from devtools.failover_bench import add_arguments as add_failover_arguments

    add_failover_arguments(failover)
    failover.set_defaults(func=_bench_failover)
    for name, func in (("status", _cluster_status), ("down", _cluster_down)):
        p = csub.add_parser(name)
        p.add_argument("--dir", required=True)
        p.set_defaults(func=func)
    kill = csub.add_parser("kill-node", help="kill a node (sigkill or link-down)")
    kill.add_argument("node_id")
    kill.add_argument("--dir", required=True)
    kill.add_argument("--mode", choices=["sigkill", "link-down"], default="sigkill")
    kill.set_defaults(func=_kill_node)
    revive = csub.add_parser("revive-node", help="bring a killed node back")
    revive.add_argument("node_id")
    revive.add_argument("--dir", required=True)
    revive.set_defaults(func=_revive_node)

    volume = sub.add_parser("volume", help="inspect volumes of a cluster")
    vsub = volume.add_subparsers(dest="volume_command", required=True)
    vlist = vsub.add_parser("list")
    vlist.add_argument("--cluster", required=True, help="dev cluster directory")
    vlist.add_argument("--json", action="store_true")
    vlist.set_defaults(func=_volume_list)
    vshow = vsub.add_parser("show")
    vshow.add_argument("volume")
    vshow.add_argument("--cluster", required=True)
    vshow.add_argument("--json", action="store_true")
    vshow.set_defaults(func=_volume_show)
    verify = vsub.add_parser("verify", help="compare all replicas by checksum (exit 1: differ)")
    verify.add_argument("volume", help="volume id or name")
    verify.add_argument("--cluster", required=True)
    verify.set_defaults(func=_volume_verify)
    export = vsub.add_parser("export", help="serve a volume's NBD export on the unix socket "
                             "--socket as owner --as-node of dev cluster --cluster (unattached)")
    export.add_argument("volume", help="volume id or name")
    for flag in ("--cluster", "--as-node", "--socket"):
        export.add_argument(flag, required=True)
    export.set_defaults(func=_volume_export)
