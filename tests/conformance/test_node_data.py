"""CSI Node conformance, part 2: data through real devices, expansion and filesystems.

Block volumes (the published file is the device; data survives unstage/restage), online
expansion (ControllerExpandVolume then NodeExpandVolume grows the device and the
filesystem), xfs, and the NodeExpandVolume error table.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path

import grpc
import pytest

from csi_driver._gen import csi_pb2
from csi_driver.client import CsiClient, block_capability, mount_capability
from tests.conformance.conftest import (
    MIB,
    XFS_SIZE,
    Cluster,
    Mode,
    create_request,
    created_volume,
    expect_code,
    mount_at,
    online_expansion,
    publish_request,
    published,
    replica_nodes,
    stage_refused,
    stage_request,
    staged,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

Code = grpc.StatusCode


def node_expand(
    node: CsiClient, volume_id: str, path: Path | str, staging: Path | str = "",
    required: int = 0, limit: int = 0, cap: csi_pb2.VolumeCapability | None = None,
) -> csi_pb2.NodeExpandVolumeResponse:
    request = csi_pb2.NodeExpandVolumeRequest(
        volume_id=volume_id, volume_path=str(path), staging_target_path=str(staging)
    )
    if required or limit:
        request.capacity_range.CopyFrom(
            csi_pb2.CapacityRange(required_bytes=required, limit_bytes=limit))
    if cap is not None:
        request.volume_capability.CopyFrom(cap)
    return node.node.NodeExpandVolume(request)


def controller_expand(
    ctl: CsiClient, volume_id: str, size: int, cap: csi_pb2.VolumeCapability
) -> csi_pb2.ControllerExpandVolumeResponse:
    return ctl.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
        volume_id=volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=size),
        volume_capability=cap,
    ))


def device_size(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def fs_total(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


def test_block_volume_data_survives_unstage_and_restage(cluster: Cluster, workdir: Path) -> None:
    cap = block_capability()
    with created_volume(cluster.controller, create_request(size=32 * MIB, caps=[cap])) as volume:
        node, vid = cluster.node(replica_nodes(volume)[0]), volume.volume_id
        staging, target = workdir / "staging", workdir / "pod" / "dev"
        data, offset = os.urandom(MIB), 5 * MIB + 4096
        with staged(node, vid, staging, cap), published(node, vid, staging, target, cap):
            node.node.NodeStageVolume(stage_request(vid, staging, cap))  # idempotent
            assert stat.S_ISBLK(os.stat(target).st_mode), "the target must be the device"
            assert device_size(target) == 32 * MIB
            fd = os.open(target, os.O_WRONLY)
            try:
                assert os.pwrite(fd, data, offset) == len(data)
                os.fsync(fd)
            finally:
                os.close(fd)
        assert not target.exists()
        with staged(node, vid, staging, cap), published(node, vid, staging, target, cap):
            fd = os.open(target, os.O_RDONLY)
            try:
                back = os.pread(fd, len(data), offset)
            finally:
                os.close(fd)
            assert hashlib.sha256(back).hexdigest() == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("how", ["readonly-flag", "reader-only-mode"])
def test_block_publish_read_only_refuses_writes(
    cluster: Cluster, workdir: Path, how: str
) -> None:
    readonly = how == "readonly-flag"
    cap = block_capability(Mode.SINGLE_NODE_WRITER if readonly else Mode.SINGLE_NODE_READER_ONLY)
    with created_volume(cluster.controller, create_request(size=8 * MIB, caps=[cap])) as volume:
        node, vid = cluster.node(replica_nodes(volume)[0]), volume.volume_id
        staging, target = workdir / "staging", workdir / "pod" / "dev"
        with staged(node, vid, staging, cap), published(
            node, vid, staging, target, cap, readonly=readonly
        ):
            try:
                fd = os.open(target, os.O_WRONLY)
                try:
                    os.pwrite(fd, b"\xff" * 4096, 0)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                assert exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM), exc
                return
            fd = os.open(target, os.O_RDONLY)
            try:
                landed = os.pread(fd, 4096, 0) == b"\xff" * 4096
            finally:
                os.close(fd)
            pytest.fail(f"a write through a read-only publish succeeded (data landed: {landed})")


def co_expand(
    cluster: Cluster, node: CsiClient, vid: str, staging: Path, target: Path,
    cap: csi_pb2.VolumeCapability, new_size: int,
) -> csi_pb2.ControllerExpandVolumeResponse:
    """Expand a staged and published volume as a CO does for the advertised expansion type.

    ONLINE: ControllerExpandVolume in place. OFFLINE: first the spec's "Volume in use"
    (FAILED_PRECONDITION), then unpublish, unstage, ControllerExpandVolume, stage, publish.
    Then NodeExpandVolume, twice, when the controller says node expansion is required.
    """
    ctl = cluster.controller
    if online_expansion(ctl):
        response = controller_expand(ctl, vid, new_size, cap)
    else:
        with expect_code(Code.FAILED_PRECONDITION):
            controller_expand(ctl, vid, new_size, cap)
        node.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=str(target)))
        node.node.NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(staging)))
        response = controller_expand(ctl, vid, new_size, cap)
        node.node.NodeStageVolume(stage_request(vid, staging, cap))
        node.node.NodePublishVolume(publish_request(vid, staging, target, cap))
    assert response.capacity_bytes >= new_size
    if response.node_expansion_required:
        for _ in range(2):
            grown = node_expand(node, vid, target, staging, required=new_size, cap=cap)
            assert grown.capacity_bytes in (0, response.capacity_bytes)  # OPTIONAL field
    return response


@pytest.mark.parametrize(
    ("fs_type", "size"),
    [("ext4", 64 * MIB), ("xfs", XFS_SIZE)],
    ids=["ext4", "xfs"],
)
def test_expansion_grows_the_filesystem(
    cluster: Cluster, workdir: Path, fs_type: str, size: int
) -> None:
    cap = mount_capability(fs_type=fs_type)
    ctl, new_size = cluster.controller, size + 96 * MIB
    with created_volume(ctl, create_request(size=size, caps=[cap])) as volume:
        node, vid = cluster.node(replica_nodes(volume)[0]), volume.volume_id
        staging, target = workdir / "staging", workdir / "pod" / "mnt"
        with staged(node, vid, staging, cap), published(node, vid, staging, target, cap):
            payload = os.urandom(2 * MIB)
            (target / "keep.bin").write_bytes(payload)
            before = fs_total(target)
            response = co_expand(cluster, node, vid, staging, target, cap, new_size)
            if online_expansion(ctl):
                assert response.node_expansion_required, "a mounted filesystem must grow"
            assert fs_total(target) >= before + 64 * MIB, (before, fs_total(target))
            assert (target / "keep.bin").read_bytes() == payload
            usage = node.node.NodeGetVolumeStats(
                csi_pb2.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=str(target)))
            assert usage.usage[0].total == fs_total(target)


def test_node_expand_grows_a_published_block_device(cluster: Cluster, workdir: Path) -> None:
    cap, ctl = block_capability(), cluster.controller
    with created_volume(ctl, create_request(size=16 * MIB, caps=[cap])) as volume:
        node, vid = cluster.node(replica_nodes(volume)[0]), volume.volume_id
        staging, target = workdir / "staging", workdir / "pod" / "dev"
        with staged(node, vid, staging, cap), published(node, vid, staging, target, cap):
            co_expand(cluster, node, vid, staging, target, cap, 40 * MIB)
            for _ in range(2):  # whether required or not, it must be safe and take effect
                response = node_expand(node, vid, target, staging, required=40 * MIB, cap=cap)
                assert response.capacity_bytes in (0, 40 * MIB)
            assert device_size(target) == 40 * MIB


def test_node_expand_errors(cluster: Cluster, workdir: Path) -> None:
    ctl = cluster.controller
    with created_volume(ctl, create_request(size=32 * MIB)) as volume:
        node, vid = cluster.node(replica_nodes(volume)[0]), volume.volume_id
        staging = workdir / "staging"
        with expect_code(Code.NOT_FOUND):  # exists, but is not staged here
            node_expand(node, vid, staging)
        with staged(node, vid, staging):
            with expect_code(Code.NOT_FOUND):
                node_expand(node, "vol-doesnotexist0000", staging)
            with expect_code(Code.NOT_FOUND):
                node_expand(node, vid, workdir)
            blanks: list[tuple[str, Path | str]] = [("", staging), (vid, "")]
            for volume_id, path in blanks:
                with expect_code(Code.INVALID_ARGUMENT):
                    node_expand(node, volume_id, path)
            with expect_code(Code.INVALID_ARGUMENT):  # "Exceeds capabilities"
                node_expand(node, vid, staging,
                            cap=mount_capability(mode=Mode.MULTI_NODE_MULTI_WRITER))


def test_node_expand_limit_below_the_size_is_out_of_range(
    cluster: Cluster, workdir: Path
) -> None:
    with created_volume(cluster.controller, create_request(size=32 * MIB)) as volume:
        node, vid = cluster.node(replica_nodes(volume)[0]), volume.volume_id
        with staged(node, vid, workdir / "s"), expect_code(Code.OUT_OF_RANGE):
            node_expand(node, vid, workdir / "s", required=16 * MIB, limit=16 * MIB)


@pytest.mark.parametrize("created_as", [
    "block",
    "mount",
])
def test_stage_with_the_other_access_type_is_failed_precondition(
    cluster: Cluster, workdir: Path, created_as: str
) -> None:
    """Spec "Exceeds capabilities": the CO asks for an access type the volume was not made for.

    ValidateVolumeCapabilities refuses to confirm it, so staging must refuse it too, and must
    not touch the data (a block volume must never be formatted).
    """
    block, mount = block_capability(), mount_capability()
    made, other = (block, mount) if created_as == "block" else (mount, block)
    with created_volume(cluster.controller, create_request(size=16 * MIB, caps=[made])) as vol:
        node, vid = cluster.node(replica_nodes(vol)[0]), vol.volume_id
        staging, target = workdir / "staging", workdir / "pod" / "dev"
        data = os.urandom(64 * 1024)
        if created_as == "block":
            with staged(node, vid, staging, made), published(node, vid, staging, target, made):
                fd = os.open(target, os.O_WRONLY)
                try:
                    os.pwrite(fd, data, 0)
                    os.fsync(fd)
                finally:
                    os.close(fd)
        accepted = True
        try:
            node.node.NodeStageVolume(stage_request(vid, staging, other))
        except grpc.RpcError as exc:
            accepted = False
            code = exc.code()
            assert code in (Code.FAILED_PRECONDITION, Code.INVALID_ARGUMENT), exc
        finally:
            node.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
                volume_id=vid, staging_target_path=str(staging)))
        if created_as == "block":
            with staged(node, vid, staging, made), published(node, vid, staging, target, made):
                fd = os.open(target, os.O_RDONLY)
                try:
                    intact = os.pread(fd, len(data), 0) == data
                finally:
                    os.close(fd)
            assert intact, f"the block volume's data was overwritten (stage accepted: {accepted})"
        other_kind = other.WhichOneof("access_type")
        assert not accepted, f"a {created_as} volume was staged as {other_kind}"


@pytest.mark.parametrize("via", ["parameter", "capability"])
def test_xfs_volume_is_formatted_and_mounted(cluster: Cluster, workdir: Path, via: str) -> None:
    cap = mount_capability(fs_type="xfs" if via == "capability" else "")
    params = {"fsType": "xfs"} if via == "parameter" else {}
    request = create_request(size=XFS_SIZE, caps=[cap], parameters=params)
    with created_volume(cluster.controller, request) as volume:
        assert volume.volume_context.get("fsType") == "xfs"
        node, vid = cluster.node(replica_nodes(volume)[0]), volume.volume_id
        staging, target = workdir / "staging", workdir / "pod" / "mnt"
        with staged(node, vid, staging, cap), published(node, vid, staging, target, cap):
            found = mount_at(staging)
            assert found is not None and found.fs_type == "xfs"
            (target / "x").write_text("xfs")
            assert (staging / "x").read_text() == "xfs"


def test_restaging_with_another_fs_type_never_reformats(cluster: Cluster, workdir: Path) -> None:
    xfs, ext4 = mount_capability(fs_type="xfs"), mount_capability(fs_type="ext4")
    with created_volume(cluster.controller, create_request(size=XFS_SIZE, caps=[xfs])) as volume:
        node, vid, staging = cluster.node(replica_nodes(volume)[0]), volume.volume_id, workdir / "s"
        with staged(node, vid, staging, xfs):
            (staging / "precious").write_text("data")
        stage_refused(node, stage_request(vid, staging, ext4),
                      Code.FAILED_PRECONDITION, Code.INVALID_ARGUMENT, Code.ALREADY_EXISTS)
        assert mount_at(staging) is None
        with staged(node, vid, staging, xfs):
            assert (staging / "precious").read_text() == "data"


def test_a_created_small_xfs_volume_is_usable(cluster: Cluster, workdir: Path) -> None:
    cap = mount_capability(fs_type="xfs")
    request = create_request(size=64 * MIB, caps=[cap])
    try:
        volume = cluster.controller.controller.CreateVolume(request).volume
    except grpc.RpcError as exc:  # refusing it up front is fine too
        assert exc.code() in (Code.OUT_OF_RANGE, Code.INVALID_ARGUMENT)
        return
    try:
        node = cluster.node(replica_nodes(volume)[0])
        with staged(node, volume.volume_id, workdir / "s", cap):
            assert mount_at(workdir / "s") is not None
    finally:
        cluster.controller.controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))


# -- accessibility (issue 12) ----------------------------------------------------------------


def test_accessibility_any_stages_on_a_node_without_a_replica(
    cluster: Cluster, workdir: Path
) -> None:
    """StorageClass parameter accessibility=any: no topology (so no PV node affinity), and
    a node holding no replica stages the volume, reading and writing over the network. A
    pod whose replicas all moved elsewhere is never stuck on nodes that are gone."""
    cap = mount_capability()
    request = create_request(size=32 * MIB, caps=[cap], replicas=1,
                             parameters={"accessibility": "any"})
    with created_volume(cluster.controller, request) as volume:
        assert list(volume.accessible_topology) == []
        vid = volume.volume_id
        (holder,) = [n for n in cluster.node_ids if (
            Path(cluster.spec.node(n).pool.dir) / f"{vid}.img").exists()]
        stranger = next(n for n in cluster.node_ids if n != holder)
        payload = os.urandom(MIB)
        for node_id, tag in ((stranger, "remote"), (holder, "local")):
            node = cluster.node(node_id)
            staging, target = workdir / f"{tag}-staging", workdir / f"{tag}-pod" / "mnt"
            with staged(node, vid, staging, cap), published(node, vid, staging, target, cap):
                if tag == "remote":
                    (target / "written-remotely").write_bytes(payload)
                else:
                    assert (target / "written-remotely").read_bytes() == payload
    with created_volume(cluster.controller, create_request(replicas=1)) as default:
        assert len(default.accessible_topology) == 1  # the default stays "replicas"
