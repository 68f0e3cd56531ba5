"""Request validation rules, from tables."""

from __future__ import annotations

import pytest

from csi_driver import validation as v
from csi_driver._gen import csi_pb2
from csi_driver.errors import InvalidArgumentError, OutOfRangeError

Mode = csi_pb2.VolumeCapability.AccessMode
MIB = 1 << 20


def mount_cap(mode: Mode.Mode = Mode.SINGLE_NODE_WRITER,
              fs: str = "") -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs),
        access_mode=Mode(mode=mode),
    )


def block_cap(mode: Mode.Mode = Mode.SINGLE_NODE_WRITER) -> csi_pb2.VolumeCapability:
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
    assert v.parse_parameters({}, 3) == v.VolumeParameters(3, "ext4", 1)
    params = {"replicas": "2", "fsType": "xfs", "csi.storage.k8s.io/pvc/name": "x"}
    assert v.parse_parameters(params, 3) == v.VolumeParameters(2, "xfs", 1)


@pytest.mark.parametrize(
    ("params", "default_replicas", "expected"),
    [
        ({"minInSync": "2", "replicas": "3"}, 1, 2),  # the bound is replicas, in any key order
        ({"replicas": "3", "minInSync": "3"}, 1, 3),
        ({"minInSync": "2"}, 3, 2),  # bounded by the default replicas
        ({"minInSync": "1", "replicas": "1"}, 3, 1),
        ({"replicas": "2"}, 3, 1),  # default
    ],
)
def test_min_in_sync(params: dict[str, str], default_replicas: int, expected: int) -> None:
    assert v.parse_parameters(params, default_replicas).min_in_sync == expected


@pytest.mark.parametrize(("value", "expected"), [(None, "replicas"), ("replicas", "replicas"),
                                               ("any", "any")])
def test_accessibility(value: str | None, expected: str) -> None:
    params = {} if value is None else {"accessibility": value}
    assert v.parse_parameters(params, 3).accessibility == expected


@pytest.mark.parametrize(
    "params",
    [
        {"replicas": "0"}, {"replicas": "x"}, {"replicas": "9"}, {"fsType": "ntfs"},
        {"color": "red"},
        # Non-ASCII digits: str.isdigit() and int() take them ("٣" is ARABIC-INDIC THREE).
        {"replicas": "\u0663"}, {"replicas": "\uff13"}, {"replicas": "\u00b3"},
        {"replicas": " 3"}, {"replicas": "3\n"}, {"replicas": "+3"}, {"replicas": "-1"},
        {"replicas": "3.0"}, {"replicas": ""}, {"replicas": "1" * 5000},
        {"minInSync": "0", "replicas": "3"}, {"minInSync": "4", "replicas": "3"},
        {"minInSync": "2", "replicas": "1"}, {"minInSync": "\u0662", "replicas": "3"},
        {"minInSync": "x", "replicas": "3"}, {"minInSync": "", "replicas": "3"},
        {"minInSync": "4"},  # above the default replicas (3)
        {"x" * 2_000_000: "1"}, {"csi.storage.k8s.io/pvc/name": "x" * 5000},
        {"accessibility": "Any"}, {"accessibility": ""}, {"accessibility": "nodes"},
    ],
    ids=lambda p: repr(p)[:40],
)
def test_bad_parameters(params: dict[str, str]) -> None:
    with pytest.raises(InvalidArgumentError) as failure:
        v.parse_parameters(params, 3)
    assert len(str(failure.value)) < 300, "a status message must stay small"


@pytest.mark.parametrize(
    "volume_id",
    ["", "../x", "a/b", "x" * 200, "-a", "vol-a\n", "vol\0a", "vol-\u0663", "x" * (2 << 20)],
    ids=lambda i: repr(i)[:20],
)
def test_bad_volume_ids(volume_id: str) -> None:
    with pytest.raises(InvalidArgumentError) as failure:
        v.check_volume_id(volume_id)
    assert len(str(failure.value)) < 300, "a status message must stay small"


@pytest.mark.parametrize("name", ["pvc-1b2c", "x" * 128, "nämé mit Leerzeichen\t", "\u00e9" * 64])
def test_good_volume_names(name: str) -> None:
    v.check_volume_name(name)


@pytest.mark.parametrize(
    "name", ["", "x" * 129, "\u00e9" * 65, "a\0b", "a\x07b", "a\x7fb", "a\x85b", "x" * (2 << 20)],
    ids=lambda n: repr(n)[:20],
)
def test_bad_volume_names(name: str) -> None:
    with pytest.raises(InvalidArgumentError) as failure:
        v.check_volume_name(name)
    assert len(str(failure.value)) < 300


@pytest.mark.parametrize(
    "path",
    ["/var/lib/kubelet/pods/x/mount", "/", "/" + "a" * 255, "/a/" * 1000 + "b",
     "/" + "/".join(["d" * 200] * 20)],
    ids=lambda p: repr(p)[:30],
)
def test_good_paths(path: str) -> None:
    v.check_path(path, "target_path")


@pytest.mark.parametrize(
    "path",
    [
        "", "relative/staging", "./staging", "staging", "~/x",
        "/a\0b", "\0", "/a/b\0",
        "/" + "a" * 5000, "/a" * 2500, "/" + "a" * 4095,  # 4096 bytes: no room for the NUL
        "/" + "a" * 256, "/ok/" + "\u00e9" * 128,  # a component above NAME_MAX (bytes)
    ],
    ids=lambda p: repr(p)[:30],
)
def test_bad_paths(path: str) -> None:
    with pytest.raises(InvalidArgumentError) as failure:
        v.check_path(path, "staging_target_path")
    assert "staging_target_path" in str(failure.value)
    assert len(str(failure.value)) < 300


@pytest.mark.parametrize("flags", [["ro\0"], ["x" * 4097], ["a" * 3000, "b" * 2000]])
def test_bad_mount_flags(flags: list[str]) -> None:
    with pytest.raises(InvalidArgumentError):
        v.check_mount_flags(flags)


def test_mount_flags() -> None:
    v.check_mount_flags(["noatime", "discard"])
    v.check_mount_flags([])
