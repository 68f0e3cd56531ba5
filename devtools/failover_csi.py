"""CSI calls as a container orchestrator makes them around a failover (benchmark, tests).

Raw-block CreateVolume (optionally placed on given nodes), NodeStage/Publish and their
reverse, NodeStageVolume retried until a takeover succeeds (``take_over``), DeleteVolume
retried like a CO retries it. Synchronous, over ``CsiClient``; every loop has a deadline or
an attempt limit. Must not: inject faults or judge data.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from csi_driver._gen import csi_pb2
from csi_driver.client import CsiClient, block_capability
from csi_driver.config import TOPOLOGY_KEY
from devtools.failover_io import VOLUME_BYTES

TAKEOVER_TIMEOUT_S = 90.0
RETRY_PAUSE_S = 0.05
# Retried as a CO would: owner's claim still held (RWO), ownership moving, not ready yet.
RETRYABLE = frozenset({
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED,
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
})


def create_block_volume(
    ctl: CsiClient, name: str, *, size: int = VOLUME_BYTES, replicas: int = 3,
    nodes: Sequence[str] = (),
) -> tuple[str, list[str]]:
    """CreateVolume (raw block) -> (id, replica nodes). ``nodes``: place on these first
    (requisite binds only the first replica, preferred orders the rest)."""
    request = csi_pb2.CreateVolumeRequest(
        name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=size),
        volume_capabilities=[block_capability()], parameters={"replicas": str(replicas)},
    )
    if nodes:
        wanted = [csi_pb2.Topology(segments={TOPOLOGY_KEY: n}) for n in nodes]
        request.accessibility_requirements.CopyFrom(
            csi_pb2.TopologyRequirement(requisite=wanted, preferred=wanted))
    volume = ctl.controller.CreateVolume(request, timeout=120).volume
    return volume.volume_id, [t.segments[TOPOLOGY_KEY] for t in volume.accessible_topology]


def stage(node: CsiClient, volume_id: str, staging: Path, timeout_s: float = 120) -> None:
    node.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id=volume_id, staging_target_path=str(staging),
        volume_capability=block_capability()), timeout=timeout_s)


def publish(node: CsiClient, volume_id: str, staging: Path, target: Path) -> None:
    node.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=volume_id, staging_target_path=str(staging), target_path=str(target),
        volume_capability=block_capability()), timeout=60)


def unpublish_unstage(node: CsiClient, volume_id: str, staging: Path, target: Path) -> None:
    node.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=volume_id, target_path=str(target)), timeout=60)
    node.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id=volume_id, staging_target_path=str(staging)), timeout=60)


def delete_volume(ctl: CsiClient, volume_id: str, attempts: int = 10) -> list[str]:
    """DeleteVolume, retried as a CO retries it; returns the refusals seen before success."""
    refusals: list[str] = []
    for attempt in range(attempts):
        try:
            ctl.controller.DeleteVolume(
                csi_pb2.DeleteVolumeRequest(volume_id=volume_id), timeout=60)
            return refusals
        except grpc.RpcError as exc:
            refusals.append(f"{exc.code().name}: {exc.details()}")
            if exc.code() not in RETRYABLE or attempt == attempts - 1:
                raise
            time.sleep(0.5)
    return refusals


@dataclass
class Takeover:
    staged_at: float  # monotonic time NodeStageVolume succeeded on the new node
    attempts: int
    answers: list[str] = field(default_factory=list)  # each distinct refusal, in order


def take_over(
    node: CsiClient, volume_id: str, staging: Path, timeout_s: float = TAKEOVER_TIMEOUT_S,
) -> Takeover:
    """Retry NodeStageVolume as a CO would, until it succeeds (or the deadline)."""
    deadline = time.monotonic() + timeout_s
    answers: list[str] = []
    attempt = 0
    while time.monotonic() < deadline:
        attempt += 1
        try:
            stage(node, volume_id, staging, timeout_s=max(1.0, deadline - time.monotonic()))
        except grpc.RpcError as exc:
            answer = f"{exc.code().name}: {exc.details()}"
            if not answers or answers[-1] != answer:
                answers.append(answer)
            if exc.code() not in RETRYABLE:
                raise
            time.sleep(RETRY_PAUSE_S)
            continue
        return Takeover(time.monotonic(), attempt, answers)
    raise TimeoutError(
        f"volume {volume_id} not staged within {timeout_s:.0f} s; answers: {answers[-3:]}")


def describe(exc: BaseException) -> str:
    """One line for an error (gRPC errors: code and details, not the debug string)."""
    if isinstance(exc, grpc.RpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"
