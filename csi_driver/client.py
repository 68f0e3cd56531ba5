"""A small synchronous CSI client over a plugin's unix socket (demo, tests, benchmarks)."""

from __future__ import annotations

from types import TracebackType

import grpc

from csi_driver._gen import csi_pb2, csi_pb2_grpc

Mode = csi_pb2.VolumeCapability.AccessMode
ModeValue = csi_pb2.VolumeCapability.AccessMode.Mode


def mount_capability(
    fs_type: str = "ext4", mode: ModeValue = Mode.SINGLE_NODE_WRITER, flags: tuple[str, ...] = ()
) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type, mount_flags=list(flags)),
        access_mode=Mode(mode=mode),
    )


def block_capability(mode: ModeValue = Mode.SINGLE_NODE_WRITER) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        block=csi_pb2.VolumeCapability.BlockVolume(), access_mode=Mode(mode=mode)
    )


class CsiClient:
    """Identity, Controller and Node stubs on one channel (a plugin serves some of them)."""

    def __init__(self, endpoint: str, timeout_s: float = 60.0) -> None:
        self.channel = grpc.insecure_channel(endpoint)
        self.timeout_s = timeout_s
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.controller = csi_pb2_grpc.ControllerStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> CsiClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
