"""Pure request validation: capabilities, capacity ranges, StorageClass parameters.

Everything here works on protobuf messages or plain values and raises domain errors; no
I/O, so every rule is unit-tested from tables.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from csi_driver._gen import csi_pb2
from csi_driver.errors import InvalidArgumentError, OutOfRangeError

AccessMode = csi_pb2.VolumeCapability.AccessMode

MIB = 1 << 20
GIB = 1 << 30
DEFAULT_SIZE = 1 * GIB
# Replica sizes are whole MiB: every pool backend (file, LVM extents of 1 MiB or more, and the
# replication protocol's block maps) can honour that exactly.
SIZE_ALIGNMENT = MIB
MAX_REPLICAS = 5

SUPPORTED_FS_TYPES = ("ext4", "xfs")
SUPPORTED_ACCESS_MODES = frozenset(
    {
        AccessMode.SINGLE_NODE_WRITER,
        AccessMode.SINGLE_NODE_READER_ONLY,
        AccessMode.SINGLE_NODE_SINGLE_WRITER,
        AccessMode.SINGLE_NODE_MULTI_WRITER,
    }
)
# Kubernetes sidecars add these to every CreateVolume; they are metadata, not options.
_K8S_PARAMETER_PREFIX = "csi.storage.k8s.io/"
_VOLUME_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class VolumeParameters:
    replicas: int
    fs_type: str


def require(value: object, field: str) -> None:
    if not value:
        raise InvalidArgumentError(f"{field} is required")


def check_volume_id(volume_id: str) -> None:
    require(volume_id, "volume_id")
    if not _VOLUME_ID_RE.match(volume_id):
        raise InvalidArgumentError(f"malformed volume_id {volume_id!r}")


def capability_problem(cap: csi_pb2.VolumeCapability) -> str | None:
    """Why ``cap`` is unsupported, or None when tandem supports it."""
    kind = cap.WhichOneof("access_type")
    if kind is None:
        return "volume capability has neither mount nor block access type"
    if not cap.HasField("access_mode"):
        return "volume capability has no access mode"
    if cap.access_mode.mode not in SUPPORTED_ACCESS_MODES:
        name = AccessMode.Mode.Name(cap.access_mode.mode)
        return f"access mode {name} is not supported (single-node modes only)"
    if kind == "mount" and cap.mount.fs_type not in ("", *SUPPORTED_FS_TYPES):
        return f"fs_type {cap.mount.fs_type!r} is not supported ({', '.join(SUPPORTED_FS_TYPES)})"
    return None


def check_capabilities(caps: Iterable[csi_pb2.VolumeCapability]) -> tuple[str, str]:
    """Validate all capabilities; return (access type, fs type) of the volume."""
    caps = list(caps)
    require(caps, "volume_capabilities")
    kinds: set[str] = set()
    fs_types: set[str] = set()
    for cap in caps:
        problem = capability_problem(cap)
        if problem:
            raise InvalidArgumentError(problem)
        kind = cap.WhichOneof("access_type")
        assert kind is not None
        kinds.add(kind)
        if kind == "mount" and cap.mount.fs_type:
            fs_types.add(cap.mount.fs_type)
    if len(kinds) > 1:
        raise InvalidArgumentError("a volume is either block or mount, not both")
    if len(fs_types) > 1:
        raise InvalidArgumentError(f"conflicting fs types {sorted(fs_types)}")
    return kinds.pop(), (fs_types.pop() if fs_types else "")


def check_single_capability(cap: csi_pb2.VolumeCapability, field: str) -> str:
    """Node RPCs carry one capability; return its access type."""
    if not cap.ByteSize():
        raise InvalidArgumentError(f"{field} is required")
    problem = capability_problem(cap)
    if problem:
        raise InvalidArgumentError(problem)
    return str(cap.WhichOneof("access_type"))


# mkfs.xfs refuses filesystems below 300 MB; a volume it cannot format is useless.
XFS_MIN_SIZE = 300 * MIB


def min_size(access_type: str, fs_type: str) -> int:
    return XFS_MIN_SIZE if access_type == "mount" and fs_type == "xfs" else 0


def size_from_range(capacity_range: csi_pb2.CapacityRange | None, minimum: int = 0) -> int:
    """The size to provision: required rounded up to the alignment, within the limit."""
    required = capacity_range.required_bytes if capacity_range else 0
    limit = capacity_range.limit_bytes if capacity_range else 0
    if required < 0 or limit < 0:
        raise OutOfRangeError("capacity_range bytes must not be negative")
    if limit and required > limit:
        raise OutOfRangeError(f"required_bytes {required} exceeds limit_bytes {limit}")
    if required == 0:
        size = min(DEFAULT_SIZE, limit) if limit else DEFAULT_SIZE
        size -= size % SIZE_ALIGNMENT
    else:
        size = -(-required // SIZE_ALIGNMENT) * SIZE_ALIGNMENT
    if size < minimum:
        size = minimum
    if size == 0 or (limit and size > limit):
        raise OutOfRangeError(
            f"cannot provision a whole number of MiB within [{required}, {limit or 'inf'}]"
        )
    return size


def parse_parameters(params: Mapping[str, str], default_replicas: int) -> VolumeParameters:
    replicas = default_replicas
    fs_type = "ext4"
    for key, value in params.items():
        if key.startswith(_K8S_PARAMETER_PREFIX) and key != "csi.storage.k8s.io/fstype":
            continue
        if key == "replicas":
            if not value.isdigit() or not 1 <= int(value) <= MAX_REPLICAS:
                raise InvalidArgumentError(
                    f"parameter replicas must be an integer 1..{MAX_REPLICAS}, got {value!r}"
                )
            replicas = int(value)
        elif key in ("fsType", "csi.storage.k8s.io/fstype"):
            if value not in SUPPORTED_FS_TYPES:
                raise InvalidArgumentError(f"parameter fsType {value!r} is not supported")
            fs_type = value
        else:
            raise InvalidArgumentError(f"unknown parameter {key!r} (known: replicas, fsType)")
    return VolumeParameters(replicas=replicas, fs_type=fs_type)


def topologies(items: Iterable[csi_pb2.Topology]) -> list[dict[str, str]]:
    return [dict(t.segments) for t in items]
