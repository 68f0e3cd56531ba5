"""Request validation rules, from tables."""

from __future__ import annotations

import pytest

from csi_driver import validation as v
from csi_driver._gen import csi_pb2
from csi_driver.errors import InvalidArgumentError, OutOfRangeError

Mode = csi_pb2.VolumeCapability.AccessMode
MIB = 1 << 20


def mount_cap(mode: int = Mode.SINGLE_NODE_WRITER, fs: str = "") -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs),
        access_mode=Mode(mode=mode),
    )


def block_cap(mode: int = Mode.SINGLE_NODE_WRITER) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        block=csi_pb2.VolumeCapability.BlockVolume(), access_mode=Mode(mode=mode)
    )


@pytest.mark.parametrize(
    ("required", "limit", "expected"),
    [
        (0, 0, v.DEFAULT_SIZE),
        (1, 0, MIB),
        (MIB, 0, MIB),
        (MIB + 1, 0, 2 * MIB),
        (0, 10 * MIB + 5, 10 * MIB),
        (5 * MIB, 5 * MIB, 5 * MIB),
    ],
)
def test_size_from_range(required: int, limit: int, expected: int) -> None:
    rng = csi_pb2.CapacityRange(required_bytes=required, limit_bytes=limit)
    assert v.size_from_range(rng) == expected


@pytest.mark.parametrize(
    ("required", "limit"), [(10, 5), (MIB + 1, MIB + 100), (-1, 0), (0, -1), (0, 100)]
)
def test_size_out_of_range(required: int, limit: int) -> None:
    with pytest.raises(OutOfRangeError):
        v.size_from_range(csi_pb2.CapacityRange(required_bytes=required, limit_bytes=limit))


def test_no_range_gives_default() -> None:
    assert v.size_from_range(None) == v.DEFAULT_SIZE


def test_capabilities_mount_and_block() -> None:
    assert v.check_capabilities([mount_cap(fs="xfs")]) == ("mount", "xfs")
    assert v.check_capabilities([block_cap()]) == ("block", "")
    assert v.check_capabilities([mount_cap(), mount_cap(Mode.SINGLE_NODE_READER_ONLY)]) == (
        "mount",
        "",
    )


@pytest.mark.parametrize(
    "caps",
    [
        [],
        [csi_pb2.VolumeCapability(access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER))],
        [csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume())],
        [mount_cap(Mode.MULTI_NODE_MULTI_WRITER)],
        [mount_cap(Mode.UNKNOWN)],
        [mount_cap(fs="vfat")],
        [mount_cap(), block_cap()],
        [mount_cap(fs="ext4"), mount_cap(fs="xfs")],
    ],
)
def test_unsupported_capabilities(caps: list[csi_pb2.VolumeCapability]) -> None:
    with pytest.raises(InvalidArgumentError):
        v.check_capabilities(caps)


def test_parameters() -> None:
    assert v.parse_parameters({}, 3) == v.VolumeParameters(3, "ext4")
    params = {"replicas": "2", "fsType": "xfs", "csi.storage.k8s.io/pvc/name": "x"}
    assert v.parse_parameters(params, 3) == v.VolumeParameters(2, "xfs")


@pytest.mark.parametrize(
    "params",
    [{"replicas": "0"}, {"replicas": "x"}, {"replicas": "9"}, {"fsType": "ntfs"}, {"color": "red"}],
)
def test_bad_parameters(params: dict[str, str]) -> None:
    with pytest.raises(InvalidArgumentError):
        v.parse_parameters(params, 3)


@pytest.mark.parametrize("volume_id", ["", "../x", "a/b", "x" * 200, "-a"])
def test_bad_volume_ids(volume_id: str) -> None:
    with pytest.raises(InvalidArgumentError):
        v.check_volume_id(volume_id)
