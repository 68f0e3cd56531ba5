"""A fake kubelet: what kubelet does on the CSI side, against the real node plugins.

Test code, no mocks: it makes the directories and ``vol_data.json`` files kubelet makes, with
kubelet's paths and modes, and sends the CSI requests kubelet sends over the plugin's real unix
socket. Where each step comes from (kubernetes/kubernetes, pkg/volume/csi unless noted):

- ``mount_device`` = ``csiAttacher.MountDevice`` (csi_attacher.go): staging path
  ``<root>/plugins/kubernetes.io/csi/<driver>/<sha256(volumeHandle)>/globalmount``
  (``makeDeviceMountPath``); kubelet itself creates ``globalmount`` (``MkdirAllWithPathCheck``,
  0750) and writes ``vol_data.json`` (volumeHandle, driverName) next to it, then NodeStage with
  the PV's fsType, mountOptions, volumeAttributes and the (here empty) publish context.
- ``set_up`` = ``csiMountMgr.SetUpAt`` (csi_mounter.go): kubelet creates only the parent
  ``<root>/pods/<uid>/volumes/kubernetes.io~csi/<pv>`` (0750) and its ``vol_data.json``; the
  driver creates the target ``.../mount``. ``tear_down`` = ``TearDownAt``: NodeUnpublish,
  then ``removeMountDir`` (target if unmounted, vol_data.json, the parent).
- ``unmount_device`` = ``csiAttacher.UnmountDevice``: only when no pod mount refers to the
  device any more (operation_generator.go ``GetDeviceMountRefs``), NodeUnstage, then
  ``removeMountDir(globalmount)``.
- Block (csi_block.go): ``set_up_device`` creates ``volumeDevices/staging/<pv>`` (0750, a
  directory) and stages there; ``map_pod_device`` creates ``volumeDevices/publish/<pv>``
  (0750) and publishes to the *file* ``.../<pv>/<pod uid>`` the driver creates;
  ``map_block_volume`` = pkg/volume/util ``MapBlockVolume``: bind-mount of the publish path on
  ``volumeDevices/<pv>/dev/<pod uid>``, symlink ``pods/<uid>/volumeDevices/kubernetes.io~csi/
  <pv>`` -> publish path, and a loop device on the bind mount as descriptor lock
  (volumepathhandler ``AttachFileDevice``: ``losetup -f --show``); ``unmap_block_volume``
  undoes these before ``unmap_pod_device`` (NodeUnpublish) and ``tear_down_device``
  (NodeUnstage, then the staging directory is removed).
- Access modes (csi_client.go ``getNodeV1AccessModeMapper``): the node advertises
  SINGLE_NODE_MULTI_WRITER, so a ReadWriteOnce PV is sent as SINGLE_NODE_MULTI_WRITER,
  ReadWriteOncePod as SINGLE_NODE_SINGLE_WRITER.
- NodeExpandVolume (operation_generator.go, expander.go): after SetUp, with volume_path = the
  pod's mount path and staging_target_path = globalmount.

Kubelet retries a failed or timed-out operation with the same arguments; ``attempts`` (default
2) sends every mutating call that many times, and every answer must be OK (idempotency).
Transient errors before the first success are retried with kubelet's backoff and recorded in
``FakeKubelet.transient`` (the tests print them).
``provision`` does what external-provisioner does for a PVC. ``cleanup`` undoes whatever is
still mounted or mapped, so a failed test leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import grpc

from csi_driver._gen import csi_pb2
from csi_driver.client import CsiClient
from csi_driver.config import DRIVER_NAME

T = TypeVar("T")
AccessMode = csi_pb2.VolumeCapability.AccessMode
NodeRpc = csi_pb2.NodeServiceCapability.RPC
ControllerRpc = csi_pb2.ControllerServiceCapability.RPC

CSI_PLUGIN = "kubernetes.io/csi"
ESCAPED_CSI_PLUGIN = "kubernetes.io~csi"  # utilstrings.EscapeQualifiedName
DIR_MODE = 0o750
VOL_DATA = "vol_data.json"
CSI_TIMEOUT_S = 120.0  # kubelet's csiTimeout (2 min)
# nestedpendingoperations: a failed operation waits 500 ms, doubling, at most 2m2s.
BACKOFF_INITIAL_S, BACKOFF_MAX_S = 0.5, 122.0
# Retried before a first success, as kubelet retries any failure (and noted); other codes fail.
TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED,
                       grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED})
TRANSIENT_RETRY_S = 30.0
# external-provisioner: StorageClass keys it consumes, and what --extra-create-metadata adds.
PREFIX = "csi.storage.k8s.io/"
FSTYPE_KEY = PREFIX + "fstype"
PROVISIONER_ID_KEY = "storage.kubernetes.io/csiProvisionerIdentity"


class KubeletError(AssertionError):
    """An RPC answered an error where kubelet needs success (carries code and details)."""

    def __init__(self, what: str, exc: grpc.RpcError) -> None:
        self.code = exc.code()
        self.details = exc.details() or ""
        super().__init__(f"{what}: {self.code.name}: {self.details}")


@dataclass(frozen=True)
class PersistentVolume:
    """What kubelet reads from a PV (spec.csi and friends)."""

    name: str  # spec.Name(): the PV name, pvc-<pvc uid>
    volume_handle: str
    volume_mode: str  # "Filesystem" or "Block"
    fs_type: str  # spec.csi.fsType ("" for block)
    capacity_bytes: int
    volume_attributes: Mapping[str, str]
    access_mode: str = "ReadWriteOnce"
    mount_options: tuple[str, ...] = ()

    @property
    def block(self) -> bool:
        return self.volume_mode == "Block"


def mkdir_all(path: Path, mode: int = DIR_MODE) -> None:
    """os.MkdirAll(path, mode): every missing component gets ``mode`` (before umask)."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for p in reversed(missing):
        p.mkdir(mode=mode)


def save_volume_data(directory: Path, data: Mapping[str, str]) -> None:
    """csi_util.go saveVolumeData: os.Create + json.Encode."""
    (directory / VOL_DATA).write_text(json.dumps(dict(data)) + "\n")


def load_volume_data(directory: Path) -> dict[str, str]:
    return dict(json.loads((directory / VOL_DATA).read_text()))


@dataclass(frozen=True)
class MountLayer:
    mount_id: int
    mount_point: str
    fs_type: str
    source: str
    options: frozenset[str]


def mount_layers(path: Path) -> list[MountLayer]:
    """The mounts at ``path`` (bottom first), from /proc/self/mountinfo."""
    target = os.path.realpath(path)
    layers = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        point = fields[4].replace("\\040", " ").replace("\\134", "\\")
        if point == target:
            layers.append(MountLayer(int(fields[0]), point, rest[0], rest[1],
                                     frozenset(fields[5].split(","))))
    return layers


def mounts_below(directory: Path) -> list[str]:
    prefix = os.path.realpath(directory).rstrip("/") + "/"
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ").replace("\\134", "\\")
        if point.startswith(prefix):
            found.append(point)
    return found


def remove_mount_dir(mount_path: Path) -> None:
    """csi_util.go removeMountDir: if not mounted, remove it, vol_data.json and the parent."""
    if mount_layers(mount_path):
        return
    for path in (mount_path, mount_path.parent / VOL_DATA):
        if path.is_dir():
            path.rmdir()
        elif path.exists():
            path.unlink()
    if mount_path.parent.exists():
        mount_path.parent.rmdir()


def with_backoff(call: Callable[[], T], timeout_s: float) -> tuple[T, list[str]]:
    """Retry ``call`` the way kubelet retries a failed volume operation (same arguments,
    exponential backoff); -> (result, the distinct errors seen before it succeeded)."""
    deadline = time.monotonic() + timeout_s
    pause = BACKOFF_INITIAL_S
    seen: list[str] = []
    while True:
        try:
            return call(), seen
        except KubeletError as exc:
            answer = f"{exc.code.name}: {exc.details}"
            if not seen or seen[-1] != answer:
                seen.append(answer)
            if time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, BACKOFF_MAX_S)


# -- external-provisioner ------------------------------------------------------------------


def provision(
    ctl: CsiClient, storage_class: Mapping[str, str], *, pvc_name: str, namespace: str,
    size: int, volume_mode: str = "Filesystem", default_fs_type: str = "ext4",
    mount_options: tuple[str, ...] = (),
) -> tuple[PersistentVolume, csi_pb2.CreateVolumeRequest]:
    """CreateVolume as external-provisioner sends it for a PVC; -> (PV, the request sent).

    The StorageClass parameters lose their ``csi.storage.k8s.io/`` keys (``fstype`` becomes
    the capability's fs_type and the PV's fsType) and gain the --extra-create-metadata keys;
    the volume is named ``pvc-<pvc uid>``; the access mode RWO is sent as
    SINGLE_NODE_MULTI_WRITER when the controller advertises that capability; the
    StorageClass mountOptions go into the capability's mount_flags and the PV.
    """
    pvc_uid = str(uuid.uuid4())
    pv_name = f"pvc-{pvc_uid}"
    caps = ctl.controller.ControllerGetCapabilities(
        csi_pb2.ControllerGetCapabilitiesRequest(), timeout=30).capabilities
    multi_writer = any(c.rpc.type == ControllerRpc.SINGLE_NODE_MULTI_WRITER for c in caps)
    mode = AccessMode(mode=AccessMode.SINGLE_NODE_MULTI_WRITER if multi_writer
                      else AccessMode.SINGLE_NODE_WRITER)
    block = volume_mode == "Block"
    fs_type = "" if block else storage_class.get(FSTYPE_KEY, default_fs_type)
    if block:
        cap = csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(),
                                       access_mode=mode)
    else:
        cap = csi_pb2.VolumeCapability(
            mount=csi_pb2.VolumeCapability.MountVolume(
                fs_type=fs_type, mount_flags=list(mount_options)),
            access_mode=mode)
    parameters = {k: v for k, v in storage_class.items() if not k.startswith(PREFIX)}
    parameters.update({
        PREFIX + "pvc/name": pvc_name,
        PREFIX + "pvc/namespace": namespace,
        PREFIX + "pv/name": pv_name,
    })
    request = csi_pb2.CreateVolumeRequest(
        name=pv_name, capacity_range=csi_pb2.CapacityRange(required_bytes=size),
        volume_capabilities=[cap], parameters=parameters,
    )
    try:
        volume = ctl.controller.CreateVolume(request, timeout=CSI_TIMEOUT_S).volume
    except grpc.RpcError as exc:
        raise KubeletError(f"CreateVolume {pv_name} with parameters {parameters}", exc) from exc
    attributes = dict(volume.volume_context)
    attributes[PROVISIONER_ID_KEY] = (
        f"{int(time.time() * 1000)}-{secrets.randbelow(10_000)}-{DRIVER_NAME}")
    pv = PersistentVolume(
        name=pv_name, volume_handle=volume.volume_id, volume_mode=volume_mode, fs_type=fs_type,
        capacity_bytes=volume.capacity_bytes, volume_attributes=attributes,
        mount_options=() if block else mount_options,
    )
    return pv, request


# -- kubelet -------------------------------------------------------------------------------


@dataclass
class FakeKubelet:
    """One node's kubelet (its own root directory) and its actual state of world."""

    root: Path
    node_name: str
    csi: CsiClient
    attempts: int = 2
    devices: dict[str, PersistentVolume] = field(default_factory=dict)  # pv name -> staged
    pods: dict[tuple[str, str], PersistentVolume] = field(default_factory=dict)  # (uid, pv)
    locks: dict[tuple[str, str], str] = field(default_factory=dict)  # (uid, pv) -> /dev/loopN
    calls: list[str] = field(default_factory=list)  # every RPC sent, in order
    transient: list[str] = field(default_factory=list)  # transient errors retried

    # -- paths ---------------------------------------------------------------------------

    @property
    def plugin_dir(self) -> Path:
        return self.root / "plugins" / CSI_PLUGIN

    def device_mount_path(self, pv: PersistentVolume) -> Path:
        volume_sha = hashlib.sha256(pv.volume_handle.encode()).hexdigest()
        return self.plugin_dir / DRIVER_NAME / volume_sha / "globalmount"

    def pod_volume_dir(self, pod_uid: str, pv: PersistentVolume) -> Path:
        return self.root / "pods" / pod_uid / "volumes" / ESCAPED_CSI_PLUGIN / pv.name

    def target_path(self, pod_uid: str, pv: PersistentVolume) -> Path:
        return self.pod_volume_dir(pod_uid, pv) / "mount"

    def block_staging_path(self, pv: PersistentVolume) -> Path:
        return self.plugin_dir / "volumeDevices" / "staging" / pv.name

    def block_publish_path(self, pod_uid: str, pv: PersistentVolume) -> Path:
        return self.plugin_dir / "volumeDevices" / "publish" / pv.name / pod_uid

    def global_map_path(self, pv: PersistentVolume) -> Path:
        return self.plugin_dir / "volumeDevices" / pv.name / "dev"

    def pod_device_path(self, pod_uid: str, pv: PersistentVolume) -> Path:
        return self.root / "pods" / pod_uid / "volumeDevices" / ESCAPED_CSI_PLUGIN / pv.name

    def staging_path(self, pv: PersistentVolume) -> Path:
        return self.block_staging_path(pv) if pv.block else self.device_mount_path(pv)

    def publish_path(self, pod_uid: str, pv: PersistentVolume) -> Path:
        return (self.block_publish_path(pod_uid, pv) if pv.block
                else self.target_path(pod_uid, pv))

    # -- RPCs ----------------------------------------------------------------------------

    def _call(self, method: str, request: Any, attempts: int | None = None) -> Any:
        """Send ``request`` until it has succeeded ``attempts`` times (a kubelet retry repeats
        it unchanged): every repeat after the first success must succeed at once. Before that,
        a transient error (UNAVAILABLE, ABORTED, ...) is retried with kubelet's backoff and
        noted in ``transient``; any other error fails."""
        response = None
        wanted = attempts or self.attempts
        done = 0
        pause, deadline = BACKOFF_INITIAL_S, time.monotonic() + TRANSIENT_RETRY_S
        while done < wanted:
            self.calls.append(method)
            try:
                response = getattr(self.csi.node, method)(request, timeout=CSI_TIMEOUT_S)
            except grpc.RpcError as exc:
                if done == 0 and exc.code() in TRANSIENT \
                        and time.monotonic() + pause < deadline:
                    self.transient.append(f"{method}: {exc.code().name}: {exc.details()}")
                    time.sleep(pause)
                    pause *= 2
                    continue
                raise KubeletError(
                    f"{self.node_name}: {method} attempt {done + 1} of {wanted} "
                    f"({_describe(request)})", exc) from exc
            done += 1
        return response

    def register(self) -> csi_pb2.NodeGetInfoResponse:
        """Plugin registration: kubelet asks NodeGetInfo once."""
        info: csi_pb2.NodeGetInfoResponse = self._call(
            "NodeGetInfo", csi_pb2.NodeGetInfoRequest(), attempts=1)
        return info

    def capabilities(self) -> set[int]:
        response = self._call("NodeGetCapabilities", csi_pb2.NodeGetCapabilitiesRequest(),
                              attempts=1)
        return {c.rpc.type for c in response.capabilities}

    def capability(self, pv: PersistentVolume) -> csi_pb2.VolumeCapability:
        caps = self.capabilities()
        rwop = pv.access_mode == "ReadWriteOncePod"
        if NodeRpc.SINGLE_NODE_MULTI_WRITER in caps:
            mode = AccessMode.SINGLE_NODE_SINGLE_WRITER if rwop else \
                AccessMode.SINGLE_NODE_MULTI_WRITER
        else:
            mode = AccessMode.SINGLE_NODE_WRITER
        if pv.block:
            return csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(),
                                            access_mode=AccessMode(mode=mode))
        return csi_pb2.VolumeCapability(
            mount=csi_pb2.VolumeCapability.MountVolume(
                fs_type=pv.fs_type, mount_flags=list(pv.mount_options)),
            access_mode=AccessMode(mode=mode))

    def _stage_request(self, pv: PersistentVolume) -> csi_pb2.NodeStageVolumeRequest:
        return csi_pb2.NodeStageVolumeRequest(
            volume_id=pv.volume_handle, publish_context={},
            staging_target_path=str(self.staging_path(pv)), volume_capability=self.capability(pv),
            secrets={}, volume_context=dict(pv.volume_attributes),
        )

    # -- filesystem volumes --------------------------------------------------------------

    def mount_device(self, pv: PersistentVolume) -> Path:
        """csiAttacher.MountDevice: globalmount + vol_data.json, then NodeStage."""
        assert not pv.block
        assert NodeRpc.STAGE_UNSTAGE_VOLUME in self.capabilities()
        path = self.device_mount_path(pv)
        mkdir_all(path)
        save_volume_data(path.parent, {"volumeHandle": pv.volume_handle,
                                       "driverName": DRIVER_NAME})
        self.devices[pv.name] = pv
        self._call("NodeStageVolume", self._stage_request(pv))
        return path

    def set_up(self, pv: PersistentVolume, pod_uid: str, readonly: bool = False) -> Path:
        """csiMountMgr.SetUpAt: the parent dir + vol_data.json, then NodePublish."""
        assert not pv.block
        target = self.target_path(pod_uid, pv)
        mkdir_all(target.parent)
        save_volume_data(target.parent, {
            "specVolID": pv.name, "volumeHandle": pv.volume_handle, "driverName": DRIVER_NAME,
            "nodeName": self.node_name, "volumeLifecycleMode": "Persistent",
            "attachmentID": attachment_name(pv.volume_handle, self.node_name),
        })
        self.pods[(pod_uid, pv.name)] = pv
        self._call("NodePublishVolume", self._publish_request(pv, pod_uid, readonly))
        return target

    def _publish_request(self, pv: PersistentVolume, pod_uid: str,
                         readonly: bool) -> csi_pb2.NodePublishVolumeRequest:
        # podInfoOnMount is false and no token requests: volume_context is the PV's as is.
        return csi_pb2.NodePublishVolumeRequest(
            volume_id=pv.volume_handle, publish_context={},
            staging_target_path=str(self.staging_path(pv)),
            target_path=str(self.publish_path(pod_uid, pv)),
            volume_capability=self.capability(pv), readonly=readonly, secrets={},
            volume_context=dict(pv.volume_attributes),
        )

    def tear_down(self, pv: PersistentVolume, pod_uid: str) -> bool:
        """csiMountMgr.TearDownAt: NodeUnpublish, then removeMountDir. Returns whether the
        driver removed the target itself (CSI: the SP MUST delete what it created there)."""
        target = self.target_path(pod_uid, pv)
        self._call("NodeUnpublishVolume", csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=pv.volume_handle, target_path=str(target)))
        removed_by_driver = not target.exists()
        remove_mount_dir(target)
        self.pods.pop((pod_uid, pv.name), None)
        return removed_by_driver

    def device_mount_refs(self, pv: PersistentVolume) -> list[tuple[str, str]]:
        return [key for key, p in self.pods.items() if p.name == pv.name]

    def unmount_device(self, pv: PersistentVolume) -> None:
        """csiAttacher.UnmountDevice; refused (as kubelet does) while pods still use it."""
        refs = self.device_mount_refs(pv)
        assert not refs, f"kubelet does not unstage {pv.name}: still mounted by pods {refs}"
        path = self.device_mount_path(pv)
        try:
            data = load_volume_data(path.parent)
        except FileNotFoundError:
            self.devices.pop(pv.name, None)  # kubelet: "volume data file does not exist"
            return
        self._call("NodeUnstageVolume", csi_pb2.NodeUnstageVolumeRequest(
            volume_id=data["volumeHandle"], staging_target_path=str(path)))
        remove_mount_dir(path)
        self.devices.pop(pv.name, None)

    def expand(self, pv: PersistentVolume, pod_uid: str, new_size: int) -> int:
        """NodeExpandVolume as kubelet sends it after SetUp; -> capacity_bytes."""
        assert NodeRpc.EXPAND_VOLUME in self.capabilities()
        volume_path = (self.block_publish_path(pod_uid, pv) if pv.block
                       else self.target_path(pod_uid, pv))
        response = self._call("NodeExpandVolume", csi_pb2.NodeExpandVolumeRequest(
            volume_id=pv.volume_handle, volume_path=str(volume_path),
            capacity_range=csi_pb2.CapacityRange(required_bytes=new_size),
            staging_target_path=str(self.staging_path(pv)),
            volume_capability=self.capability(pv), secrets={},
        ))
        return int(response.capacity_bytes)

    def volume_stats(self, pv: PersistentVolume, path: Path) -> csi_pb2.NodeGetVolumeStatsResponse:
        assert NodeRpc.GET_VOLUME_STATS in self.capabilities()
        stats: csi_pb2.NodeGetVolumeStatsResponse = self._call(
            "NodeGetVolumeStats", csi_pb2.NodeGetVolumeStatsRequest(
                volume_id=pv.volume_handle, volume_path=str(path)), attempts=1)
        return stats

    # -- block volumes -------------------------------------------------------------------

    def set_up_device(self, pv: PersistentVolume) -> Path:
        """csiBlockMapper.SetUpDevice: the staging directory, then NodeStage."""
        assert pv.block
        assert NodeRpc.STAGE_UNSTAGE_VOLUME in self.capabilities()
        data_dir = self.plugin_dir / "volumeDevices" / pv.name / "data"
        mkdir_all(data_dir)  # NewBlockVolumeMapper keeps its vol_data.json here
        save_volume_data(data_dir, {
            "specVolID": pv.name, "volumeHandle": pv.volume_handle, "driverName": DRIVER_NAME,
            "nodeName": self.node_name,
            "attachmentID": attachment_name(pv.volume_handle, self.node_name),
        })
        staging = self.block_staging_path(pv)
        mkdir_all(staging)
        self.devices[pv.name] = pv
        self._call("NodeStageVolume", self._stage_request(pv))
        return staging

    def map_pod_device(self, pv: PersistentVolume, pod_uid: str, readonly: bool = False,
                       attempts: int | None = None) -> Path:
        """csiBlockMapper.MapPodDevice: the publish directory, then NodePublish (to a file)."""
        publish = self.block_publish_path(pod_uid, pv)
        mkdir_all(publish.parent)
        self.pods[(pod_uid, pv.name)] = pv
        self._call("NodePublishVolume", self._publish_request(pv, pod_uid, readonly), attempts)
        return publish

    def map_block_volume(self, pv: PersistentVolume, pod_uid: str) -> Path:
        """util.MapBlockVolume: global bind mount, pod symlink, loop descriptor lock."""
        publish = self.block_publish_path(pod_uid, pv)
        global_map = self.global_map_path(pv)
        mkdir_all(global_map)
        link = global_map / pod_uid
        if not mount_layers(link):
            link.touch(mode=DIR_MODE, exist_ok=True)
            subprocess.run(["mount", "--bind", str(publish), str(link)], check=True,
                           capture_output=True, text=True)
        pod_dir = self.pod_device_path(pod_uid, pv).parent
        mkdir_all(pod_dir)
        pod_link = pod_dir / pv.name
        if not pod_link.is_symlink():
            pod_link.symlink_to(publish)
        if (pod_uid, pv.name) not in self.locks:
            out = subprocess.run(["losetup", "-f", "--show", str(link)], check=True,
                                 capture_output=True, text=True).stdout.strip()
            self.locks[(pod_uid, pv.name)] = out
        return pod_link

    def unmap_block_volume(self, pv: PersistentVolume, pod_uid: str) -> None:
        """util.UnmapBlockVolume: release the lock, remove the symlink, unmount the bind."""
        lock = self.locks.pop((pod_uid, pv.name), None)
        if lock is not None:
            subprocess.run(["losetup", "-d", lock], check=True, capture_output=True, text=True)
        self.pod_device_path(pod_uid, pv).unlink(missing_ok=True)
        link = self.global_map_path(pv) / pod_uid
        while mount_layers(link):
            subprocess.run(["umount", str(link)], check=True, capture_output=True, text=True)
        link.unlink(missing_ok=True)

    def unmap_pod_device(self, pv: PersistentVolume, pod_uid: str) -> None:
        """csiBlockMapper.UnmapPodDevice: NodeUnpublish of the publish file."""
        publish = self.block_publish_path(pod_uid, pv)
        self._call("NodeUnpublishVolume", csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=pv.volume_handle, target_path=str(publish)))
        self.pods.pop((pod_uid, pv.name), None)

    def tear_down_device(self, pv: PersistentVolume) -> None:
        """csiBlockMapper.TearDownDevice: NodeUnstage, remove the staging directory and the
        per-volume directories (cleanupOrphanDeviceFiles)."""
        refs = self.device_mount_refs(pv)
        assert not refs, f"kubelet does not unstage {pv.name}: still mapped by pods {refs}"
        staging = self.block_staging_path(pv)
        if staging.exists():
            self._call("NodeUnstageVolume", csi_pb2.NodeUnstageVolumeRequest(
                volume_id=pv.volume_handle, staging_target_path=str(staging)))
            staging.rmdir()
        volume_dir = self.plugin_dir / "volumeDevices" / pv.name
        for path in (self.block_publish_path("x", pv).parent, volume_dir / "dev",
                     volume_dir / "data" / VOL_DATA, volume_dir / "data", volume_dir):
            if path.is_dir():
                path.rmdir()
            elif path.exists():
                path.unlink()
        self.devices.pop(pv.name, None)

    # -- restart and cleanup -------------------------------------------------------------

    def restarted(self, known: Iterable[PersistentVolume],
                  csi: CsiClient | None = None) -> FakeKubelet:
        """A new kubelet process on the same root: its actual state of world is rebuilt from
        the directories and vol_data.json files on disk (reconstruction), not from memory."""
        by_handle = {pv.volume_handle: pv for pv in known}
        new = FakeKubelet(self.root, self.node_name, csi or self.csi, self.attempts)
        new.transient = self.transient
        for data_file in (self.plugin_dir / DRIVER_NAME).glob(f"*/{VOL_DATA}"):
            pv = by_handle[load_volume_data(data_file.parent)["volumeHandle"]]
            new.devices[pv.name] = pv
        for data_file in self.root.glob(f"pods/*/volumes/{ESCAPED_CSI_PLUGIN}/*/{VOL_DATA}"):
            pv = by_handle[load_volume_data(data_file.parent)["volumeHandle"]]
            new.pods[(data_file.parent.parent.parent.parent.name, pv.name)] = pv
        for staging in (self.plugin_dir / "volumeDevices" / "staging").glob("*"):
            pv = next(p for p in by_handle.values() if p.name == staging.name)
            new.devices[pv.name] = pv
        for publish in (self.plugin_dir / "volumeDevices" / "publish").glob("*/*"):
            pv = next(p for p in by_handle.values() if p.name == publish.parent.name)
            new.pods[(publish.name, pv.name)] = pv
        new.locks = dict(self.locks)  # loop devices survive a kubelet restart
        self.locks.clear()
        return new

    def cleanup(self) -> list[str]:
        """Undo every mapping, publish and stage still recorded (one attempt each); then
        force away whatever is still mounted below the root. Returns what went wrong."""
        errors: list[str] = []

        def attempt(what: str, func: Callable[[], object]) -> None:
            try:
                func()
            except Exception as exc:  # keep going: every later step still has to run
                errors.append(f"{self.node_name}: {what}: {exc}")

        saved, self.attempts = self.attempts, 1
        try:
            for uid, name in list(self.locks):
                pv = self.pods.get((uid, name)) or self.devices[name]
                attempt(f"unmap {name} for pod {uid}", partial(self.unmap_block_volume, pv, uid))
            for (uid, name), pv in list(self.pods.items()):
                undo = self.unmap_pod_device if pv.block else self.tear_down
                attempt(f"unpublish {name} for pod {uid}", partial(undo, pv, uid))
                self.pods.pop((uid, name), None)
            for name, pv in list(self.devices.items()):
                undo_device = self.tear_down_device if pv.block else self.unmount_device
                attempt(f"unstage {name}", partial(undo_device, pv))
                self.devices.pop(name, None)
        finally:
            self.attempts = saved
        for point in sorted(mounts_below(self.root), key=lambda p: p.count("/"), reverse=True):
            errors.append(f"{self.node_name}: still mounted after cleanup: {point}")
            subprocess.run(["umount", "-l", point], capture_output=True)
        return errors


def attachment_name(volume_handle: str, node_name: str) -> str:
    """csi_attacher.go getAttachmentName: csi-<sha256(volume, driver, node)>."""
    digest = hashlib.sha256(f"{volume_handle}{DRIVER_NAME}{node_name}".encode()).hexdigest()
    return f"csi-{digest}"


def _describe(request: Any) -> str:
    fields = [f"{d.name}={v!r}" for d, v in request.ListFields()
              if d.name in ("volume_id", "staging_target_path", "target_path", "volume_path",
                            "readonly")]
    return ", ".join(fields)
