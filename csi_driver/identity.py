"""CSI Identity service, shared by the controller and node processes."""

from __future__ import annotations

from collections.abc import Callable

from google.protobuf import wrappers_pb2

from csi_driver._gen import csi_pb2, csi_pb2_grpc
from csi_driver.config import DRIVER_NAME, DRIVER_VERSION
from csi_driver.rpc import Ctx, rpc_method

PluginCapability = csi_pb2.PluginCapability


class IdentityServicer(csi_pb2_grpc.IdentityServicer):
    """Answers GetPluginInfo / GetPluginCapabilities / Probe.

    ``ready`` is asked on every Probe, so a process reports not-ready until its store
    connection and pool are up.
    """

    def __init__(self, controller: bool, ready: Callable[[], bool]) -> None:
        self._controller = controller
        self._ready = ready

    @rpc_method
    async def GetPluginInfo(
        self, request: csi_pb2.GetPluginInfoRequest, context: Ctx
    ) -> csi_pb2.GetPluginInfoResponse:
        return csi_pb2.GetPluginInfoResponse(name=DRIVER_NAME, vendor_version=DRIVER_VERSION)

    @rpc_method
    async def GetPluginCapabilities(
        self, request: csi_pb2.GetPluginCapabilitiesRequest, context: Ctx
    ) -> csi_pb2.GetPluginCapabilitiesResponse:
        caps = []
        if self._controller:
            caps.append(
                PluginCapability(
                    service=PluginCapability.Service(
                        type=PluginCapability.Service.CONTROLLER_SERVICE
                    )
                )
            )
            caps.append(
                PluginCapability(
                    service=PluginCapability.Service(
                        type=PluginCapability.Service.VOLUME_ACCESSIBILITY_CONSTRAINTS
                    )
                )
            )
            caps.append(
                PluginCapability(
                    volume_expansion=PluginCapability.VolumeExpansion(
                        type=PluginCapability.VolumeExpansion.OFFLINE
                    )
                )
            )
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=caps)

    @rpc_method
    async def Probe(
        self, request: csi_pb2.ProbeRequest, context: Ctx
    ) -> csi_pb2.ProbeResponse:
        return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=self._ready()))
