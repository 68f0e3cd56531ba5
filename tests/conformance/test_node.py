"""CSI Node service conformance (spec: "Node Service RPC" and its error tables).

NodeGetInfo, NodeGetCapabilities, NodeStage/Unstage, NodePublish/Unpublish and
NodeGetVolumeStats against the node process that holds a replica, with real loop devices,
mkfs and mounts. Staging ownership (RWO) across nodes is checked here too. Data paths,
expansion and xfs live in test_node_data.py.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from csi_driver._gen import csi_pb2
from csi_driver.client import CsiClient, block_capability, mount_capability
from csi_driver.config import TOPOLOGY_KEY
from tests.conformance.conftest import (
    MIB,
    Cluster,
    Mode,
    create_request,
    created_volume,
    expect_code,
    mount_at,
    publish_request,
    published,
    replica_nodes,
    stage_refused,
    stage_request,
    staged,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

Code = grpc.StatusCode
NodeRPC = csi_pb2.NodeServiceCapability.RPC
MISSING_ID = "vol-doesnotexist0000"


@dataclass(frozen=True)
class Vol:
    volume: csi_pb2.Volume
    node: CsiClient
    node_id: str
    staging: Path
    target: Path

    @property
    def id(self) -> str:
        return self.volume.volume_id


@pytest.fixture
def vol(cluster: Cluster, workdir: Path) -> Iterator[Vol]:
    """A 64 MiB single-replica mount volume and the node client of its replica (not staged)."""
    with created_volume(cluster.controller, create_request(size=64 * MIB)) as volume:
        node_id = replica_nodes(volume)[0]
        yield Vol(volume, cluster.node(node_id), node_id, workdir / "staging",
                  workdir / "pods" / "target")


def blank_one_of(volume_id: str, path: Path) -> list[tuple[str, Path | str]]:
    """(volume_id, path) pairs with one REQUIRED field left empty."""
    return [("", path), (volume_id, "")]


def unstage(node: CsiClient, volume_id: str, staging: Path | str) -> None:
    node.node.NodeUnstageVolume(
        csi_pb2.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=str(staging))
    )


def unpublish(node: CsiClient, volume_id: str, target: Path | str) -> None:
    node.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target))
    )


def stats(node: CsiClient, volume_id: str, path: Path | str) -> csi_pb2.NodeGetVolumeStatsResponse:
    return node.node.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=str(path))
    )


# --- info and capabilities --------------------------------------------------------------------


def test_node_get_info(cluster: Cluster) -> None:
    for node_id, client in cluster.nodes.items():
        info = client.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
        assert info.node_id == node_id
        assert dict(info.accessible_topology.segments) == {TOPOLOGY_KEY: node_id}
        assert info.max_volumes_per_node >= 0


def test_node_get_capabilities(cluster: Cluster) -> None:
    for client in cluster.nodes.values():
        response = client.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest())
        found = {c.rpc.type for c in response.capabilities}
        assert found >= {NodeRPC.STAGE_UNSTAGE_VOLUME, NodeRPC.GET_VOLUME_STATS,
                         NodeRPC.EXPAND_VOLUME, NodeRPC.VOLUME_CONDITION}


# --- NodeStageVolume / NodeUnstageVolume ------------------------------------------------------


def test_stage_invalid_arguments(vol: Vol) -> None:
    bad = [
        stage_request("", vol.staging),
        stage_request(vol.id, ""),
        csi_pb2.NodeStageVolumeRequest(volume_id=vol.id, staging_target_path=str(vol.staging)),
        stage_request(vol.id, vol.staging, csi_pb2.VolumeCapability(
            access_mode=csi_pb2.VolumeCapability.AccessMode(mode=Mode.SINGLE_NODE_WRITER))),
    ]
    for request in bad:
        stage_refused(vol.node, request, Code.INVALID_ARGUMENT)
    # An unsupported mode: an invalid field, or (table) "Exceeds capabilities".
    multi = mount_capability(mode=Mode.MULTI_NODE_MULTI_WRITER)
    stage_refused(vol.node, stage_request(vol.id, vol.staging, multi),
                  Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION)
    assert mount_at(vol.staging) is None


def test_stage_unknown_volume_is_not_found(vol: Vol) -> None:
    with expect_code(Code.NOT_FOUND):
        vol.node.node.NodeStageVolume(stage_request(MISSING_ID, vol.staging))


def test_stage_twice_then_unstage_twice(vol: Vol) -> None:
    for _ in range(2):
        vol.node.node.NodeStageVolume(stage_request(vol.id, vol.staging))
    found = mount_at(vol.staging)
    assert found is not None and found.fs_type == "ext4"
    for _ in range(2):
        unstage(vol.node, vol.id, vol.staging)
    assert mount_at(vol.staging) is None


def test_unstage_of_a_never_staged_path_is_ok(vol: Vol) -> None:
    unstage(vol.node, vol.id, vol.staging)


def test_unstage_missing_fields_is_invalid_argument(vol: Vol) -> None:
    for volume_id, path in blank_one_of(vol.id, vol.staging):
        with expect_code(Code.INVALID_ARGUMENT):
            unstage(vol.node, volume_id, path)


def test_stage_at_a_second_path_is_already_exists(vol: Vol) -> None:
    with staged(vol.node, vol.id, vol.staging):
        stage_refused(vol.node, stage_request(vol.id, vol.staging.with_name("other")),
                      Code.ALREADY_EXISTS)
        assert mount_at(vol.staging.with_name("other")) is None


def test_stage_again_with_another_access_type_is_already_exists(vol: Vol) -> None:
    with staged(vol.node, vol.id, vol.staging):
        stage_refused(vol.node, stage_request(vol.id, vol.staging, block_capability()),
                      Code.ALREADY_EXISTS)


def test_stage_again_with_another_fs_type_is_already_exists(vol: Vol) -> None:
    with staged(vol.node, vol.id, vol.staging):
        stage_refused(vol.node, stage_request(vol.id, vol.staging, mount_capability(fs_type="xfs")),
                      Code.ALREADY_EXISTS)


def test_stage_on_a_node_without_replica_reads_remotely(
    cluster: Cluster, workdir: Path
) -> None:
    """Any node can stage any volume; a node without a replica serves it over the network."""
    home, away = cluster.node_ids[0], cluster.node_ids[1]
    request = create_request(replicas=1, requisite=[home], preferred=[home])
    with created_volume(cluster.controller, request) as volume:
        assert replica_nodes(volume) == [home]
        payload = os.urandom(256 << 10)
        with staged(cluster.node(home), volume.volume_id, workdir / "s"):
            (workdir / "s" / "f").write_bytes(payload)
        with staged(cluster.node(away), volume.volume_id, workdir / "s"):
            assert (workdir / "s" / "f").read_bytes() == payload


def test_staging_is_single_node_rwo(cluster: Cluster, workdir: Path) -> None:
    request = create_request(replicas=2, size=32 * MIB)
    with created_volume(cluster.controller, request) as volume:
        a, b = (cluster.node(n) for n in replica_nodes(volume))
        vid = volume.volume_id
        with staged(a, vid, workdir / "a"):
            for _ in range(2):
                stage_refused(b, stage_request(vid, workdir / "b"), Code.FAILED_PRECONDITION)
            assert mount_at(workdir / "b") is None
        with staged(b, vid, workdir / "b"):
            assert mount_at(workdir / "b") is not None
            stage_refused(a, stage_request(vid, workdir / "a"), Code.FAILED_PRECONDITION)


def test_delete_of_a_staged_volume_is_failed_precondition(vol: Vol, cluster: Cluster) -> None:
    with staged(vol.node, vol.id, vol.staging), expect_code(Code.FAILED_PRECONDITION):
        cluster.controller.controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=vol.id)
        )
    # `vol` deletes it on teardown: now it is unstaged, that must work.


# --- NodePublishVolume / NodeUnpublishVolume --------------------------------------------------


def test_publish_invalid_requests(vol: Vol) -> None:
    with staged(vol.node, vol.id, vol.staging):
        with expect_code(Code.FAILED_PRECONDITION):  # STAGE_UNSTAGE is advertised
            vol.node.node.NodePublishVolume(publish_request(vol.id, "", vol.target))
        for request in [
            publish_request("", vol.staging, vol.target),
            publish_request(vol.id, vol.staging, ""),
            csi_pb2.NodePublishVolumeRequest(
                volume_id=vol.id, staging_target_path=str(vol.staging),
                target_path=str(vol.target)),
        ]:
            with expect_code(Code.INVALID_ARGUMENT):
                vol.node.node.NodePublishVolume(request)
        with expect_code(Code.FAILED_PRECONDITION):  # not staged at that path
            vol.node.node.NodePublishVolume(
                publish_request(vol.id, vol.staging.with_name("elsewhere"), vol.target))
        assert mount_at(vol.target) is None


def test_publish_unknown_volume_is_not_found(vol: Vol) -> None:
    with expect_code(Code.NOT_FOUND):
        vol.node.node.NodePublishVolume(publish_request(MISSING_ID, vol.staging, vol.target))


def test_publish_twice_unpublish_twice(vol: Vol) -> None:
    with staged(vol.node, vol.id, vol.staging):
        for _ in range(2):
            vol.node.node.NodePublishVolume(publish_request(vol.id, vol.staging, vol.target))
        found = mount_at(vol.target)
        assert found is not None and "rw" in found.options
        (vol.target / "hello").write_text("hi")
        assert (vol.staging / "hello").read_text() == "hi"
        for _ in range(2):
            unpublish(vol.node, vol.id, vol.target)
        assert mount_at(vol.target) is None
        assert not vol.target.exists(), "spec: the SP MUST delete the target it created"


def test_unpublish_missing_fields_is_invalid_argument(vol: Vol) -> None:
    for volume_id, path in blank_one_of(vol.id, vol.target):
        with expect_code(Code.INVALID_ARGUMENT):
            unpublish(vol.node, volume_id, path)


def test_publish_same_target_other_readonly_is_already_exists(vol: Vol) -> None:
    with staged(vol.node, vol.id, vol.staging), published(
        vol.node, vol.id, vol.staging, vol.target
    ), expect_code(Code.ALREADY_EXISTS):
        vol.node.node.NodePublishVolume(
            publish_request(vol.id, vol.staging, vol.target, readonly=True))


@pytest.mark.parametrize("how", ["readonly-flag", "reader-only-mode"])
def test_publish_read_only_refuses_writes(vol: Vol, how: str) -> None:
    readonly = how == "readonly-flag"
    cap = mount_capability(mode=Mode.SINGLE_NODE_WRITER if readonly
                           else Mode.SINGLE_NODE_READER_ONLY)
    with staged(vol.node, vol.id, vol.staging, cap), published(
        vol.node, vol.id, vol.staging, vol.target, cap, readonly=readonly
    ):
        vol.node.node.NodePublishVolume(  # idempotent with the same arguments
            publish_request(vol.id, vol.staging, vol.target, cap, readonly=readonly))
        with pytest.raises(OSError) as failure:
            (vol.target / "nope").write_text("x")
        assert failure.value.errno == errno.EROFS


def test_single_node_multi_writer_publishes_to_two_targets(vol: Vol) -> None:
    cap = mount_capability(mode=Mode.SINGLE_NODE_MULTI_WRITER)
    second = vol.target.with_name("second")
    with staged(vol.node, vol.id, vol.staging, cap), published(
        vol.node, vol.id, vol.staging, vol.target, cap
    ), published(vol.node, vol.id, vol.staging, second, cap):
        (vol.target / "shared").write_text("one")
        assert (second / "shared").read_text() == "one"


def test_single_node_single_writer_refuses_a_second_target(vol: Vol) -> None:
    cap = mount_capability(mode=Mode.SINGLE_NODE_SINGLE_WRITER)
    second = vol.target.with_name("second")
    with staged(vol.node, vol.id, vol.staging, cap), published(
        vol.node, vol.id, vol.staging, vol.target, cap
    ):
        try:
            with expect_code(Code.FAILED_PRECONDITION):
                vol.node.node.NodePublishVolume(
                    publish_request(vol.id, vol.staging, second, cap))
        finally:
            unpublish(vol.node, vol.id, second)


# --- NodeGetVolumeStats -----------------------------------------------------------------------


def test_volume_stats_of_a_published_mount(vol: Vol) -> None:
    with staged(vol.node, vol.id, vol.staging), published(
        vol.node, vol.id, vol.staging, vol.target
    ):
        before = stats(vol.node, vol.id, vol.target)
        (vol.target / "blob").write_bytes(os.urandom(4 * MIB))
        os.sync()
        after = stats(vol.node, vol.id, vol.target)
        assert not after.volume_condition.abnormal  # VOLUME_CONDITION is advertised
        usage = {u.unit: u for u in after.usage}
        Unit = csi_pb2.VolumeUsage
        assert set(usage) == {Unit.BYTES, Unit.INODES}
        for u in usage.values():
            assert u.total > 0 and 0 <= u.used <= u.total and 0 <= u.available <= u.total
        assert 32 * MIB < usage[Unit.BYTES].total <= 64 * MIB
        old = {u.unit: u for u in before.usage}
        assert usage[Unit.BYTES].used >= old[Unit.BYTES].used + 4 * MIB
        assert usage[Unit.INODES].used == old[Unit.INODES].used + 1
        staged_stats = stats(vol.node, vol.id, vol.staging)
        assert {u.unit: u.total for u in staged_stats.usage} == {
            u.unit: u.total for u in after.usage}


def test_volume_stats_errors(vol: Vol) -> None:
    with staged(vol.node, vol.id, vol.staging):
        with expect_code(Code.NOT_FOUND):
            stats(vol.node, vol.id, vol.staging.with_name("no-such-path"))
        with expect_code(Code.NOT_FOUND):
            stats(vol.node, MISSING_ID, vol.staging)
        with expect_code(Code.NOT_FOUND):  # exists, but is not this volume's
            stats(vol.node, vol.id, vol.staging.parent)
        for volume_id, path in blank_one_of(vol.id, vol.staging):
            with expect_code(Code.INVALID_ARGUMENT):
                stats(vol.node, volume_id, path)


def test_volume_stats_of_a_block_volume(cluster: Cluster, workdir: Path) -> None:
    cap = block_capability()
    request = create_request(size=24 * MIB, caps=[cap])
    with created_volume(cluster.controller, request) as volume:
        node = cluster.node(replica_nodes(volume)[0])
        vid, target = volume.volume_id, workdir / "dev" / "block"
        with staged(node, vid, workdir / "s", cap), published(
            node, vid, workdir / "s", target, cap
        ):
            response = stats(node, vid, target)
            by_unit = {u.unit: u for u in response.usage}
            assert by_unit[csi_pb2.VolumeUsage.BYTES].total == 24 * MIB
            assert not response.volume_condition.abnormal
