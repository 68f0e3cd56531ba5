"""CSI Controller conformance, part 2: ListVolumes, GetCapacity and ControllerExpandVolume.

Spec sections "ListVolumes" (max_entries / starting_token / next_token, ABORTED for an
invalid token), "GetCapacity" (available capacity for the given capabilities, parameters
and accessible topology) and "ControllerExpandVolume" (grow, idempotent, never shrink).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from csi_driver._gen import csi_pb2
from csi_driver.client import CsiClient, block_capability, mount_capability
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
    topology,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

Code = grpc.StatusCode


def list_page(
    ctl: CsiClient, max_entries: int = 0, token: str = ""
) -> csi_pb2.ListVolumesResponse:
    return ctl.controller.ListVolumes(
        csi_pb2.ListVolumesRequest(max_entries=max_entries, starting_token=token)
    )


def walk_pages(ctl: CsiClient, max_entries: int) -> list[list[str]]:
    """Follow next_token to the end; the ids of every page."""
    pages: list[list[str]] = []
    token = ""
    for _ in range(1000):
        response = list_page(ctl, max_entries, token)
        pages.append([e.volume.volume_id for e in response.entries])
        token = response.next_token
        if not token:
            return pages
    raise AssertionError("ListVolumes pagination never ended")


@pytest.fixture
def five_volumes(ctl: CsiClient) -> Iterator[list[csi_pb2.Volume]]:
    with contextlib.ExitStack() as stack:
        volumes = [
            stack.enter_context(created_volume(ctl, create_request(size=(8 + i) * MIB)))
            for i in range(5)
        ]
        yield volumes


def test_list_contains_every_created_volume(
    ctl: CsiClient, five_volumes: list[csi_pb2.Volume]
) -> None:
    response = list_page(ctl)
    assert not response.next_token
    listed = {e.volume.volume_id: e for e in response.entries}
    for volume in five_volumes:
        entry = listed[volume.volume_id]
        assert entry.volume == volume
        # VOLUME_CONDITION is advertised, so the condition MUST be there.
        assert entry.status.HasField("volume_condition")
        assert not entry.status.volume_condition.abnormal


def test_list_pagination_walks_every_page_once(
    ctl: CsiClient, five_volumes: list[csi_pb2.Volume]
) -> None:
    everything = [e.volume.volume_id for e in list_page(ctl).entries]
    pages = walk_pages(ctl, max_entries=2)
    assert all(1 <= len(page) <= 2 for page in pages), pages
    walked = [vid for page in pages for vid in page]
    assert len(walked) == len(set(walked)), f"duplicates across pages: {pages}"
    assert set(walked) == set(everything)
    assert {v.volume_id for v in five_volumes} <= set(walked)
    assert len(pages) == -(-len(everything) // 2)


def test_list_max_entries_above_the_total_returns_everything(
    ctl: CsiClient, five_volumes: list[csi_pb2.Volume]
) -> None:
    response = list_page(ctl, max_entries=1000)
    assert not response.next_token
    assert {v.volume_id for v in five_volumes} <= {e.volume.volume_id for e in response.entries}


def test_list_next_token_is_reusable(
    ctl: CsiClient, five_volumes: list[csi_pb2.Volume]
) -> None:
    token = list_page(ctl, max_entries=2).next_token
    assert token
    assert list_page(ctl, 2, token) == list_page(ctl, 2, token)


@pytest.mark.parametrize("token", ["not-a-token", "v1:../../etc", "\x00", "v2:vol-0"])
def test_list_invalid_starting_token_is_aborted(ctl: CsiClient, token: str) -> None:
    with expect_code(Code.ABORTED):
        list_page(ctl, token=token)


def test_list_negative_max_entries_is_invalid_argument(ctl: CsiClient) -> None:
    with expect_code(Code.INVALID_ARGUMENT):
        list_page(ctl, max_entries=-1)


# --- GetCapacity ------------------------------------------------------------------------------


def capacity(
    ctl: CsiClient, node_id: str | None = None,
    caps: list[csi_pb2.VolumeCapability] | None = None,
    parameters: dict[str, str] | None = None,
) -> int:
    request = csi_pb2.GetCapacityRequest(volume_capabilities=caps or [], parameters=parameters)
    if node_id is not None:
        request.accessible_topology.CopyFrom(topology(node_id))
    return ctl.controller.GetCapacity(request).available_capacity


def eventually(check: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_capacity_without_topology(ctl: CsiClient) -> None:
    for caps in ([], [mount_capability()], [block_capability()]):
        assert 0 < capacity(ctl, caps=caps) <= POOL_SIZE


def test_capacity_per_node_topology(cluster: Cluster) -> None:
    for node_id in cluster.node_ids:
        assert 0 < capacity(cluster.controller, node_id) <= POOL_SIZE


def test_capacity_of_an_unknown_topology_is_zero(ctl: CsiClient) -> None:
    assert capacity(ctl, "no-such-node") == 0


def test_capacity_for_an_unsupported_capability_is_zero(ctl: CsiClient) -> None:
    # Spec: capacity usable by volumes satisfying ALL the capabilities; none can be made.
    assert capacity(ctl, caps=[mount_capability(mode=Mode.MULTI_NODE_MULTI_WRITER)]) == 0


def test_capacity_takes_parameters_into_account(ctl: CsiClient) -> None:
    one = capacity(ctl, parameters={"replicas": "1"})
    three = capacity(ctl, parameters={"replicas": "3"})
    assert 0 < three <= one <= POOL_SIZE
    with expect_code(Code.INVALID_ARGUMENT):
        capacity(ctl, parameters={"colour": "blue"})


def test_capacity_shrinks_with_a_volume_and_recovers_after_delete(cluster: Cluster) -> None:
    ctl, node_id = cluster.controller, cluster.node_ids[1]
    before = capacity(ctl, node_id)
    request = create_request(size=256 * MIB, replicas=1, requisite=[node_id])
    with created_volume(ctl, request):
        assert eventually(lambda: capacity(ctl, node_id) == before - 256 * MIB), (
            f"capacity of {node_id}: {before} -> {capacity(ctl, node_id)}"
        )
    assert eventually(lambda: capacity(ctl, node_id) == before)


def test_reported_capacity_is_provisionable(cluster: Cluster) -> None:
    ctl, node_id = cluster.controller, cluster.node_ids[2]
    available = capacity(ctl, node_id) // MIB * MIB
    too_big = create_request(size=available + MIB, replicas=1, requisite=[node_id])
    create_refused(ctl, too_big, Code.RESOURCE_EXHAUSTED)
    with created_volume(ctl, create_request(size=available, replicas=1, requisite=[node_id])):
        assert eventually(lambda: capacity(ctl, node_id) < MIB)


def get_volume(ctl: CsiClient, volume_id: str) -> csi_pb2.ControllerGetVolumeResponse:
    return ctl.controller.ControllerGetVolume(
        csi_pb2.ControllerGetVolumeRequest(volume_id=volume_id)
    )


def expand(
    ctl: CsiClient, volume_id: str, required: int, limit: int = 0,
    cap: csi_pb2.VolumeCapability | None = None,
) -> csi_pb2.ControllerExpandVolumeResponse:
    request = csi_pb2.ControllerExpandVolumeRequest(
        volume_id=volume_id,
        capacity_range=csi_pb2.CapacityRange(required_bytes=required, limit_bytes=limit),
    )
    if cap is not None:
        request.volume_capability.CopyFrom(cap)
    return ctl.controller.ControllerExpandVolume(request)


# --- ControllerExpandVolume -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mount", "block"])
def test_expand_grows_the_volume(ctl: CsiClient, kind: str) -> None:
    cap = mount_capability() if kind == "mount" else block_capability()
    with created_volume(ctl, create_request(size=32 * MIB, caps=[cap], replicas=2)) as volume:
        for _ in range(2):
            response = expand(ctl, volume.volume_id, 80 * MIB + 1, cap=cap)
            assert response.capacity_bytes >= 80 * MIB + 1
            if kind == "mount":
                assert response.node_expansion_required
        assert get_volume(ctl, volume.volume_id).volume.capacity_bytes == response.capacity_bytes


def test_expand_to_a_smaller_size_keeps_the_current_size(ctl: CsiClient) -> None:
    with created_volume(ctl, create_request(size=64 * MIB)) as volume:
        response = expand(ctl, volume.volume_id, 16 * MIB)
        assert response.capacity_bytes == 64 * MIB
        assert get_volume(ctl, volume.volume_id).volume.capacity_bytes == 64 * MIB


def test_expand_errors(ctl: CsiClient) -> None:
    with expect_code(Code.NOT_FOUND):
        expand(ctl, "vol-doesnotexist0000", 64 * MIB)
    with created_volume(ctl) as volume:
        with expect_code(Code.INVALID_ARGUMENT):
            expand(ctl, "", 128 * MIB)
        with expect_code(Code.INVALID_ARGUMENT):
            ctl.controller.ControllerExpandVolume(
                csi_pb2.ControllerExpandVolumeRequest(volume_id=volume.volume_id)
            )
        with expect_code(Code.OUT_OF_RANGE):
            expand(ctl, volume.volume_id, 256 * MIB, limit=128 * MIB)
        with expect_code(Code.INVALID_ARGUMENT):  # spec: "Exceeds capabilities"
            expand(ctl, volume.volume_id, 128 * MIB,
                   cap=mount_capability(mode=Mode.MULTI_NODE_MULTI_WRITER))
        assert get_volume(ctl, volume.volume_id).volume.capacity_bytes == volume.capacity_bytes


def test_expand_beyond_the_pool_fails_and_keeps_the_size(ctl: CsiClient) -> None:
    with created_volume(ctl, create_request(size=32 * MIB)) as volume:
        with expect_code(Code.OUT_OF_RANGE, Code.RESOURCE_EXHAUSTED):
            expand(ctl, volume.volume_id, POOL_SIZE + GIB)
        assert get_volume(ctl, volume.volume_id).volume.capacity_bytes == 32 * MIB


@pytest.mark.parametrize("created_as", ["mount", "block"])
def test_expand_with_a_capability_the_volume_lacks_is_invalid_argument(
    ctl: CsiClient, created_as: str
) -> None:
    # Spec "Exceeds capabilities": ValidateVolumeCapabilities does not confirm the other type.
    made, other = ((mount_capability(), block_capability()) if created_as == "mount"
                   else (block_capability(), mount_capability()))
    with created_volume(ctl, create_request(size=16 * MIB, caps=[made])) as volume:
        with expect_code(Code.INVALID_ARGUMENT):
            expand(ctl, volume.volume_id, 32 * MIB, cap=other)
        assert get_volume(ctl, volume.volume_id).volume.capacity_bytes == 16 * MIB

