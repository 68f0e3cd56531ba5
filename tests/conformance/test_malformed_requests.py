"""Controller requests a careless or hostile CO might send (spec: "Field Requirements", "Size
Limits"): oversized or banned names and ids, non-ASCII digits, out-of-range ``minInSync``.
Each is INVALID_ARGUMENT with a small status message and nothing created; a valid
``minInSync`` reaches the volume record's parameters.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from csi_driver._gen import csi_pb2
from csi_driver.client import CsiClient, mount_capability
from csi_driver.state.etcd import EtcdStore
from csi_driver.state.model import Versioned, VolumeRecord
from tests.conformance.conftest import (
    Cluster,
    create_refused,
    create_request,
    created_volume,
    expect_code,
    list_all_volume_ids,
)
from tests.fault.conftest import run_store

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

Code = grpc.StatusCode

BAD_CREATES = {
    "name-2MiB": {"name": "x" * (2 << 20)},
    "name-129-bytes": {"name": "x" * 129},
    "name-nul": {"name": "pvc-a\0b"},
    "name-control-char": {"name": "pvc-a\x07b"},
    "replicas-arabic-indic-3": {"parameters": {"replicas": "\u0663"}, "replicas": None},
    "replicas-fullwidth-3": {"parameters": {"replicas": "\uff13"}, "replicas": None},
    "replicas-huge": {"parameters": {"replicas": "1" * 5000}, "replicas": None},
    "min-in-sync-above-replicas": {"parameters": {"minInSync": "3"}, "replicas": 2},
    "min-in-sync-zero": {"parameters": {"minInSync": "0"}, "replicas": 2},
    "min-in-sync-arabic-indic-2": {"parameters": {"minInSync": "\u0662"}, "replicas": 2},
    "parameters-above-4KiB": {"parameters": {"csi.storage.k8s.io/pvc/name": "p" * 5000}},
}


@pytest.mark.parametrize("case", sorted(BAD_CREATES))
def test_create_refuses_malformed_requests(ctl: CsiClient, case: str) -> None:
    request = create_request(**BAD_CREATES[case])  # type: ignore[arg-type]
    before = list_all_volume_ids(ctl)
    create_refused(ctl, request, Code.INVALID_ARGUMENT)
    assert list_all_volume_ids(ctl) == before


@pytest.mark.parametrize("volume_id", ["x" * (2 << 20), "vol-a\0b", "vol-a\n", "a/b"],
                         ids=["2MiB", "nul", "newline", "slash"])
def test_controller_rpcs_refuse_malformed_volume_ids(ctl: CsiClient, volume_id: str) -> None:
    calls: list[Callable[[], object]] = [
        lambda: ctl.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id)),
        lambda: ctl.controller.ControllerGetVolume(
            csi_pb2.ControllerGetVolumeRequest(volume_id=volume_id)),
        lambda: ctl.controller.ValidateVolumeCapabilities(
            csi_pb2.ValidateVolumeCapabilitiesRequest(
                volume_id=volume_id, volume_capabilities=[mount_capability()])),
        lambda: ctl.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
            volume_id=volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=1 << 30))),
    ]
    for rpc in calls:
        with expect_code(Code.INVALID_ARGUMENT) as failure:
            rpc()
        assert len(failure.message) < 1000, "a status message must stay small"


def test_min_in_sync_reaches_the_volume_record(cluster: Cluster) -> None:
    request = create_request(replicas=2, parameters={"minInSync": "2"})
    with created_volume(cluster.controller, request) as volume:

        async def get(store: EtcdStore) -> Versioned[VolumeRecord] | None:
            return await store.get_volume(volume.volume_id)

        found = run_store(cluster.spec, get)
        assert found is not None
        assert dict(found.value.parameters).get("minInSync") == "2"
        assert dict(found.value.parameters).get("replicas") == "2"


def test_min_in_sync_above_the_live_nodes_is_refused(ctl: CsiClient) -> None:
    """Placed short (5 replicas asked, 3 live nodes), a volume with minInSync 4 could never
    acknowledge a write: CreateVolume says so instead of making it."""
    request = create_request(replicas=5, parameters={"minInSync": "4"})
    before = list_all_volume_ids(ctl)
    create_refused(ctl, request, Code.RESOURCE_EXHAUSTED)
    assert list_all_volume_ids(ctl) == before
