"""Fault tests: real clusters, real kills, partitions and etcd restarts; nothing mocked.

``cluster`` is one dev cluster per module (etcd, a controller, three node processes in their
own network namespaces, file pools; lease TTL 2 s so takeovers are quick); ``cluster_ttl5``
has a 5 s lease, so a short etcd outage fits in it. ``fault`` / ``fault_ttl5`` give
each test a ``Fault`` harness that records what the test creates (volumes, stagings, a
stopped etcd) and, at teardown, starts etcd, heals every partition, revives every dead node,
unstages and deletes everything, so one failed test cannot poison the next. Leaks (mounts,
loop devices, namespaces) fail the test or the module. ``stop_etcd`` / ``start_etcd`` stop
the cluster's etcd process and start it again; the writer and check helpers wrap
failover_io, crashcheck and failover_bench.settle.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar

import pytest

from csi_driver.client import CsiClient
from csi_driver.state.etcd import EtcdStore
from csi_driver.state.model import VolumeRecord
from csi_driver.verify import VerifyReport, verify_volume
from devtools import devcluster
from devtools.crashcheck import WriterLog
from devtools.devcluster import mounts
from devtools.failover_csi import (
    Takeover,
    create_block_volume,
    delete_volume,
    describe,
    publish,
    stage,
    take_over,
    unpublish_unstage,
)
from devtools.failover_io import (
    VOLUME_BYTES,
    BlockWriter,
    new_writer_id,
    read_and_check,
    read_device,
)
from devtools.failover_trial import WRITE_BLOCKS, settle
from tests.credentials import cluster_auth, cluster_tls

LEASE_TTL_S = 2.0
POOL_BYTES = 2 << 30
T = TypeVar("T")


def require_root_and_etcd() -> None:
    if os.geteuid() != 0:
        pytest.skip("fault tests need root (namespaces, loop devices, mounts)")
    if not Path("/usr/bin/etcd").is_file():
        # `make test` installs it: a missing etcd is a broken install, not a machine limit.
        pytest.fail("/usr/bin/etcd is not installed (apt-get install etcd-server)")


def start_cluster(directory: Path, lease_ttl_s: float, tls: bool = False
                  ) -> devcluster.ClusterSpec:
    return devcluster.up(directory, 3, POOL_BYTES, lease_ttl_s=lease_ttl_s, tls=tls)


def stop_cluster(spec: devcluster.ClusterSpec) -> None:
    """Tear down and fail if anything of the cluster's is left behind."""
    directory = Path(spec.dir)
    devcluster.down(directory)
    leftovers = mounts.loop_devices(directory) + [
        m.target for m in mounts.mounts() if m.target.startswith(f"{directory}/")]
    leftovers += [n.netns for n in spec.nodes if n.netns and Path("/run/netns", n.netns).exists()]
    assert not leftovers, f"left behind after down(): {leftovers}"


@contextlib.contextmanager
def running_cluster(
    factory: pytest.TempPathFactory, name: str, lease_ttl_s: float, tls: bool = False,
) -> Iterator[devcluster.ClusterSpec]:
    require_root_and_etcd()
    directory = factory.mktemp(name)
    try:
        spec = start_cluster(directory, lease_ttl_s, tls)
    except BaseException:
        devcluster.down(directory)
        raise
    try:
        yield spec
    finally:
        stop_cluster(spec)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[devcluster.ClusterSpec]:
    with running_cluster(tmp_path_factory, "fault", LEASE_TTL_S) as spec:
        yield spec


@pytest.fixture(scope="module")
def cluster_ttl5(tmp_path_factory: pytest.TempPathFactory) -> Iterator[devcluster.ClusterSpec]:
    """A 5 s lease (default 2 s): an etcd outage of a second or two fits in it."""
    with running_cluster(tmp_path_factory, "fault-ttl5", 5.0) as spec:
        yield spec


def run_store(spec: devcluster.ClusterSpec, use: Callable[[EtcdStore], Awaitable[T]]) -> T:
    """Run one coroutine against the cluster's etcd with a short-lived store."""
    async def go() -> T:
        store = EtcdStore([spec.etcd_host_endpoint], prefix=spec.etcd_prefix)
        try:
            return await use(store)
        finally:
            await store.close()
    return asyncio.run(go())


@dataclass
class Fault:
    """One test's view of the cluster, and everything it must undo."""

    spec: devcluster.ClusterSpec
    work: Path
    ctl: CsiClient
    nodes: dict[str, CsiClient]
    volumes: list[str] = field(default_factory=list)
    staged: list[tuple[str, str, str]] = field(default_factory=list)  # node, volume, tag
    notes: list[str] = field(default_factory=list)  # cleanup steps that needed a fallback
    etcd_stopped: devcluster.StoppedEtcd | None = None

    @property
    def dir(self) -> Path:
        return Path(self.spec.dir)

    def create(self, replicas: int = 3, nodes: tuple[str, ...] = (),
               size: int = VOLUME_BYTES) -> tuple[str, list[str]]:
        vid, placed = create_block_volume(self.ctl, f"fault-{uuid.uuid4().hex[:12]}",
                                          size=size, replicas=replicas, nodes=nodes)
        self.volumes.append(vid)
        return vid, placed

    def paths(self, node_id: str, volume_id: str, tag: str) -> tuple[Path, Path]:
        base = self.work / f"{volume_id[-8:]}-{node_id}-{tag}"
        return base / "staging", base / "pod" / "dev"

    def stage_publish(self, node_id: str, volume_id: str, tag: str = "a") -> Path:
        staging, target = self.paths(node_id, volume_id, tag)
        self.staged.append((node_id, volume_id, tag))
        stage(self.nodes[node_id], volume_id, staging)
        publish(self.nodes[node_id], volume_id, staging, target)
        return target

    def take_over(self, node_id: str, volume_id: str, tag: str = "b") -> tuple[Takeover, Path]:
        """Retry NodeStageVolume on node_id until it succeeds; then publish."""
        staging, target = self.paths(node_id, volume_id, tag)
        self.staged.append((node_id, volume_id, tag))
        takeover = take_over(self.nodes[node_id], volume_id, staging)
        publish(self.nodes[node_id], volume_id, staging, target)
        return takeover, target

    def record(self, volume_id: str) -> VolumeRecord:
        found = run_store(self.spec, lambda s: s.get_volume(volume_id))
        assert found is not None, f"volume {volume_id} has no record"
        return found.value

    def wait_record(self, volume_id: str, predicate: Callable[[VolumeRecord], bool],
                    timeout_s: float) -> VolumeRecord | None:
        """Poll the record until predicate holds; None if it never did within timeout_s."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            record = self.record(volume_id)
            if predicate(record):
                return record
            time.sleep(0.1)
        return None

    def verify(self, volume_id: str) -> VerifyReport:
        return run_store(self.spec, lambda s: verify_volume(
            s, volume_id, cluster_auth(self.dir), cluster_tls(self.dir)))

    def kill(self, node_id: str, mode: devcluster.KillMode = "sigkill") -> None:
        devcluster.kill_node(self.dir, node_id, mode)

    def revive(self, node_id: str) -> None:
        devcluster.revive_node(self.dir, node_id)

    def stop_etcd(self) -> float:
        self.etcd_stopped = devcluster.stop_etcd(self.dir)
        return self.etcd_stopped.stopped_at

    def start_etcd(self) -> float:
        assert self.etcd_stopped is not None, "etcd is not stopped"
        healthy_at = devcluster.start_etcd(self.dir, self.etcd_stopped)
        self.etcd_stopped = None
        return healthy_at

    def restart(self, node_id: str) -> None:
        self.kill(node_id)
        self.revive(node_id)

    def running(self) -> set[str]:
        return {n.id for n in devcluster.status(self.dir).nodes if n.process.running}

    def cleanup(self) -> list[str]:
        """Heal, revive, unstage and delete everything this test made; return what failed."""
        errors: list[str] = []

        def attempt(what: str, func: Callable[[], object]) -> None:
            try:
                func()
            except Exception as exc:  # keep going: every later step still has to run
                errors.append(f"{what}: {describe(exc)}")
        if self.etcd_stopped is not None:
            attempt("start etcd", self.start_etcd)
        for node in self.spec.nodes:
            attempt(f"heal {node.id}", partial(devcluster.heal_node, self.dir, node.id))
        for node_id in sorted({n.id for n in self.spec.nodes} - self.running()):
            attempt(f"revive {node_id}", partial(self.revive, node_id))
        for node_id, vid, tag in reversed(self.staged):
            staging, target = self.paths(node_id, vid, tag)
            unstage = partial(unpublish_unstage, self.nodes[node_id], vid, staging, target)
            try:
                unstage()
            except Exception as exc:
                # If an unstage still fails, restart the node and unstage again so the next
                # test starts clean; the note says it happened.
                self.notes.append(f"unstage {vid} on {node_id}: {describe(exc)}")
                attempt(f"restart {node_id}", partial(self.restart, node_id))
                attempt(f"unstage {vid} on {node_id} after a restart", unstage)
        for vid in self.volumes:
            attempt(f"delete {vid}", partial(delete_volume, self.ctl, vid))
        attempt("every node registered again", self.wait_all_registered)
        return errors

    def wait_all_registered(self, timeout_s: float = 20.0) -> None:
        """A healed or revived node re-registers on its next lease round: the next test must
        not place volumes before it is back."""
        want = {n.id for n in self.spec.nodes}
        deadline = time.monotonic() + timeout_s

        async def live(store: EtcdStore) -> set[str]:
            return {v.value.node_id for v in await store.list_nodes()}

        while (have := run_store(self.spec, live)) != want:
            if time.monotonic() > deadline:
                raise AssertionError(f"nodes not registered: {sorted(want - have)}")
            time.sleep(0.2)

    def close(self) -> None:
        for client in (self.ctl, *self.nodes.values()):
            client.close()


def make_fault(spec: devcluster.ClusterSpec) -> Fault:
    work = Path(spec.dir) / "work" / uuid.uuid4().hex[:8]
    work.mkdir(parents=True)
    return Fault(spec, work, CsiClient(spec.controller.csi_endpoint),
                 {n.id: CsiClient(n.csi_endpoint) for n in spec.nodes})


@contextlib.contextmanager
def harness(spec: devcluster.ClusterSpec) -> Iterator[Fault]:
    fault = make_fault(spec)
    try:
        yield fault
    finally:
        errors = fault.cleanup()
        fault.close()
        leaked = [m.target for m in mounts.mounts() if m.target.startswith(f"{fault.work}/")]
        assert not errors, f"cleanup failed: {errors}"
        assert not leaked, f"the test left mounts behind: {leaked}"


@pytest.fixture
def fault(cluster: devcluster.ClusterSpec) -> Iterator[Fault]:
    with harness(cluster) as h:
        yield h


@pytest.fixture
def fault_ttl5(cluster_ttl5: devcluster.ClusterSpec) -> Iterator[Fault]:
    with harness(cluster_ttl5) as h:
        yield h


def start_writer(device: Path, log: WriterLog) -> BlockWriter:
    """Writer threads (4) over the first WRITE_BLOCKS blocks of device, started."""
    writer = BlockWriter(device, log, new_writer_id(), WRITE_BLOCKS)
    writer.start()
    return writer


def assert_clean(device: Path, log: WriterLog) -> None:
    """Read the whole device back and prove the log's promises (crashcheck.check)."""
    result = read_and_check(device, log)
    assert result.ok and result.lost_acks == 0, result.summary()
    assert result.acked_writes > 0


def assert_replicas_match(spec: devcluster.ClusterSpec, volume_id: str, device: Path) -> None:
    """Every in-sync replica's file holds exactly what the owner serves (I1, I4)."""
    problems = settle(spec, volume_id, lambda: read_device(device, VOLUME_BYTES))
    assert problems == [], problems


def wait_for(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False
