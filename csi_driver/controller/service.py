"""CSI Controller service: validate -> delegate to ``VolumeService`` -> build the response.

Stateless: everything lives in etcd. Per-volume concurrency is handled by the service's
locks (busy -> ABORTED).
"""

from __future__ import annotations

import re

from csi_driver import validation
from csi_driver._gen import csi_pb2, csi_pb2_grpc
from csi_driver.capabilities import controller_capabilities, reject_unsupported
from csi_driver.config import TOPOLOGY_KEY
from csi_driver.controller.volumes import CreateSpec, VolumeService
from csi_driver.errors import InvalidArgumentError, OperationPendingError
from csi_driver.rpc import Ctx, rpc_method
from csi_driver.state.model import VolumeRecord

_TOKEN_RE = re.compile(r"^v1:([A-Za-z0-9][A-Za-z0-9_.-]{0,127})$")


class InvalidTokenError(OperationPendingError):
    """ListVolumes starting_token that this plugin did not hand out (spec: ABORTED)."""


def _volume(record: VolumeRecord) -> csi_pb2.Volume:
    # accessibility "any": no topology, so the PV gets no node affinity (CSI: equally
    # accessible from every node) and its pod can land where its replicas no longer are.
    anywhere = dict(record.parameters).get("accessibility") == "any"
    return csi_pb2.Volume(
        volume_id=record.volume_id,
        capacity_bytes=record.size_bytes,
        volume_context={"fsType": record.fs_type, "replicas": str(len(record.replicas))},
        accessible_topology=[] if anywhere else [
            csi_pb2.Topology(segments={TOPOLOGY_KEY: n}) for n in record.replica_nodes()
        ],
    )


def _condition(record: VolumeRecord, live: set[str]) -> csi_pb2.VolumeCondition:
    down = [n for n in record.replica_nodes() if n not in live]
    out_of_sync = [n for n in record.replica_nodes() if n not in record.isr]
    if not set(record.isr) & live:
        return csi_pb2.VolumeCondition(abnormal=True, message="no in-sync replica is reachable")
    if down or out_of_sync:
        return csi_pb2.VolumeCondition(
            abnormal=True,
            message=f"degraded: nodes down {down}, replicas out of sync {out_of_sync}",
        )
    return csi_pb2.VolumeCondition(abnormal=False, message="healthy")


@reject_unsupported(csi_pb2_grpc.ControllerServicer)
class ControllerServicer(csi_pb2_grpc.ControllerServicer):
    def __init__(self, volumes: VolumeService, default_replicas: int) -> None:
        self._volumes = volumes
        self._default_replicas = default_replicas

    @rpc_method
    async def CreateVolume(
        self, request: csi_pb2.CreateVolumeRequest, context: Ctx
    ) -> csi_pb2.CreateVolumeResponse:
        validation.check_volume_name(request.name)
        access_type, cap_fs_type = validation.check_capabilities(request.volume_capabilities)
        if request.HasField("volume_content_source"):
            raise InvalidArgumentError("volume content sources (clones, snapshots) are unsupported")
        params = validation.parse_parameters(request.parameters, self._default_replicas)
        fs_type = cap_fs_type or params.fs_type
        size = validation.size_from_range(
            request.capacity_range if request.HasField("capacity_range") else None,
            minimum=validation.min_size(access_type, fs_type),
        )
        reqs = request.accessibility_requirements
        spec = CreateSpec(
            name=request.name,
            size_bytes=size,
            limit_bytes=request.capacity_range.limit_bytes,
            replicas=params.replicas,
            min_in_sync=params.min_in_sync,
            fs_type=fs_type,
            access_type=access_type,
            parameters=tuple(sorted(request.parameters.items())),
            requisite=tuple(validation.topologies(reqs.requisite)),
            preferred=tuple(validation.topologies(reqs.preferred)),
        )
        record = await self._volumes.create(spec)
        return csi_pb2.CreateVolumeResponse(volume=_volume(record))

    @rpc_method
    async def DeleteVolume(
        self, request: csi_pb2.DeleteVolumeRequest, context: Ctx
    ) -> csi_pb2.DeleteVolumeResponse:
        validation.check_volume_id(request.volume_id)
        await self._volumes.delete(request.volume_id)
        return csi_pb2.DeleteVolumeResponse()

    @rpc_method
    async def ValidateVolumeCapabilities(
        self, request: csi_pb2.ValidateVolumeCapabilitiesRequest, context: Ctx
    ) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
        validation.check_volume_id(request.volume_id)
        validation.require(list(request.volume_capabilities), "volume_capabilities")
        record = await self._volumes.get(request.volume_id)
        for cap in request.volume_capabilities:
            problem = validation.capability_problem(cap)
            if problem is None and cap.WhichOneof("access_type") != record.access_type:
                problem = f"volume is a {record.access_type} volume"
            if problem:
                return csi_pb2.ValidateVolumeCapabilitiesResponse(message=problem)
        confirmed = csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=request.volume_context,
            volume_capabilities=request.volume_capabilities,
            parameters=request.parameters,
        )
        return csi_pb2.ValidateVolumeCapabilitiesResponse(confirmed=confirmed)

    @rpc_method
    async def ListVolumes(
        self, request: csi_pb2.ListVolumesRequest, context: Ctx
    ) -> csi_pb2.ListVolumesResponse:
        if request.max_entries < 0:
            raise InvalidArgumentError("max_entries must not be negative")
        start = ""
        if request.starting_token:
            match = _TOKEN_RE.match(request.starting_token)
            if not match:
                raise InvalidTokenError(
                    f"invalid starting_token {validation.shown(request.starting_token)}")
            start = match.group(1)
        # Tokens name the first id of the next page, so a page stays valid when volumes
        # before it are deleted meanwhile.
        records = [r for r in await self._volumes.list_ready() if r.volume_id >= start]
        live = set(await self._volumes.live_nodes())
        page = records[: request.max_entries] if request.max_entries else records
        rest = records[len(page):]
        entries = [
            csi_pb2.ListVolumesResponse.Entry(
                volume=_volume(r),
                status=csi_pb2.ListVolumesResponse.VolumeStatus(
                    volume_condition=_condition(r, live)
                ),
            )
            for r in page
        ]
        next_token = f"v1:{rest[0].volume_id}" if rest else ""
        return csi_pb2.ListVolumesResponse(entries=entries, next_token=next_token)

    @rpc_method
    async def GetCapacity(
        self, request: csi_pb2.GetCapacityRequest, context: Ctx
    ) -> csi_pb2.GetCapacityResponse:
        for cap in request.volume_capabilities:
            if validation.capability_problem(cap) is not None:
                return csi_pb2.GetCapacityResponse(available_capacity=0)
        params = validation.parse_parameters(request.parameters, self._default_replicas)
        segments = dict(request.accessible_topology.segments) or None
        available = await self._volumes.capacity(segments, params.replicas)
        return csi_pb2.GetCapacityResponse(available_capacity=available)

    @rpc_method
    async def ControllerGetCapabilities(
        self, request: csi_pb2.ControllerGetCapabilitiesRequest, context: Ctx
    ) -> csi_pb2.ControllerGetCapabilitiesResponse:
        return csi_pb2.ControllerGetCapabilitiesResponse(capabilities=controller_capabilities())

    @rpc_method
    async def ControllerExpandVolume(
        self, request: csi_pb2.ControllerExpandVolumeRequest, context: Ctx
    ) -> csi_pb2.ControllerExpandVolumeResponse:
        validation.check_volume_id(request.volume_id)
        validation.require(request.HasField("capacity_range"), "capacity_range")
        access_type = None
        if request.HasField("volume_capability"):
            access_type = validation.check_single_capability(
                request.volume_capability, "volume_capability"
            )
        size = validation.size_from_range(request.capacity_range)
        record = await self._volumes.expand(request.volume_id, size, access_type)
        return csi_pb2.ControllerExpandVolumeResponse(
            capacity_bytes=record.size_bytes,
            node_expansion_required=record.access_type == "mount",
        )

    @rpc_method
    async def ControllerGetVolume(
        self, request: csi_pb2.ControllerGetVolumeRequest, context: Ctx
    ) -> csi_pb2.ControllerGetVolumeResponse:
        validation.check_volume_id(request.volume_id)
        record = await self._volumes.get(request.volume_id)
        live = set(await self._volumes.live_nodes())
        return csi_pb2.ControllerGetVolumeResponse(
            volume=_volume(record),
            status=csi_pb2.ControllerGetVolumeResponse.VolumeStatus(
                volume_condition=_condition(record, live)
            ),
        )
