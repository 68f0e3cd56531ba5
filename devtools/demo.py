"""``make demo``: the story on a local multi-node cluster, narrated.

Starts a real cluster (etcd, a controller, N node processes in their own network
namespaces), creates a 3-replica volume through the CSI controller, stages and publishes it
on node 1 and writes files with checksums, kills node 1, stages and publishes the volume on
another replica node (takeover), checks every file, compares the replicas, tears down.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from csi_driver._gen import csi_pb2
from csi_driver.client import CsiClient, mount_capability
from csi_driver.config import TOPOLOGY_KEY
from devtools import devcluster
from devtools.cli_commands import progress_bar


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def detail(text: str) -> None:
    print(f"    {text}", flush=True)


def _stage_publish(node: CsiClient, volume_id: str, staging: Path, target: Path) -> None:
    cap = mount_capability("ext4")
    node.node.NodeStageVolume(
        csi_pb2.NodeStageVolumeRequest(
            volume_id=volume_id, staging_target_path=str(staging), volume_capability=cap
        ),
        timeout=120,
    )
    node.node.NodePublishVolume(
        csi_pb2.NodePublishVolumeRequest(
            volume_id=volume_id, staging_target_path=str(staging), target_path=str(target),
            volume_capability=cap,
        ),
        timeout=60,
    )


def _unpublish_unstage(node: CsiClient, volume_id: str, staging: Path, target: Path) -> None:
    node.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target))
    )
    node.node.NodeUnstageVolume(
        csi_pb2.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=str(staging))
    )


def _write_files(target: Path, count: int) -> dict[str, str]:
    sums = {}
    for i in range(count):
        payload = os.urandom(1 << 20)
        (target / f"file-{i}.bin").write_bytes(payload)
        sums[f"file-{i}.bin"] = hashlib.sha256(payload).hexdigest()
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)  # the files and the directory reach every in-sync replica
    finally:
        os.close(fd)
    for name in sums:
        with open(target / name, "rb+") as f:
            os.fsync(f.fileno())
    return sums


def _check_files(target: Path, sums: dict[str, str]) -> int:
    good = 0
    for name, digest in sums.items():
        if hashlib.sha256((target / name).read_bytes()).hexdigest() == digest:
            good += 1
    return good


def _verify(cluster_dir: Path, volume: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "csi_driver.cli", "volume", "verify", volume, "--cluster",
         str(cluster_dir)], capture_output=True, text=True, check=False,
    )
    for line in result.stdout.splitlines():
        detail(line)


def _show(cluster_dir: Path, volume: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "csi_driver.cli", "volume", "show", volume, "--json",
         "--cluster", str(cluster_dir)], capture_output=True, text=True, check=True,
    )
    return dict(json.loads(result.stdout))


def _watch_rebuild(cluster_dir: Path, volume: str, node: str) -> None:
    started = time.monotonic()
    shown = ""
    while time.monotonic() - started < 120:
        state = _show(cluster_dir, volume)
        progress = state["resync"].get(node)
        if progress:
            line = progress_bar(progress)
            if line != shown:
                detail(line)
                shown = line
        if node in state["isr"] and progress and progress["kind"] == "rebuilt":
            copied, size = progress["done_bytes"], progress["volume_bytes"]
            detail(f"{node} is back in sync after {time.monotonic() - started:.1f} s: copied "
                   f"{copied >> 20} MiB of a {size >> 20} MiB volume "
                   f"({100 * copied / size:.1f} %)")
            return
        time.sleep(0.3)
    raise SystemExit(f"demo failed: {node} did not rejoin the ISR within 120 s")


def _create(ctl: CsiClient, replicas: int) -> csi_pb2.Volume:
    return ctl.controller.CreateVolume(
        csi_pb2.CreateVolumeRequest(
            name="demo-data",
            capacity_range=csi_pb2.CapacityRange(required_bytes=256 << 20),
            volume_capabilities=[mount_capability("ext4")],
            parameters={"replicas": str(replicas)},
        ),
        timeout=60,
    ).volume


def _failover(spec: devcluster.ClusterSpec, volume_id: str, survivor: str, work: Path) -> float:
    """Stage on ``survivor`` until it takes over; return seconds until it is writable."""
    staging, target = work / "staging-2", work / "pod-volume-2"
    killed_at = time.monotonic()
    last = ""
    with CsiClient(spec.node(survivor).csi_endpoint) as node:
        while True:
            try:
                _stage_publish(node, volume_id, staging, target)
                break
            except grpc.RpcError as exc:
                if time.monotonic() - killed_at > 60:
                    raise
                answer = f"{exc.code().name}: {exc.details()}"
                if answer != last:  # the CO retries; show each distinct answer once
                    detail(f"{time.monotonic() - killed_at:4.1f} s  retry: {answer}")
                    last = answer
                time.sleep(0.2)
        (target / "after-failover.txt").write_text("written on the new owner\n")
        fd = os.open(target / "after-failover.txt", os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    return time.monotonic() - killed_at


def run(cluster_dir: Path, nodes: int) -> None:
    say(f"Starting a {nodes}-node tandem cluster in {cluster_dir}")
    started = time.monotonic()
    spec = devcluster.up(cluster_dir, nodes, 1 << 30)
    detail(f"etcd {spec.etcd_endpoints[0]}, controller {spec.controller.csi_endpoint}")
    for n in spec.nodes:
        detail(f"{n.id}: netns {n.netns}, agent {n.agent_address}, replicas {n.replica_address}")
    detail(f"ready in {time.monotonic() - started:.1f} s (lease TTL {spec.lease_ttl_s:g} s)")
    work = Path(tempfile.mkdtemp(prefix="tandem-demo-"))
    try:
        with CsiClient(spec.controller.csi_endpoint) as ctl:
            say("CreateVolume 'demo-data' (256 MiB, 3 replicas) through the CSI controller")
            volume = _create(ctl, min(3, nodes))
            replicas = [t.segments[TOPOLOGY_KEY] for t in volume.accessible_topology]
            detail(f"volume {volume.volume_id}: {volume.capacity_bytes >> 20} MiB on {replicas}")
            owner, survivor = replicas[0], replicas[1]
            staging, target = work / "staging", work / "pod-volume"
            say(f"NodeStageVolume + NodePublishVolume on {owner}; write 8 files with checksums")
            with CsiClient(spec.node(owner).csi_endpoint) as node:
                _stage_publish(node, volume.volume_id, staging, target)
                sums = _write_files(target, 8)
            detail(f"every write acknowledged by all replicas in sync: {replicas}")
            say(f"Killing {owner} (SIGKILL of every process in its network namespace)")
            devcluster.kill_node(cluster_dir, owner, "sigkill")
            say(f"NodeStageVolume + NodePublishVolume on {survivor}: takeover")
            seconds = _failover(spec, volume.volume_id, survivor, work)
            good = _check_files(work / "pod-volume-2", sums)
            detail(f"writable on {survivor} {seconds:.1f} s after the kill")
            detail(f"{good}/{len(sums)} files intact on {survivor}")
            if good != len(sums):
                raise SystemExit("demo failed: data lost in failover")
            say(f"Reviving {owner}: the owner on {survivor} rebuilds it while serving")
            devcluster.revive_node(cluster_dir, owner)
            _watch_rebuild(cluster_dir, volume.volume_id, owner)
            say("Replicas compared by checksum")
            _verify(cluster_dir, volume.volume_id)
            with CsiClient(spec.node(survivor).csi_endpoint) as node:
                _unpublish_unstage(node, volume.volume_id, work / "staging-2",
                                   work / "pod-volume-2")
    finally:
        say("Tearing the cluster down")
        devcluster.down(cluster_dir)
        detail("all processes, namespaces, mounts and loop devices removed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tandem-demo", description=__doc__)
    parser.add_argument("--dir", default="/tmp/tandem-demo")
    parser.add_argument("--nodes", type=int, default=3)
    args = parser.parse_args(argv)
    cluster_dir = Path(args.dir).resolve()
    if (cluster_dir / "cluster.json").exists():
        devcluster.down(cluster_dir)
    cluster_dir.mkdir(parents=True, exist_ok=True)
    run(cluster_dir, args.nodes)
    print("\ndemo complete", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
