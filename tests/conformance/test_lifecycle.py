"""Whole-volume round trips in the order a CO drives them (spec: "Volume Lifecycle").

CREATE -> NODE_STAGE -> NODE_PUBLISH -> (workload writes) -> NODE_UNPUBLISH -> NODE_UNSTAGE
-> NODE_STAGE -> NODE_PUBLISH -> (workload verifies) -> ... -> DELETE, every call made twice
(the CO may repeat any of them), with file contents checked by SHA-256.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import grpc
import pytest

from csi_driver._gen import csi_pb2
from csi_driver.client import CsiClient, ModeValue, mount_capability
from tests.conformance.conftest import (
    MIB,
    XFS_SIZE,
    Cluster,
    Mode,
    create_request,
    expect_code,
    mount_at,
    publish_request,
    replica_nodes,
    stage_refused,
    stage_request,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

Code = grpc.StatusCode


def write_tree(root: Path, seed: int) -> dict[str, str]:
    """Write a few files (some nested, sizes from bytes to MiBs); return path -> sha256."""
    sums = {}
    for i, size in enumerate([0, 1, 4095, 65536 + 7, 3 * MIB + 11]):
        rel = f"d{i % 2}/sub{i}/f{seed}-{i}.bin" if i % 2 else f"f{seed}-{i}.bin"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = os.urandom(size)
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        sums[rel] = hashlib.sha256(data).hexdigest()
    return sums


def verify_tree(root: Path, sums: dict[str, str]) -> None:
    for rel, digest in sums.items():
        assert hashlib.sha256((root / rel).read_bytes()).hexdigest() == digest, rel


def twice(call: object, request: object) -> None:
    for _ in range(2):
        call(request)  # type: ignore[operator]


def stage_and_publish(
    node: CsiClient, vid: str, staging: Path, target: Path, cap: csi_pb2.VolumeCapability
) -> None:
    twice(node.node.NodeStageVolume, stage_request(vid, staging, cap))
    twice(node.node.NodePublishVolume, publish_request(vid, staging, target, cap))
    assert mount_at(staging) is not None and mount_at(target) is not None


def unpublish_and_unstage(node: CsiClient, vid: str, staging: Path, target: Path) -> None:
    twice(node.node.NodeUnpublishVolume,
          csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=str(target)))
    assert mount_at(target) is None and not target.exists()
    twice(node.node.NodeUnstageVolume,
          csi_pb2.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(staging)))
    assert mount_at(staging) is None


def round_trip(
    cluster: Cluster, workdir: Path, request: csi_pb2.CreateVolumeRequest,
    cap: csi_pb2.VolumeCapability,
) -> list[str]:
    """The full lifecycle; returns the mount options seen on (staging, target) per cycle."""
    ctl = cluster.controller
    volume = ctl.controller.CreateVolume(request).volume
    vid, options = volume.volume_id, []
    try:
        assert ctl.controller.CreateVolume(request).volume == volume
        node = cluster.node(replica_nodes(volume)[0])
        staging, sums = workdir / "globalmount", dict[str, str]()
        for cycle in range(3):
            target = workdir / f"pod-{cycle}" / "volumes" / "mnt"
            stage_and_publish(node, vid, staging, target, cap)
            try:
                verify_tree(target, sums)
                sums.update(write_tree(target, seed=cycle))
                verify_tree(staging, sums)
                for path in (staging, target):
                    found = mount_at(path)
                    assert found is not None
                    options.append(",".join(sorted(found.options)))
            finally:
                unpublish_and_unstage(node, vid, staging, target)
    finally:
        twice(ctl.controller.DeleteVolume, csi_pb2.DeleteVolumeRequest(volume_id=vid))
    with expect_code(Code.NOT_FOUND):
        ctl.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=vid))
    return options


@pytest.mark.parametrize(
    ("fs_type", "size", "mode"),
    [
        ("ext4", 64 * MIB, Mode.SINGLE_NODE_WRITER),
        ("ext4", 64 * MIB, Mode.SINGLE_NODE_SINGLE_WRITER),
        ("xfs", XFS_SIZE, Mode.SINGLE_NODE_MULTI_WRITER),
    ],
    ids=["ext4-writer", "ext4-single-writer", "xfs-multi-writer"],
)
def test_round_trip_keeps_the_data(
    cluster: Cluster, workdir: Path, fs_type: str, size: int, mode: ModeValue
) -> None:
    cap = mount_capability(fs_type=fs_type, mode=mode)
    round_trip(cluster, workdir, create_request(size=size, caps=[cap], replicas=2), cap)


@pytest.mark.parametrize("fs_type", ["ext4", "xfs"])
def test_round_trip_with_mount_flags(cluster: Cluster, workdir: Path, fs_type: str) -> None:
    cap = mount_capability(fs_type=fs_type, flags=("noatime",))
    size = XFS_SIZE if fs_type == "xfs" else 64 * MIB
    options = round_trip(cluster, workdir, create_request(size=size, caps=[cap]), cap)
    # Every cycle: the staging mount and the published bind mount both carry the flag.
    assert len(options) == 6
    for seen in options:
        assert "noatime" in seen.split(","), options


def test_ownership_moves_between_replica_nodes(cluster: Cluster, workdir: Path) -> None:
    """Stage, write, unstage on each replica node in turn (no cross-node data is asserted)."""
    ctl, cap = cluster.controller, mount_capability()
    volume = ctl.controller.CreateVolume(create_request(size=32 * MIB, replicas=3)).volume
    vid = volume.volume_id
    try:
        nodes = replica_nodes(volume)
        assert sorted(nodes) == sorted(cluster.node_ids)
        for round_no in range(2):
            for node_id in nodes:
                node = cluster.node(node_id)
                staging = workdir / node_id / "staging"
                target = workdir / node_id / f"pod-{round_no}"
                stage_and_publish(node, vid, staging, target, cap)
                try:
                    others = [cluster.node(n) for n in nodes if n != node_id]
                    for other in others:
                        stage_refused(other, stage_request(vid, workdir / "x", cap),
                                      Code.FAILED_PRECONDITION)
                    verify_tree(target, write_tree(target, seed=round_no))
                finally:
                    unpublish_and_unstage(node, vid, staging, target)
    finally:
        twice(ctl.controller.DeleteVolume, csi_pb2.DeleteVolumeRequest(volume_id=vid))
