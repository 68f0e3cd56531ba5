"""Kubelet's CSI call sequence against the real node plugins of a real dev cluster.

``tests/kubelet.py`` plays kubelet (its paths, the directories and files it makes itself, its
access-mode mapping, retries with the same arguments) and external-provisioner (CreateVolume
with the StorageClass parameters reduced and extended as it does). Each node gets its own
kubelet root below the test's tmp_path. Every mutating call is sent twice, as a kubelet retry
after a timeout would: both answers must be OK (block NodePublish once in the flow tests: its
repeat is refused, a driver bug that test_raw_block_node_publish_retried_by_kubelet_is_idempotent
shows on its own).

One cluster (3 nodes, lease TTL 2 s) serves the module; the ``fault`` harness deletes the
volumes and revives/heals nodes, and the ``kube`` fixture unpublishes and unstages whatever a
test left (also after a failure) before that.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from csi_driver._gen import csi_pb2
from csi_driver.client import CsiClient
from csi_driver.config import TOPOLOGY_KEY
from devtools import devcluster
from tests.direct_io import direct_read, direct_write
from tests.fault import conftest as fault_fixtures
from tests.fault.conftest import Fault
from tests.kubelet import (
    DIR_MODE,
    FSTYPE_KEY,
    PREFIX,
    PROVISIONER_ID_KEY,
    VOL_DATA,
    FakeKubelet,
    KubeletError,
    PersistentVolume,
    load_volume_data,
    mount_layers,
    provision,
    with_backoff,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="namespaces, loop devices and mounts need root"),
    pytest.mark.timeout(180),
]

MIB = 1 << 20
SIZE = 64 * MIB
XFS_SIZE = 320 * MIB  # mkfs.xfs refuses less than 300 MB
NodeRpc = csi_pb2.NodeServiceCapability.RPC
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[devcluster.ClusterSpec]:
    with fault_fixtures.running_cluster(
        tmp_path_factory, "kubelet", fault_fixtures.LEASE_TTL_S,
    ) as spec:
        yield spec


@pytest.fixture
def fault(cluster: devcluster.ClusterSpec) -> Iterator[Fault]:
    with fault_fixtures.harness(cluster) as harness:
        yield harness


@dataclass
class Kube:
    """The test's kubelets (one per node, lazily) and its provisioner."""

    fault: Fault
    root: Path
    kubelets: dict[str, FakeKubelet] = field(default_factory=dict)

    def kubelet(self, node_id: str) -> FakeKubelet:
        if node_id not in self.kubelets:
            kubelet = FakeKubelet(self.root / f"kubelet-{node_id}", node_id,
                                  self.fault.nodes[node_id])
            info = kubelet.register()
            assert info.node_id == node_id
            assert info.accessible_topology.segments[TOPOLOGY_KEY] == node_id
            self.kubelets[node_id] = kubelet
        return self.kubelets[node_id]

    def provision(self, replicas: int, size: int = SIZE, volume_mode: str = "Filesystem",
                  fs_type: str = "ext4", mount_options: tuple[str, ...] = ()) -> PersistentVolume:
        storage_class = {"replicas": str(replicas), FSTYPE_KEY: fs_type}
        pv, request = provision(
            self.fault.ctl, storage_class, pvc_name=f"data-{uuid.uuid4().hex[:6]}",
            namespace="default", size=size, volume_mode=volume_mode,
            mount_options=mount_options)
        self.fault.volumes.append(pv.volume_handle)
        assert request.parameters[PREFIX + "pv/name"] == pv.name
        assert pv.capacity_bytes >= size
        return pv

    def revive(self, node_id: str) -> None:
        """Revive the node and reconnect to its new socket (a fresh channel, as kubelet's
        plugin watcher re-registers a restarted plugin)."""
        self.fault.revive(node_id)
        old = self.fault.nodes[node_id]
        self.fault.nodes[node_id] = CsiClient(self.fault.spec.node(node_id).csi_endpoint)
        old.close()
        for kubelet in self.kubelets.values():
            if kubelet.node_name == node_id:
                kubelet.csi = self.fault.nodes[node_id]

    def restart_kubelet(self, node_id: str, known: list[PersistentVolume]) -> FakeKubelet:
        old = self.kubelets[node_id]
        new = old.restarted(known)
        old.devices.clear()
        old.pods.clear()
        self.kubelets[node_id] = new
        return new

    def cleanup(self) -> list[str]:
        errors = []
        for node_id in sorted({n.id for n in self.fault.spec.nodes} - self.fault.running()):
            try:
                self.revive(node_id)
            except Exception as exc:
                errors.append(f"revive {node_id}: {exc}")
        for kubelet in self.kubelets.values():
            errors += kubelet.cleanup()
        return errors


@pytest.fixture
def kube(fault: Fault, tmp_path: Path) -> Iterator[Kube]:
    kube = Kube(fault, tmp_path)
    try:
        yield kube
    finally:
        for kubelet in kube.kubelets.values():
            for error in kubelet.transient:
                print(f"\n{kubelet.node_name}: retried after a transient error: {error}")
        errors = kube.cleanup()
        assert not errors, f"kubelet cleanup: {errors}"


def new_pod() -> str:
    return str(uuid.uuid4())


def write_file(path: Path, data: bytes) -> None:
    """What a pod does to make a write durable: write, fsync the file and its directory."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def assert_mode(path: Path, mode: int = DIR_MODE) -> None:
    actual = path.stat().st_mode & 0o777
    assert actual == mode & ~current_umask(), f"{path}: mode {actual:o}"


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def record_of(fault: Fault, pv: PersistentVolume) -> tuple[str | None, int]:
    record = fault.record(pv.volume_handle)
    return record.owner, record.epoch


# -- (1) one pod, unstage, re-stage --------------------------------------------------------


def test_filesystem_volume_one_pod_then_restage_on_same_node(kube: Kube) -> None:
    pv = kube.provision(replicas=3)
    assert pv.fs_type == "ext4" and not pv.block
    assert pv.volume_attributes[PROVISIONER_ID_KEY]
    kubelet = kube.kubelet("node-1")
    caps = kubelet.capabilities()
    assert {NodeRpc.STAGE_UNSTAGE_VOLUME, NodeRpc.GET_VOLUME_STATS} <= caps

    staging = kubelet.mount_device(pv)
    assert staging.name == "globalmount" and staging.parent.parent.name == "tandem.csi.io"
    assert_mode(staging.parent)  # globalmount itself now shows the filesystem's root
    assert load_volume_data(staging.parent) == {"volumeHandle": pv.volume_handle,
                                                "driverName": "tandem.csi.io"}
    layers = mount_layers(staging)
    assert [m.fs_type for m in layers] == ["ext4"], layers

    pod = new_pod()
    target = kubelet.set_up(pv, pod)
    assert_mode(target.parent)
    assert target.is_dir()
    assert len(mount_layers(target)) == 1, "a repeated NodePublish stacked a second mount"
    payload = os.urandom(256 * 1024)
    write_file(target / "data.bin", payload)

    stats = kubelet.volume_stats(pv, target)
    units = {u.unit: u for u in stats.usage}
    assert units[csi_pb2.VolumeUsage.BYTES].total > 0
    assert units[csi_pb2.VolumeUsage.BYTES].used >= len(payload)
    assert units[csi_pb2.VolumeUsage.INODES].used > 0
    assert not stats.volume_condition.abnormal, stats.volume_condition.message

    assert kubelet.tear_down(pv, pod), "NodeUnpublish left the target path behind"
    assert not target.parent.exists()
    kubelet.unmount_device(pv)
    assert not mount_layers(staging)
    assert not staging.parent.exists()
    assert record_of(kube.fault, pv)[0] is None, "unstage did not release ownership"

    again = kubelet.mount_device(pv)
    assert again == staging
    pod2 = new_pod()
    target2 = kubelet.set_up(pv, pod2)
    assert (target2 / "data.bin").read_bytes() == payload
    kubelet.tear_down(pv, pod2)
    kubelet.unmount_device(pv)


@pytest.mark.parametrize("fs_type", ["ext4", "xfs"])
def test_offline_expansion_then_node_expand_after_set_up(kube: Kube, fs_type: str) -> None:
    size = XFS_SIZE if fs_type == "xfs" else SIZE
    pv = kube.provision(replicas=2, size=size, fs_type=fs_type)
    kubelet = kube.kubelet("node-2")
    assert NodeRpc.EXPAND_VOLUME in kubelet.capabilities()
    kubelet.mount_device(pv)
    pod = new_pod()
    target = kubelet.set_up(pv, pod)
    write_file(target / "keep", b"kept across the resize")
    original = os.statvfs(target)
    new_size = pv.capacity_bytes + 64 * MIB
    expand = csi_pb2.ControllerExpandVolumeRequest(
        volume_id=pv.volume_handle, capacity_range=csi_pb2.CapacityRange(required_bytes=new_size),
        volume_capability=kubelet.capability(pv))
    # OFFLINE plugin: external-resizer gets FAILED_PRECONDITION while the volume is in use.
    with pytest.raises(grpc.RpcError) as refused:
        kube.fault.ctl.controller.ControllerExpandVolume(expand, timeout=60)
    assert refused.value.code() is Code.FAILED_PRECONDITION, refused.value.details()
    kubelet.tear_down(pv, pod)
    kubelet.unmount_device(pv)

    for _ in range(2):  # external-resizer retries with the same request
        answer = kube.fault.ctl.controller.ControllerExpandVolume(expand, timeout=60)
        assert answer.capacity_bytes >= new_size and answer.node_expansion_required
    kubelet.mount_device(pv)
    pod2 = new_pod()
    target2 = kubelet.set_up(pv, pod2)
    # ext4 grew at MountDevice, before its mount (no CAP_SYS_RESOURCE needed: issue 12 #2);
    # xfs grows here, mounted. Either way the expansion then finds the filesystem full size.
    assert kubelet.expand(pv, pod2, new_size) >= new_size
    after = os.statvfs(target2)
    assert after.f_blocks * after.f_frsize > original.f_blocks * original.f_frsize
    assert after.f_blocks * after.f_frsize > pv.capacity_bytes * 0.9
    assert (target2 / "keep").read_bytes() == b"kept across the resize"
    kubelet.tear_down(pv, pod2)
    kubelet.unmount_device(pv)


# -- (2) two pods share one stage ----------------------------------------------------------


def test_two_pods_share_one_stage_and_the_read_only_one_cannot_write(kube: Kube) -> None:
    pv = kube.provision(replicas=2, mount_options=("noatime",))
    kubelet = kube.kubelet("node-2")
    staging = kubelet.mount_device(pv)
    writer, reader = new_pod(), new_pod()
    rw = kubelet.set_up(pv, writer)
    ro = kubelet.set_up(pv, reader, readonly=True)
    assert "ro" in mount_layers(ro)[-1].options and "rw" in mount_layers(rw)[-1].options
    assert all("noatime" in mount_layers(p)[-1].options for p in (staging, rw, ro))
    write_file(rw / "shared", b"written by the writer pod")
    assert (ro / "shared").read_bytes() == b"written by the writer pod"
    with pytest.raises(OSError) as denied:
        (ro / "nope").write_bytes(b"x")
    assert denied.value.errno == errno.EROFS

    with pytest.raises(AssertionError, match="still mounted by pods"):
        kubelet.unmount_device(pv)  # kubelet keeps the stage while a pod uses it
    kubelet.tear_down(pv, writer)
    assert mount_layers(staging), "unpublishing one pod took the shared stage away"
    assert (ro / "shared").read_bytes() == b"written by the writer pod"
    kubelet.tear_down(pv, reader)
    kubelet.unmount_device(pv)
    assert not mount_layers(staging)


# -- (3) raw block ---------------------------------------------------------------------------


def test_raw_block_volume_write_and_read_through_the_pod_device(kube: Kube) -> None:
    pv = kube.provision(replicas=3, volume_mode="Block")
    assert pv.block and pv.fs_type == ""
    kubelet = kube.kubelet("node-3")
    staging = kubelet.set_up_device(pv)
    assert staging.is_dir()
    assert_mode(staging)
    pod = new_pod()
    # Sent once here: a repeated block NodePublish is refused (driver bug, see
    # test_raw_block_node_publish_retried_by_kubelet_is_idempotent).
    publish = kubelet.map_pod_device(pv, pod, attempts=1)
    assert publish.parent.is_dir() and not publish.is_dir()
    assert len(mount_layers(publish)) == 1
    device = kubelet.map_block_volume(pv, pod)
    assert device.is_symlink() and os.readlink(device) == str(publish)
    assert device.is_block_device()

    head, tail = os.urandom(MIB), os.urandom(MIB)
    end = pv.capacity_bytes - MIB
    direct_write(device, 0, head)
    direct_write(device, end, tail)
    assert direct_read(device, 0, MIB) == head
    assert direct_read(device, end, MIB) == tail
    stats = kubelet.volume_stats(pv, publish)
    assert stats.usage[0].total == pv.capacity_bytes

    kubelet.unmap_block_volume(pv, pod)
    kubelet.unmap_pod_device(pv, pod)
    assert not publish.exists(), "NodeUnpublish left the publish file behind"
    kubelet.tear_down_device(pv)
    assert not staging.exists()

    # The pattern is on the replicas: another node's pod reads it back.
    other = kube.kubelet("node-1")
    other.set_up_device(pv)
    pod2 = new_pod()
    other.map_pod_device(pv, pod2, attempts=1)
    device2 = other.map_block_volume(pv, pod2)
    assert direct_read(device2, 0, MIB) == head
    assert direct_read(device2, end, MIB) == tail
    other.unmap_block_volume(pv, pod2)
    other.unmap_pod_device(pv, pod2)
    other.tear_down_device(pv)


@pytest.mark.parametrize("readonly", [False, True], ids=["rw", "ro"])
def test_raw_block_node_publish_retried_by_kubelet_is_idempotent(
    kube: Kube, readonly: bool,
) -> None:
    """Kubelet repeats NodePublishVolume with the same arguments after a timeout, and after a
    restart (reconstructed block volumes are uncertain, MapPodDevice runs again): the answer
    must be OK, with still exactly one mount at the publish path."""
    pv = kube.provision(replicas=2, volume_mode="Block")
    kubelet = kube.kubelet("node-2")
    kubelet.set_up_device(pv)
    pod = new_pod()
    publish = kubelet.map_pod_device(pv, pod, readonly=readonly, attempts=1)
    layers = mount_layers(publish)
    refused: KubeletError | None = None
    try:
        kubelet.map_pod_device(pv, pod, readonly=readonly, attempts=1)
    except KubeletError as exc:
        refused = exc
    if refused is not None:
        pytest.fail(
            "DRIVER BUG: a repeated block NodePublishVolume (same request) is refused with "
            f"{refused.code.name} ({refused.details.rsplit(' is ', 1)[-1]}). "
            "csi_driver/node/staging.py StagingService.publish compares the publish path's "
            "mountinfo major:minor / source with the loop device, but a bind-mounted device "
            f"node shows the devtmpfs it lives in (source {layers[-1].source!r}, major:minor "
            f"of devtmpfs, root {_root_of(publish)!r}), so it never matches.")
    assert mount_layers(publish) == layers, "the repeat stacked a second mount"
    kubelet.unmap_pod_device(pv, pod)
    kubelet.tear_down_device(pv)


def _root_of(path: Path) -> str:
    target = os.path.realpath(path)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == target:
            return fields[3]
    return ""


# -- (4) node killed, pod rescheduled ------------------------------------------------------


class FileWriter(threading.Thread):
    """A pod writing (and fsyncing) a new small file every 20 ms until stopped."""

    def __init__(self, directory: Path) -> None:
        super().__init__(daemon=True)
        self.directory = directory
        self.written: list[str] = []
        self.errors: list[str] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        i = 0
        while not self._stop_event.wait(0.02):
            name = f"w-{i:05d}"
            try:
                write_file(self.directory / name, name.encode() * 64)
                self.written.append(name)
            except OSError as exc:
                self.errors.append(f"{name}: {exc}")
            i += 1

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=30)
        assert not self.is_alive(), "writer stuck in I/O"


def test_pod_rescheduled_after_its_node_is_killed(kube: Kube) -> None:
    pv = kube.provision(replicas=3)
    old = kube.kubelet("node-1")
    old.mount_device(pv)
    old_pod = new_pod()
    old_target = old.set_up(pv, old_pod)
    files = {f"f-{i}": os.urandom(32 * 1024) for i in range(20)}
    for name, data in files.items():
        write_file(old_target / name, data)

    killed_at = time.monotonic()
    kube.fault.kill("node-1", "sigkill")

    new = kube.kubelet("node-2")
    staging, refusals = with_backoff(lambda: new.mount_device(pv), timeout_s=60)
    new_pod_uid = new_pod()
    target = new.set_up(pv, new_pod_uid)
    published_at = time.monotonic()
    print(f"\nkill -> NodePublish OK on node-2: {published_at - killed_at:.2f} s "
          f"(NodeStage refusals before success: {refusals or 'none'})")
    for name, data in files.items():
        assert (target / name).read_bytes() == data, f"{name} lost in the takeover"
    owner, epoch = record_of(kube.fault, pv)
    assert owner == "node-2"

    writer = FileWriter(target)
    writer.start()
    try:
        # node-1 comes back; its kubelet restarts, finds the old pod gone and cleans up.
        kube.revive("node-1")
        back = kube.restart_kubelet("node-1", [pv])
        assert (old_pod, pv.name) in back.pods and pv.name in back.devices
        assert mount_layers(old_target), "the dead node's pod mount should still be there"
        assert back.tear_down(pv, old_pod)
        back.unmount_device(pv)
        assert not mount_layers(back.device_mount_path(pv))
        time.sleep(0.5)  # the writer keeps going after the cleanup
    finally:
        writer.stop()
    assert writer.errors == [], writer.errors[:5]
    assert len(writer.written) > 5
    assert record_of(kube.fault, pv) == (owner, epoch), "node-1's cleanup moved ownership"
    for name, data in files.items():
        assert (target / name).read_bytes() == data
    for name in writer.written:
        assert (target / name).read_bytes() == name.encode() * 64
    new.tear_down(pv, new_pod_uid)
    new.unmount_device(pv)
    assert staging == new.device_mount_path(pv)

    # What node-2 wrote is on the replicas, not just in its page cache: read it on node-3.
    third = kube.kubelet("node-3")
    third.mount_device(pv)
    pod3 = new_pod()
    target3 = third.set_up(pv, pod3)
    assert all((target3 / n).read_bytes() == n.encode() * 64 for n in writer.written)
    third.tear_down(pv, pod3)
    third.unmount_device(pv)


# -- (5) kubelet restart ---------------------------------------------------------------------


def test_kubelet_restart_restages_and_republishes_without_remounting(kube: Kube) -> None:
    pv = kube.provision(replicas=2)
    kubelet = kube.kubelet("node-3")
    staging = kubelet.mount_device(pv)
    pod = new_pod()
    target = kubelet.set_up(pv, pod)
    write_file(target / "before", b"before the restart")
    staged_mounts, published_mounts = mount_layers(staging), mount_layers(target)
    owner_epoch = record_of(kube.fault, pv)

    # The restarted kubelet reconstructs its state from disk; reconstructed volumes are
    # uncertain, so it calls NodeStage and NodePublish again with the same arguments.
    restarted = kube.restart_kubelet("node-3", [pv])
    assert restarted.devices == {pv.name: pv} and restarted.pods == {(pod, pv.name): pv}
    assert (target.parent / VOL_DATA).exists()
    assert restarted.mount_device(pv) == staging
    assert restarted.set_up(pv, pod) == target
    assert mount_layers(staging) == staged_mounts, "NodeStage remounted a staged volume"
    assert mount_layers(target) == published_mounts, "NodePublish remounted a published one"
    assert record_of(kube.fault, pv) == owner_epoch, "NodeStage re-acquired the volume"
    assert (target / "before").read_bytes() == b"before the restart"
    write_file(target / "after", b"after the restart")
    restarted.tear_down(pv, pod)
    restarted.unmount_device(pv)


def test_provisioner_extra_metadata_parameters_are_accepted(kube: Kube) -> None:
    """external-provisioner --extra-create-metadata adds pv/pvc names; the driver takes them
    (and the raw StorageClass fstype key a non-Kubernetes CO might pass through)."""
    pv = kube.provision(replicas=2)
    raw = csi_pb2.CreateVolumeRequest(
        name=f"raw-{uuid.uuid4().hex[:8]}",
        capacity_range=csi_pb2.CapacityRange(required_bytes=SIZE),
        volume_capabilities=[kube.kubelet("node-1").capability(pv)],
        parameters={"replicas": "2", FSTYPE_KEY: "ext4", PREFIX + "pv/name": "raw",
                    PREFIX + "pvc/name": "raw", PREFIX + "pvc/namespace": "default"},
    )
    try:
        volume = kube.fault.ctl.controller.CreateVolume(raw, timeout=60).volume
    except grpc.RpcError as exc:
        raise KubeletError("CreateVolume with StorageClass parameters", exc) from exc
    kube.fault.volumes.append(volume.volume_id)
    assert volume.volume_context.get("fsType") == "ext4"


# -- (7) kubelet through the node front (deploy: the CSI plugin apart from the data plane) ---


class Front:
    """``tandem node-front`` for one node, as its own process."""

    def __init__(self, socket: Path, backend: str) -> None:
        self.socket, self.backend = socket, backend
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> CsiClient:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "csi_driver.cli", "node-front", "--csi-endpoint",
             f"unix://{self.socket}", "--data-plane-endpoint", self.backend],
            stdin=subprocess.DEVNULL)
        client = CsiClient(f"unix://{self.socket}", timeout_s=10)
        grpc.channel_ready_future(client.channel).result(timeout=30)
        return client

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def test_kubelet_through_the_node_front_and_its_restart_under_writes(
    kube: Kube, tmp_path: Path,
) -> None:
    node = "node-2"
    front = Front(tmp_path / "front.sock", kube.fault.spec.node(node).csi_endpoint)
    kubelet = kube.kubelet(node)
    direct = kubelet.csi
    try:
        kubelet.csi = front.start()
        assert kubelet.register().node_id == node  # NodeGetInfo, forwarded
        pv = kube.provision(replicas=3)
        kubelet.mount_device(pv)
        pod = new_pod()
        target = kubelet.set_up(pv, pod)
        stop, errors, written = threading.Event(), list[str](), list[int]()

        def pod_writes() -> None:  # bounded: stops when told, or after 2,000 writes
            for i in range(2000):
                if stop.is_set():
                    return
                try:
                    write_file(target / f"f{i % 8}", i.to_bytes(8, "big") * 512)
                    written.append(i)
                except OSError as exc:
                    errors.append(f"write {i}: {exc}")

        writer = threading.Thread(target=pod_writes)
        writer.start()
        try:
            time.sleep(0.5)
            front.stop()  # a rollout of the node plugin DaemonSet
            kubelet.csi.close()
            kubelet.csi = front.start()
            before = len(written)
            time.sleep(1.0)
        finally:
            stop.set()
            writer.join(30)
        assert errors == [], errors
        assert len(written) > before, "the pod wrote nothing after the front restarted"
        # Every call keeps working through the new front; errors keep their status.
        stats = kubelet.volume_stats(pv, target)
        assert not stats.volume_condition.abnormal, stats.volume_condition.message
        with pytest.raises(grpc.RpcError) as refused:
            kubelet.csi.node.NodeUnstageVolume(
                csi_pb2.NodeUnstageVolumeRequest(volume_id="", staging_target_path="/x"))
        assert refused.value.code() is Code.INVALID_ARGUMENT
        assert "volume_id" in (refused.value.details() or "")
        assert kubelet.tear_down(pv, pod)
        kubelet.unmount_device(pv)
        assert record_of(kube.fault, pv)[0] is None
    finally:
        kubelet.csi.close()
        kubelet.csi = direct
        front.stop()


def test_node_front_without_its_data_plane(tmp_path: Path) -> None:
    """Identity stays answered (kubelet's registrar and liveness probe must not depend on
    the data plane); Node calls answer UNAVAILABLE, which kubelet retries."""
    front = Front(tmp_path / "front.sock", f"unix://{tmp_path / 'absent.sock'}")
    client = front.start()
    try:
        info = client.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=10)
        assert info.name == "tandem.csi.io"
        assert client.identity.Probe(csi_pb2.ProbeRequest(), timeout=10).ready.value
        with pytest.raises(grpc.RpcError) as down:
            client.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=10)
        assert down.value.code() is Code.UNAVAILABLE
        assert "data plane" in (down.value.details() or "")
    finally:
        client.close()
        front.stop()
