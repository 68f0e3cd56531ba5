"""CSI Identity service conformance (spec: "Identity Service RPC") on every plugin socket.

The controller and each node process serve Identity; the controller additionally serves
Controller, the nodes Node. A service a socket does not serve answers UNIMPLEMENTED.
"""

from __future__ import annotations

import re

import grpc
import pytest

from csi_driver._gen import csi_pb2, csi_pb2_grpc
from csi_driver.client import CsiClient
from csi_driver.config import DRIVER_NAME
from tests.conformance.conftest import Cluster, expect_code

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

Service = csi_pb2.PluginCapability.Service
Expansion = csi_pb2.PluginCapability.VolumeExpansion
# Spec GetPluginInfoResponse.name: domain name notation, at most 63 characters.
_DOMAIN_RE = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)+$")


def all_sockets(cluster: Cluster) -> list[tuple[str, CsiClient]]:
    return [("controller", cluster.controller), *cluster.nodes.items()]


def services(client: CsiClient) -> set[int]:
    response = client.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    return {c.service.type for c in response.capabilities if c.WhichOneof("type") == "service"}


def expansions(client: CsiClient) -> set[int]:
    response = client.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    return {
        c.volume_expansion.type
        for c in response.capabilities
        if c.WhichOneof("type") == "volume_expansion"
    }


def test_get_plugin_info_names_the_driver_everywhere(cluster: Cluster) -> None:
    for where, client in all_sockets(cluster):
        for _ in range(2):  # repeated calls answer the same
            info = client.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
            assert info.name == DRIVER_NAME == "tandem.csi.io", where
            assert len(info.name) <= 63 and _DOMAIN_RE.match(info.name), where
            assert info.vendor_version, f"{where}: vendor_version is REQUIRED"


def test_plugin_info_is_identical_on_all_sockets(cluster: Cluster) -> None:
    answers = {
        (i.name, i.vendor_version)
        for _, c in all_sockets(cluster)
        for i in [c.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())]
    }
    assert len(answers) == 1, answers


def test_controller_advertises_controller_service_topology_and_expansion(
    cluster: Cluster,
) -> None:
    found = services(cluster.controller)
    assert Service.CONTROLLER_SERVICE in found
    assert Service.VOLUME_ACCESSIBILITY_CONSTRAINTS in found
    assert Service.GROUP_CONTROLLER_SERVICE not in found
    assert Service.SNAPSHOT_METADATA_SERVICE not in found
    # EXPAND_VOLUME is advertised: exactly one of ONLINE / OFFLINE says how.
    assert expansions(cluster.controller) in ({Expansion.ONLINE}, {Expansion.OFFLINE})


def test_nodes_do_not_claim_the_controller_service(cluster: Cluster) -> None:
    for node_id, client in cluster.nodes.items():
        assert Service.CONTROLLER_SERVICE not in services(client), node_id


def test_probe_reports_ready(cluster: Cluster) -> None:
    for where, client in all_sockets(cluster):
        for _ in range(3):
            response = client.identity.Probe(csi_pb2.ProbeRequest())
            # Spec: an unset `ready` means ready.
            assert not response.HasField("ready") or response.ready.value, where


def test_node_service_is_not_served_by_the_controller_socket(cluster: Cluster) -> None:
    with expect_code(grpc.StatusCode.UNIMPLEMENTED):
        cluster.controller.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest())


def test_controller_service_is_not_served_by_node_sockets(cluster: Cluster) -> None:
    for node_id, client in cluster.nodes.items():
        with expect_code(grpc.StatusCode.UNIMPLEMENTED) as failure:
            client.controller.ControllerGetCapabilities(
                csi_pb2.ControllerGetCapabilitiesRequest()
            )
        assert failure.code is grpc.StatusCode.UNIMPLEMENTED, node_id


def test_group_controller_service_is_unimplemented(cluster: Cluster) -> None:
    # Not advertised (no GROUP_CONTROLLER_SERVICE), so calling it must not succeed.
    stub = csi_pb2_grpc.GroupControllerStub(cluster.controller.channel)
    with expect_code(grpc.StatusCode.UNIMPLEMENTED):
        stub.GroupControllerGetCapabilities(csi_pb2.GroupControllerGetCapabilitiesRequest())
