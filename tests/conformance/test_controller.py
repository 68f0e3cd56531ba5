"""CSI Controller service conformance (spec: "Controller Service RPC" and its error tables).

Volume lifecycle on the controller socket only: CreateVolume, DeleteVolume,
ValidateVolumeCapabilities, ControllerGetVolume and the capabilities. ListVolumes,
GetCapacity and ControllerExpandVolume live in test_controller_listing.py. Every mutating
call is repeated to check idempotency.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from csi_driver._gen import csi_pb2
from csi_driver.client import CsiClient, ModeValue, block_capability, mount_capability
from tests.conformance.conftest import (
    GIB,
    MIB,
    POOL_SIZE,
    Cluster,
    Mode,
    create_refused,
    create_request,
    created_volume,
    expect_code,
    list_all_volume_ids,
    replica_nodes,
    unique_name,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

Code = grpc.StatusCode
RPC = csi_pb2.ControllerServiceCapability.RPC


def get_volume(ctl: CsiClient, volume_id: str) -> csi_pb2.ControllerGetVolumeResponse:
    return ctl.controller.ControllerGetVolume(
        csi_pb2.ControllerGetVolumeRequest(volume_id=volume_id)
    )


# --- capabilities -----------------------------------------------------------------------------

SUPPORTED = {
    RPC.CREATE_DELETE_VOLUME, RPC.LIST_VOLUMES, RPC.GET_CAPACITY, RPC.EXPAND_VOLUME,
    RPC.GET_VOLUME, RPC.VOLUME_CONDITION, RPC.SINGLE_NODE_MULTI_WRITER,
}
UNSUPPORTED = {
    RPC.PUBLISH_UNPUBLISH_VOLUME, RPC.CREATE_DELETE_SNAPSHOT, RPC.LIST_SNAPSHOTS,
    RPC.CLONE_VOLUME, RPC.PUBLISH_READONLY, RPC.LIST_VOLUMES_PUBLISHED_NODES,
    RPC.MODIFY_VOLUME, RPC.GET_SNAPSHOT,
}


def test_controller_get_capabilities(ctl: CsiClient) -> None:
    response = ctl.controller.ControllerGetCapabilities(
        csi_pb2.ControllerGetCapabilitiesRequest()
    )
    found = [c.rpc.type for c in response.capabilities]
    assert len(found) == len(set(found)), "duplicate capabilities"
    assert set(found) >= SUPPORTED
    assert not set(found) & UNSUPPORTED


UNIMPLEMENTED_CALLS = {
    "ControllerPublishVolume": csi_pb2.ControllerPublishVolumeRequest(
        volume_id="vol-x", node_id="node-1", volume_capability=mount_capability()
    ),
    "ControllerUnpublishVolume": csi_pb2.ControllerUnpublishVolumeRequest(
        volume_id="vol-x", node_id="node-1"
    ),
    "CreateSnapshot": csi_pb2.CreateSnapshotRequest(source_volume_id="vol-x", name="snap"),
    "DeleteSnapshot": csi_pb2.DeleteSnapshotRequest(snapshot_id="snap"),
    "ListSnapshots": csi_pb2.ListSnapshotsRequest(),
    "GetSnapshot": csi_pb2.GetSnapshotRequest(snapshot_id="snap"),
    "ControllerModifyVolume": csi_pb2.ControllerModifyVolumeRequest(
        volume_id="vol-x", mutable_parameters={"replicas": "2"}
    ),
}


@pytest.mark.parametrize("method", sorted(UNIMPLEMENTED_CALLS))
def test_unadvertised_rpcs_are_unimplemented(ctl: CsiClient, method: str) -> None:
    with expect_code(Code.UNIMPLEMENTED):
        getattr(ctl.controller, method)(UNIMPLEMENTED_CALLS[method])


# --- CreateVolume -----------------------------------------------------------------------------


def test_create_is_idempotent(ctl: CsiClient) -> None:
    request = create_request(size=48 * MIB, replicas=2)
    with created_volume(ctl, request) as first:
        again = ctl.controller.CreateVolume(request).volume
        assert again == first
        assert first.volume_id
        assert first.capacity_bytes == 48 * MIB
        assert len(replica_nodes(first)) == 2
        assert first.volume_context["fsType"] == "ext4"


@pytest.mark.parametrize(
    ("required", "limit", "expected"),
    [
        (10 * MIB + 1, 0, 11 * MIB),  # rounded up to whole MiB
        (0, 0, 1 * GIB),  # default size
        (0, 100 * MIB, 100 * MIB),  # default capped by the limit
        (5 * MIB, 5 * MIB, 5 * MIB),
    ],
)
def test_create_capacity_honours_the_range(
    ctl: CsiClient, required: int, limit: int, expected: int
) -> None:
    with created_volume(ctl, create_request(size=required, limit=limit)) as volume:
        assert volume.capacity_bytes == expected
        assert volume.capacity_bytes >= required
        assert not limit or volume.capacity_bytes <= limit


@pytest.mark.parametrize(
    "change",
    [
        {"size": 128 * MIB},  # bigger than the existing volume
        {"size": 16 * MIB, "limit": 32 * MIB},  # limit below the existing size
        {"replicas": 2},  # other parameters
        {"caps": [block_capability()]},  # other access type
    ],
    ids=["bigger", "limit-below", "parameters", "access-type"],
)
def test_create_same_name_incompatible_is_already_exists(
    ctl: CsiClient, change: dict[str, object]
) -> None:
    name = unique_name()
    with created_volume(ctl, create_request(name, size=64 * MIB)) as volume:
        args: dict[str, object] = {"size": 64 * MIB, **change}
        # Same name -> same volume: deleting a wrongly "created" one is the fixture's job.
        with expect_code(Code.ALREADY_EXISTS):
            ctl.controller.CreateVolume(create_request(name, **args))  # type: ignore[arg-type]
        assert get_volume(ctl, volume.volume_id).volume == volume  # unchanged


def test_create_same_name_outside_the_requisite_is_already_exists(cluster: Cluster) -> None:
    ctl, (first, second, _) = cluster.controller, cluster.node_ids
    name = unique_name()
    with created_volume(ctl, create_request(name, requisite=[first])) as volume:
        assert replica_nodes(volume) == [first]
        with expect_code(Code.ALREADY_EXISTS):
            ctl.controller.CreateVolume(create_request(name, requisite=[second]))


def test_create_same_name_other_fs_type_is_already_exists(ctl: CsiClient) -> None:
    name = unique_name()
    ext4 = create_request(name, caps=[mount_capability(fs_type="ext4")])
    with created_volume(ctl, ext4) as volume:
        assert volume.volume_context["fsType"] == "ext4"
        with expect_code(Code.ALREADY_EXISTS):
            ctl.controller.CreateVolume(
                create_request(name, caps=[mount_capability(fs_type="xfs")]))


def test_concurrent_creates_of_one_name_make_one_volume(ctl: CsiClient) -> None:
    # Spec "Concurrency": the plugin may answer ABORTED to overlapping calls; none may fail
    # otherwise, and every success names the same volume.
    request = create_request(size=16 * MIB, replicas=3)

    def attempt(_: int) -> str:
        try:
            return str(ctl.controller.CreateVolume(request).volume.volume_id)
        except grpc.RpcError as exc:
            assert exc.code() is Code.ABORTED, exc
            return ""

    with ThreadPoolExecutor(max_workers=6) as pool:
        ids = {vid for vid in pool.map(attempt, range(6)) if vid}
    final = ctl.controller.CreateVolume(request).volume.volume_id
    try:
        assert ids <= {final}
        assert list_all_volume_ids(ctl).count(final) == 1
    finally:
        for _ in range(2):
            ctl.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=final))


def _cap(mode: ModeValue, kind: str = "mount") -> csi_pb2.VolumeCapability:
    cap = csi_pb2.VolumeCapability(access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode))
    if kind == "mount":
        cap.mount.SetInParent()
    elif kind == "block":
        cap.block.SetInParent()
    return cap


MOUNT = csi_pb2.VolumeCapability.MountVolume()
INVALID_CREATES = {
    "missing-name": {"name": ""},
    "missing-capabilities": {"caps": []},
    "no-access-type": {"caps": [_cap(Mode.SINGLE_NODE_WRITER, kind="none")]},
    "no-access-mode": {"caps": [csi_pb2.VolumeCapability(mount=MOUNT)]},
    "mode-unknown": {"caps": [_cap(Mode.UNKNOWN)]},
    "mode-multi-node-reader": {"caps": [_cap(Mode.MULTI_NODE_READER_ONLY)]},
    "mode-multi-node-single-writer": {"caps": [_cap(Mode.MULTI_NODE_SINGLE_WRITER)]},
    "mode-multi-node-multi-writer": {"caps": [_cap(Mode.MULTI_NODE_MULTI_WRITER, "block")]},
    "mount-and-block": {"caps": [mount_capability(), block_capability()]},
    "unsupported-fs-type": {"caps": [mount_capability(fs_type="btrfs")]},
    "unknown-parameter": {"parameters": {"colour": "blue"}},
    "replicas-zero": {"replicas": 0},
    "replicas-six": {"replicas": 6},
    "replicas-not-a-number": {"parameters": {"replicas": "three"}, "replicas": None},
    "fstype-parameter-unsupported": {"parameters": {"fsType": "vfat"}},
}


@pytest.mark.parametrize("case", sorted(INVALID_CREATES))
def test_create_invalid_argument(ctl: CsiClient, case: str) -> None:
    request = create_request(**INVALID_CREATES[case])  # type: ignore[arg-type]
    before = list_all_volume_ids(ctl)
    create_refused(ctl, request, Code.INVALID_ARGUMENT)
    assert list_all_volume_ids(ctl) == before


def test_create_from_a_content_source_is_invalid_argument(ctl: CsiClient) -> None:
    # Spec: no CLONE_VOLUME / CREATE_DELETE_SNAPSHOT -> the source is unsupported.
    request = create_request()
    request.volume_content_source.snapshot.snapshot_id = "snap-1"
    create_refused(ctl, request, Code.INVALID_ARGUMENT)


@pytest.mark.parametrize(
    ("required", "limit"),
    [(64 * MIB, 32 * MIB), (MIB + 1, MIB + 2), (0, 1000)],
    ids=["required-above-limit", "rounding-crosses-limit", "limit-below-one-mib"],
)
def test_create_unsatisfiable_range_is_out_of_range(
    ctl: CsiClient, required: int, limit: int
) -> None:
    create_refused(ctl, create_request(size=required, limit=limit), Code.OUT_OF_RANGE)


def test_replicas_above_live_nodes_are_capped(cluster: Cluster) -> None:
    request = create_request(replicas=5, size=16 * MIB)
    with created_volume(cluster.controller, request) as volume:
        assert sorted(replica_nodes(volume)) == sorted(cluster.node_ids)
        assert volume.volume_context["replicas"] == "3"
        assert cluster.controller.controller.CreateVolume(request).volume == volume


def test_too_large_for_any_node_is_resource_exhausted(ctl: CsiClient) -> None:
    for _ in range(2):
        create_refused(ctl, create_request(size=POOL_SIZE + GIB), Code.RESOURCE_EXHAUSTED)


def test_requisite_on_an_unknown_node_is_resource_exhausted(ctl: CsiClient) -> None:
    create_refused(ctl, create_request(requisite=["no-such-node"]), Code.RESOURCE_EXHAUSTED)


@pytest.mark.parametrize("replicas", [1, 2])
def test_requisite_node_is_a_replica(cluster: Cluster, replicas: int) -> None:
    for node_id in cluster.node_ids:
        request = create_request(replicas=replicas, requisite=[node_id])
        with created_volume(cluster.controller, request) as volume:
            nodes = replica_nodes(volume)
            assert node_id in nodes
            assert len(nodes) == len(set(nodes)) == replicas


def test_preferred_node_is_the_first_replica(cluster: Cluster) -> None:
    for node_id in cluster.node_ids:
        others = [n for n in cluster.node_ids if n != node_id]
        request = create_request(
            replicas=2, requisite=cluster.node_ids, preferred=[node_id, *others]
        )
        with created_volume(cluster.controller, request) as volume:
            assert replica_nodes(volume)[0] == node_id


# --- DeleteVolume -----------------------------------------------------------------------------


def test_delete_twice_then_gone(ctl: CsiClient) -> None:
    volume = ctl.controller.CreateVolume(create_request()).volume
    for _ in range(2):
        ctl.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))
    with expect_code(Code.NOT_FOUND):
        get_volume(ctl, volume.volume_id)


def test_delete_unknown_volume_is_ok(ctl: CsiClient) -> None:
    ctl.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="vol-doesnotexist0000"))


def test_delete_without_volume_id_is_invalid_argument(ctl: CsiClient) -> None:
    with expect_code(Code.INVALID_ARGUMENT):
        ctl.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest())


def test_name_is_reusable_after_delete(ctl: CsiClient) -> None:
    request = create_request(size=32 * MIB)
    with created_volume(ctl, request):
        pass
    request.capacity_range.required_bytes = 96 * MIB  # compatible again: the old one is gone
    with created_volume(ctl, request) as volume:
        assert volume.capacity_bytes == 96 * MIB


# --- ValidateVolumeCapabilities ---------------------------------------------------------------


def validate(
    ctl: CsiClient, volume_id: str, *caps: csi_pb2.VolumeCapability
) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
    return ctl.controller.ValidateVolumeCapabilities(
        csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=volume_id, volume_capabilities=caps)
    )


SINGLE_NODE_MODES = [
    Mode.SINGLE_NODE_WRITER, Mode.SINGLE_NODE_READER_ONLY,
    Mode.SINGLE_NODE_SINGLE_WRITER, Mode.SINGLE_NODE_MULTI_WRITER,
]


def test_validate_confirms_supported_capabilities(ctl: CsiClient) -> None:
    with created_volume(ctl) as volume:
        caps = [mount_capability(mode=m) for m in SINGLE_NODE_MODES]
        for _ in range(2):
            response = validate(ctl, volume.volume_id, *caps)
            assert response.HasField("confirmed"), response.message
            assert list(response.confirmed.volume_capabilities) == caps


@pytest.mark.parametrize(
    "cap",
    [block_capability(), mount_capability(mode=Mode.MULTI_NODE_MULTI_WRITER)],
    ids=["block-on-mount-volume", "multi-node-mode"],
)
def test_validate_does_not_confirm_unsupported(
    ctl: CsiClient, cap: csi_pb2.VolumeCapability
) -> None:
    with created_volume(ctl) as volume:
        response = validate(ctl, volume.volume_id, mount_capability(), cap)
        assert not response.HasField("confirmed")
        assert response.message


def test_validate_unknown_volume_is_not_found(ctl: CsiClient) -> None:
    with expect_code(Code.NOT_FOUND):
        validate(ctl, "vol-doesnotexist0000", mount_capability())


def test_validate_missing_fields_is_invalid_argument(ctl: CsiClient) -> None:
    with created_volume(ctl) as volume:
        with expect_code(Code.INVALID_ARGUMENT):
            validate(ctl, "", mount_capability())
        with expect_code(Code.INVALID_ARGUMENT):
            validate(ctl, volume.volume_id)


# --- ControllerGetVolume ----------------------------------------------------------------------


def test_get_volume_reports_the_volume_and_a_healthy_condition(ctl: CsiClient) -> None:
    with created_volume(ctl, create_request(replicas=3)) as volume:
        response = get_volume(ctl, volume.volume_id)
        assert response.volume == volume
        assert response.status.HasField("volume_condition")  # VOLUME_CONDITION is advertised
        assert not response.status.volume_condition.abnormal
        assert response.status.volume_condition.message


def test_get_volume_errors(ctl: CsiClient) -> None:
    with expect_code(Code.NOT_FOUND):
        get_volume(ctl, "vol-doesnotexist0000")
    with expect_code(Code.INVALID_ARGUMENT):
        get_volume(ctl, "")
