"""CSI Node service: validate -> lock the volume -> delegate to ``StagingService``.

Every id and path is validated before the lock: a malformed one is INVALID_ARGUMENT with
nothing touched, never a half-done call that fails in the kernel.
"""

from __future__ import annotations

from csi_driver import validation
from csi_driver._gen import csi_pb2, csi_pb2_grpc
from csi_driver.capabilities import node_capabilities, reject_unsupported
from csi_driver.config import TOPOLOGY_KEY
from csi_driver.errors import FailedPreconditionError
from csi_driver.locks import VolumeLocks
from csi_driver.node.staging import StagingService
from csi_driver.rpc import Ctx, rpc_method

AccessMode = csi_pb2.VolumeCapability.AccessMode


def _mount_flags(cap: csi_pb2.VolumeCapability) -> list[str]:
    flags = list(cap.mount.mount_flags) if cap.WhichOneof("access_type") == "mount" else []
    validation.check_mount_flags(flags)
    return flags


@reject_unsupported(csi_pb2_grpc.NodeServicer)
class NodeServicer(csi_pb2_grpc.NodeServicer):
    def __init__(self, node_id: str, max_volumes: int, staging: StagingService) -> None:
        self._node_id = node_id
        self._max_volumes = max_volumes
        self._staging = staging
        self._locks = VolumeLocks()

    @rpc_method
    async def NodeStageVolume(
        self, request: csi_pb2.NodeStageVolumeRequest, context: Ctx
    ) -> csi_pb2.NodeStageVolumeResponse:
        validation.check_volume_id(request.volume_id)
        validation.check_path(request.staging_target_path, "staging_target_path")
        access_type = validation.check_single_capability(
            request.volume_capability, "volume_capability"
        )
        flags = _mount_flags(request.volume_capability)
        with self._locks.hold(request.volume_id):
            await self._staging.stage(
                request.volume_id,
                request.staging_target_path,
                access_type,
                request.volume_capability.mount.fs_type if access_type == "mount" else "",
                flags,
            )
        return csi_pb2.NodeStageVolumeResponse()

    @rpc_method
    async def NodeUnstageVolume(
        self, request: csi_pb2.NodeUnstageVolumeRequest, context: Ctx
    ) -> csi_pb2.NodeUnstageVolumeResponse:
        validation.check_volume_id(request.volume_id)
        validation.check_path(request.staging_target_path, "staging_target_path")
        with self._locks.hold(request.volume_id):
            await self._staging.unstage(request.volume_id, request.staging_target_path)
        return csi_pb2.NodeUnstageVolumeResponse()

    @rpc_method
    async def NodePublishVolume(
        self, request: csi_pb2.NodePublishVolumeRequest, context: Ctx
    ) -> csi_pb2.NodePublishVolumeResponse:
        validation.check_volume_id(request.volume_id)
        validation.check_path(request.target_path, "target_path")
        access_type = validation.check_single_capability(
            request.volume_capability, "volume_capability"
        )
        if not request.staging_target_path:
            # Spec: STAGE_UNSTAGE is advertised, so a missing staging path is a precondition.
            raise FailedPreconditionError("staging_target_path is required (STAGE_UNSTAGE)")
        validation.check_path(request.staging_target_path, "staging_target_path")
        flags = _mount_flags(request.volume_capability)
        readonly = request.readonly or (
            request.volume_capability.access_mode.mode == AccessMode.SINGLE_NODE_READER_ONLY
        )
        with self._locks.hold(request.volume_id):
            await self._staging.publish(
                request.volume_id,
                request.staging_target_path,
                request.target_path,
                access_type,
                readonly,
                flags,
                single_writer=request.volume_capability.access_mode.mode
                == AccessMode.SINGLE_NODE_SINGLE_WRITER,
            )
        return csi_pb2.NodePublishVolumeResponse()

    @rpc_method
    async def NodeUnpublishVolume(
        self, request: csi_pb2.NodeUnpublishVolumeRequest, context: Ctx
    ) -> csi_pb2.NodeUnpublishVolumeResponse:
        validation.check_volume_id(request.volume_id)
        validation.check_path(request.target_path, "target_path")
        with self._locks.hold(request.volume_id):
            await self._staging.unpublish(request.volume_id, request.target_path)
        return csi_pb2.NodeUnpublishVolumeResponse()

    @rpc_method
    async def NodeGetVolumeStats(
        self, request: csi_pb2.NodeGetVolumeStatsRequest, context: Ctx
    ) -> csi_pb2.NodeGetVolumeStatsResponse:
        validation.check_volume_id(request.volume_id)
        validation.check_path(request.volume_path, "volume_path")
        stats = await self._staging.stats(request.volume_id, request.volume_path)
        Usage = csi_pb2.VolumeUsage
        usage = [Usage(unit=Usage.BYTES, total=stats.total_bytes)]
        if not stats.is_block:
            usage = [
                Usage(unit=Usage.BYTES, total=stats.total_bytes, used=stats.used_bytes,
                      available=stats.available_bytes),
                Usage(unit=Usage.INODES, total=stats.total_inodes, used=stats.used_inodes,
                      available=stats.available_inodes),
            ]
        return csi_pb2.NodeGetVolumeStatsResponse(
            usage=usage,
            volume_condition=csi_pb2.VolumeCondition(
                abnormal=stats.abnormal, message=stats.message
            ),
        )

    @rpc_method
    async def NodeExpandVolume(
        self, request: csi_pb2.NodeExpandVolumeRequest, context: Ctx
    ) -> csi_pb2.NodeExpandVolumeResponse:
        validation.check_volume_id(request.volume_id)
        validation.check_path(request.volume_path, "volume_path")
        if request.staging_target_path:
            validation.check_path(request.staging_target_path, "staging_target_path")
        if request.HasField("volume_capability"):
            validation.check_single_capability(request.volume_capability, "volume_capability")
        limit = request.capacity_range.limit_bytes
        with self._locks.hold(request.volume_id):
            size = await self._staging.expand(request.volume_id, request.volume_path, limit)
        return csi_pb2.NodeExpandVolumeResponse(capacity_bytes=size)

    @rpc_method
    async def NodeGetCapabilities(
        self, request: csi_pb2.NodeGetCapabilitiesRequest, context: Ctx
    ) -> csi_pb2.NodeGetCapabilitiesResponse:
        return csi_pb2.NodeGetCapabilitiesResponse(capabilities=node_capabilities())

    @rpc_method
    async def NodeGetInfo(
        self, request: csi_pb2.NodeGetInfoRequest, context: Ctx
    ) -> csi_pb2.NodeGetInfoResponse:
        return csi_pb2.NodeGetInfoResponse(
            node_id=self._node_id,
            max_volumes_per_node=self._max_volumes,
            accessible_topology=csi_pb2.Topology(segments={TOPOLOGY_KEY: self._node_id}),
        )
