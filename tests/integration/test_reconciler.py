"""The controller's reconciler on a real cluster: a dead node's replica is replaced and
rebuilt, and the returning node sweeps its orphan."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_driver._gen import csi_pb2
from csi_driver.client import CsiClient, block_capability
from csi_driver.config import TOPOLOGY_KEY
from csi_driver.state.etcd import EtcdStore
from csi_driver.verify import verify_volume
from devtools import devcluster
from devtools.failover_csi import publish, stage, unpublish_unstage
from tests.credentials import cluster_auth
from tests.direct_io import direct_read, direct_write

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
]

MIB = 1 << 20


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[devcluster.ClusterSpec]:
    directory = tmp_path / "cluster"
    try:
        yield devcluster.up(directory, 4, 1 << 30, lease_ttl_s=2.0, replace_dead_after_s=2.0)
    finally:
        devcluster.down(directory)


def record_of(spec: devcluster.ClusterSpec, volume_id: str) -> Any:
    async def get() -> Any:
        store = EtcdStore([spec.etcd_host_endpoint], prefix=spec.etcd_prefix)
        try:
            found = await store.get_volume(volume_id)
            return found.value if found else None
        finally:
            await store.close()

    return asyncio.run(get())


def wait_for(what: str, predicate: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


def test_dead_replica_is_replaced_rebuilt_and_swept(
    cluster: devcluster.ClusterSpec, tmp_path: Path
) -> None:
    directory = Path(cluster.dir)
    with CsiClient(cluster.controller.csi_endpoint) as ctl:
        volume = ctl.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
            name="replace-me", capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MIB),
            volume_capabilities=[block_capability()], parameters={"replicas": "3"},
        )).volume
    vid = volume.volume_id
    replicas = [t.segments[TOPOLOGY_KEY] for t in volume.accessible_topology]
    spare = next(n.id for n in cluster.nodes if n.id not in replicas)
    owner, victim = replicas[0], replicas[2]
    staging, target = tmp_path / "staging", tmp_path / "dev"
    payload = os.urandom(8 * MIB)
    with CsiClient(cluster.node(owner).csi_endpoint) as node:
        stage(node, vid, staging)
        publish(node, vid, staging, target)
        fd = os.open(target, os.O_WRONLY)
        try:
            os.pwrite(fd, payload, 4 * MIB)
            os.fsync(fd)
            devcluster.kill_node(directory, victim, "sigkill")
            os.pwrite(fd, payload[:MIB], 40 * MIB)  # drops the victim from the ISR
            os.fsync(fd)
        finally:
            os.close(fd)
        wait_for("the replacement replica",
                 lambda: spare in record_of(cluster, vid).replica_nodes())
        rec = record_of(cluster, vid)
        assert victim not in rec.replica_nodes()
        assert (Path(cluster.node(spare).pool.dir) / f"{vid}.img").exists()
        wait_for("the rebuilt replica to join the ISR",
                 lambda: spare in record_of(cluster, vid).isr)

        async def verify() -> Any:
            store = EtcdStore([cluster.etcd_host_endpoint], prefix=cluster.etcd_prefix)
            try:
                return await verify_volume(store, vid, cluster_auth(cluster.dir))
            finally:
                await store.close()

        report = asyncio.run(verify())
        assert report.identical
        assert {r.node_id for r in report.replicas} == {owner, replicas[1], spare}
        unpublish_unstage(node, vid, staging, target)
    orphan = Path(cluster.node(victim).pool.dir) / f"{vid}.img"
    assert orphan.exists()
    devcluster.revive_node(directory, victim)
    wait_for("the orphan sweep on the returning node", lambda: not orphan.exists())


def test_last_good_copy_survives_a_long_outage(
    cluster: devcluster.ClusterSpec, tmp_path: Path
) -> None:
    """Issue 10 #3: a 1-replica volume whose node is away past --replace-dead-after. On
    7f5cc85 the reconciler dropped it from the ISR and replaced it with an empty replica,
    and the returning node's sweep deleted the only copy. Now nothing is replaced while no
    in-sync replica is alive; the node returns, keeps its replica and serves the data."""
    directory = Path(cluster.dir)
    cap = block_capability()
    with CsiClient(cluster.controller.csi_endpoint) as ctl:
        volume = ctl.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
            name="only-copy", capacity_range=csi_pb2.CapacityRange(required_bytes=16 * MIB),
            volume_capabilities=[cap], parameters={"replicas": "1"},
        )).volume
    vid = volume.volume_id
    (holder,) = [t.segments[TOPOLOGY_KEY] for t in volume.accessible_topology]
    payload = os.urandom(MIB)
    staging, target = tmp_path / "staging", tmp_path / "dev"
    with CsiClient(cluster.node(holder).csi_endpoint) as node:
        stage(node, vid, staging)
        publish(node, vid, staging, target)
        direct_write(target, 2 * MIB, payload)
        unpublish_unstage(node, vid, staging, target)
    devcluster.kill_node(directory, holder, "sigkill")
    time.sleep(8.0)  # lease TTL 2 s + replace grace 2 s + reconcile passes (every 5 s)
    rec = record_of(cluster, vid)
    assert rec.replica_nodes() == (holder,) and rec.isr == (holder,), rec
    devcluster.revive_node(directory, holder)
    image = Path(cluster.node(holder).pool.dir) / f"{vid}.img"
    time.sleep(3.0)  # the returning node's start-up sweep has run by now
    assert image.exists(), "the returning node deleted the last good copy"
    staging2, target2 = tmp_path / "staging2", tmp_path / "dev2"
    with CsiClient(cluster.node(holder).csi_endpoint) as node:
        wait_for("the volume to stage again", lambda: _stages(node, vid, staging2))
        publish(node, vid, staging2, target2)
        assert direct_read(target2, 2 * MIB, MIB) == payload
        unpublish_unstage(node, vid, staging2, target2)


def _stages(node: CsiClient, vid: str, staging: Path) -> bool:
    try:
        stage(node, vid, staging, timeout_s=30)
    except grpc.RpcError:
        return False
    return True
