"""Shared fixtures for the CSI conformance suite: one real local cluster for the whole session.

Every test talks gRPC over the real unix sockets of a real ``devcluster`` (etcd, controller,
three node processes in their own network namespaces, file pools, loop devices, real
mkfs/mount). Nothing is mocked. The expectations come from the CSI spec v1.12.0
(shared/reference/csi-spec-v1.12.0.md), not from the driver's code.

Helpers:

- ``unique_name`` -- a volume name no other test uses;
- ``created_volume`` -- CreateVolume on entry, DeleteVolume on exit (always);
- ``staged`` / ``published`` -- NodeStage/NodePublish on entry, the reverse on exit (always);
- ``expect_code`` -- asserts that the block raises an RPC error with a given status code;
- ``workdir`` -- a per-test directory below the cluster directory, so that ``devcluster.down``
  cleans up any mount a failed test leaves there.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from csi_driver._gen import csi_pb2
from csi_driver.client import CsiClient, mount_capability
from csi_driver.config import TOPOLOGY_KEY
from devtools import devcluster

MIB = 1 << 20
GIB = 1 << 30
POOL_SIZE = 2 * GIB
NODE_COUNT = 3
# xfsprogs refuses to make a filesystem below 300 MB.
XFS_SIZE = 320 * MIB

Mode = csi_pb2.VolumeCapability.AccessMode.Mode


@dataclass(frozen=True)
class Cluster:
    """The running cluster and one open client per plugin socket."""

    spec: devcluster.ClusterSpec
    controller: CsiClient
    nodes: dict[str, CsiClient]

    @property
    def dir(self) -> Path:
        return Path(self.spec.dir)

    @property
    def node_ids(self) -> list[str]:
        return [n.id for n in self.spec.nodes]

    def node(self, node_id: str) -> CsiClient:
        return self.nodes[node_id]


def _require_root_and_etcd() -> None:
    if os.geteuid() != 0:
        pytest.skip("the conformance suite needs root (namespaces, loop devices, mounts)")
    if not Path("/usr/bin/etcd").is_file():
        # `make test` installs it: a missing etcd is a broken install, not a machine limit.
        pytest.fail("/usr/bin/etcd is not installed (apt-get install etcd-server)")


def list_all_volume_ids(controller: CsiClient) -> list[str]:
    response = controller.controller.ListVolumes(csi_pb2.ListVolumesRequest())
    return [entry.volume.volume_id for entry in response.entries]


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    _require_root_and_etcd()
    directory = tmp_path_factory.mktemp("conformance")
    clients: list[CsiClient] = []
    namespaces: list[str] = []
    try:
        spec = devcluster.up(directory, nodes=NODE_COUNT, pool_size_bytes=POOL_SIZE)
        namespaces = [n.netns for n in spec.nodes if n.netns]
        controller = CsiClient(spec.controller.csi_endpoint)
        clients.append(controller)
        nodes = {n.id: CsiClient(n.csi_endpoint) for n in spec.nodes}
        clients.extend(nodes.values())
        yield Cluster(spec=spec, controller=controller, nodes=nodes)
        # Every test deletes what it creates: a leftover volume is a leak in a test or in
        # DeleteVolume.
        assert list_all_volume_ids(controller) == []
    finally:
        for client in clients:
            client.close()
        devcluster.down(directory)
        leftovers = _loop_devices_below(directory) + mounts_below(directory)
        leftovers += [ns for ns in namespaces if Path("/var/run/netns", ns).exists()]
        assert not leftovers, f"left behind after down(): {leftovers}"


@pytest.fixture
def ctl(cluster: Cluster) -> CsiClient:
    return cluster.controller


@pytest.fixture
def workdir(cluster: Cluster) -> Iterator[Path]:
    """A fresh directory for a test's staging and target paths (inside the cluster dir)."""
    path = cluster.dir / "work" / uuid.uuid4().hex[:12]
    path.mkdir(parents=True)
    yield path
    leaked = mounts_below(path)
    shutil.rmtree(path, ignore_errors=True)
    assert not leaked, f"the test left mounts behind: {leaked}"


def unique_name(prefix: str = "conf") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def replica_nodes(volume: csi_pb2.Volume) -> list[str]:
    """The node ids of a volume's accessible topology, in the order the plugin gave them."""
    return [t.segments[TOPOLOGY_KEY] for t in volume.accessible_topology]


def topology(node_id: str) -> csi_pb2.Topology:
    return csi_pb2.Topology(segments={TOPOLOGY_KEY: node_id})


def create_request(
    name: str | None = None,
    size: int = 64 * MIB,
    *,
    caps: list[csi_pb2.VolumeCapability] | None = None,
    limit: int = 0,
    replicas: int | None = 1,
    parameters: dict[str, str] | None = None,
    requisite: list[str] | None = None,
    preferred: list[str] | None = None,
) -> csi_pb2.CreateVolumeRequest:
    params = dict(parameters or {})
    if replicas is not None:
        params["replicas"] = str(replicas)
    request = csi_pb2.CreateVolumeRequest(
        name=unique_name() if name is None else name,
        volume_capabilities=[mount_capability()] if caps is None else caps,
        parameters=params,
    )
    if size or limit:
        request.capacity_range.CopyFrom(
            csi_pb2.CapacityRange(required_bytes=size, limit_bytes=limit)
        )
    if requisite or preferred:
        request.accessibility_requirements.CopyFrom(
            csi_pb2.TopologyRequirement(
                requisite=[topology(n) for n in requisite or []],
                preferred=[topology(n) for n in preferred or []],
            )
        )
    return request


@contextlib.contextmanager
def created_volume(
    ctl: CsiClient, request: csi_pb2.CreateVolumeRequest | None = None
) -> Iterator[csi_pb2.Volume]:
    """CreateVolume, yield the volume, and always DeleteVolume it (by its deterministic name)."""
    request = create_request() if request is None else request
    volume_id = ""
    try:
        volume = ctl.controller.CreateVolume(request).volume
        volume_id = volume.volume_id
        yield volume
    finally:
        if volume_id:
            ctl.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id))


def stage_request(
    volume_id: str, staging: Path | str, cap: csi_pb2.VolumeCapability | None = None
) -> csi_pb2.NodeStageVolumeRequest:
    """Build the request and, like a CO (spec), create the staging directory first."""
    if str(staging):
        Path(staging).mkdir(parents=True, exist_ok=True)
    return csi_pb2.NodeStageVolumeRequest(
        volume_id=volume_id, staging_target_path=str(staging),
        volume_capability=mount_capability() if cap is None else cap,
    )


def publish_request(
    volume_id: str, staging: Path | str, target: Path | str,
    cap: csi_pb2.VolumeCapability | None = None, readonly: bool = False,
) -> csi_pb2.NodePublishVolumeRequest:
    """Build the request; like a CO (spec), make sure the target's parent exists."""
    if str(target):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
    return csi_pb2.NodePublishVolumeRequest(
        volume_id=volume_id, staging_target_path=str(staging), target_path=str(target),
        volume_capability=mount_capability() if cap is None else cap, readonly=readonly,
    )


@contextlib.contextmanager
def staged(
    node: CsiClient, volume_id: str, staging: Path, cap: csi_pb2.VolumeCapability | None = None
) -> Iterator[Path]:
    try:
        node.node.NodeStageVolume(stage_request(volume_id, staging, cap))
        yield staging
    finally:
        node.node.NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=str(staging))
        )


@contextlib.contextmanager
def published(
    node: CsiClient, volume_id: str, staging: Path, target: Path,
    cap: csi_pb2.VolumeCapability | None = None, readonly: bool = False,
) -> Iterator[Path]:
    try:
        node.node.NodePublishVolume(publish_request(volume_id, staging, target, cap, readonly))
        yield target
    finally:
        node.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target))
        )


@dataclass
class RpcFailure:
    code: grpc.StatusCode | None = None
    message: str = ""


@contextlib.contextmanager
def expect_code(*codes: grpc.StatusCode) -> Iterator[RpcFailure]:
    """The block must fail with one of ``codes`` and (spec: Error Scheme) a non-empty message."""
    failure = RpcFailure()
    try:
        yield failure
    except grpc.RpcError as exc:
        failure.code = exc.code()
        failure.message = exc.details() or ""
    names = " or ".join(c.name for c in codes)
    assert failure.code is not None, f"expected {names}, but the call succeeded"
    assert failure.code in codes, f"expected {names}, got {failure.code.name}: {failure.message}"
    assert failure.message, f"{failure.code.name} without a status message"


def create_refused(
    ctl: CsiClient, request: csi_pb2.CreateVolumeRequest, *codes: grpc.StatusCode
) -> None:
    """CreateVolume must fail with one of ``codes``; a volume it makes anyway is deleted."""
    made = ""
    try:
        with expect_code(*codes):
            made = ctl.controller.CreateVolume(request).volume.volume_id
    finally:
        if made:
            with contextlib.suppress(grpc.RpcError):
                ctl.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=made))


def stage_refused(
    node: CsiClient, request: csi_pb2.NodeStageVolumeRequest, *codes: grpc.StatusCode
) -> None:
    """NodeStageVolume must fail with one of ``codes``; a staging it does anyway is undone."""
    done = False
    try:
        with expect_code(*codes):
            node.node.NodeStageVolume(request)
            done = True
    finally:
        if done:
            with contextlib.suppress(grpc.RpcError):
                node.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
                    volume_id=request.volume_id,
                    staging_target_path=request.staging_target_path))


def online_expansion(ctl: CsiClient) -> bool:
    """True for VolumeExpansion ONLINE, False for OFFLINE (GetPluginCapabilities)."""
    Expansion = csi_pb2.PluginCapability.VolumeExpansion
    response = ctl.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    types = {c.volume_expansion.type for c in response.capabilities
             if c.WhichOneof("type") == "volume_expansion"}
    assert types in ({Expansion.ONLINE}, {Expansion.OFFLINE}), types
    return types == {Expansion.ONLINE}


@dataclass(frozen=True)
class MountInfo:
    source: str
    mount_point: str
    fs_type: str
    options: frozenset[str]


def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape") if "\\" in field else field


def mounts() -> list[MountInfo]:
    """/proc/self/mounts, parsed (the mounts of this, the host's, mount namespace)."""
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        source, point, fs_type, options, *_ = line.split()
        out.append(
            MountInfo(_unescape(source), _unescape(point), fs_type, frozenset(options.split(",")))
        )
    return out


def mount_at(path: Path) -> MountInfo | None:
    """The topmost mount at ``path``, or None."""
    found = [m for m in mounts() if m.mount_point == os.path.realpath(path)]
    return found[-1] if found else None


def mounts_below(directory: Path) -> list[str]:
    prefix = str(directory.resolve()).rstrip("/") + "/"
    return [m.mount_point for m in mounts() if m.mount_point.startswith(prefix)]


def _loop_devices_below(directory: Path) -> list[str]:
    out = subprocess.run(
        ["losetup", "-J", "-l"], capture_output=True, text=True, check=True
    ).stdout.strip()
    prefix = str(directory.resolve()).rstrip("/") + "/"
    devices = json.loads(out).get("loopdevices", []) if out else []
    return [d["name"] for d in devices if str(d.get("back-file") or "").startswith(prefix)]
