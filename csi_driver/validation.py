"""Pure request validation: ids, names, paths, capabilities, capacity ranges, parameters.

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
_VOLUME_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# ASCII only: int() and str.isdigit() also take other scripts' digits ("٣" is 3).
_ASCII_INT_RE = re.compile(r"[0-9]{1,9}")
# CSI "Size Limits": a string field is at most 128 bytes, a map<string, string> 4 KiB.
MAX_STRING_BYTES = 128
MAX_MAP_BYTES = 4096
# The spec's banned characters in a CreateVolume name: control characters other than the
# common whitespace (tab, newline, carriage return).
_BANNED_NAME_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# Linux: PATH_MAX counts the terminating NUL, NAME_MAX is per component. A path beyond them
# fails in the kernel with ENAMETOOLONG, after the request was half acted on.
PATH_MAX = 4096
NAME_MAX = 255
# Error messages quote at most this much of a rejected value: a status message is sent as a
# gRPC trailer, and a huge one turns the answer into INTERNAL.
_SHOWN_CHARS = 64


# Where a volume may be staged: "replicas" (its replica nodes: local reads, direct local
# writes) or "any" node (reads and writes over the network; the pod is never stuck on nodes
# that are gone after the reconciler moved its replicas). The PV's node affinity says it.
ACCESSIBILITY = ("replicas", "any")


@dataclass(frozen=True)
class VolumeParameters:
    replicas: int
    fs_type: str
    min_in_sync: int = 1
    accessibility: str = "replicas"


def shown(value: str) -> str:
    """``value`` quoted for an error message, cut short when it is long."""
    if len(value) <= _SHOWN_CHARS:
        return repr(value)
    return f"{value[:_SHOWN_CHARS]!r}... ({len(value)} characters)"


def require(value: object, field: str) -> None:
    if not value:
        raise InvalidArgumentError(f"{field} is required")


def check_volume_id(volume_id: str) -> None:
    require(volume_id, "volume_id")
    # fullmatch, not match with "$": "$" also matches before a trailing newline.
    if not _VOLUME_ID_RE.fullmatch(volume_id):
        raise InvalidArgumentError(f"malformed volume_id {shown(volume_id)}")


def check_volume_name(name: str) -> None:
    """A CreateVolume name: any Unicode within the size limit but the spec's banned characters."""
    require(name, "name")
    if len(name.encode()) > MAX_STRING_BYTES:
        raise InvalidArgumentError(
            f"name is {len(name.encode())} bytes, above the CSI limit of {MAX_STRING_BYTES}"
        )
    if _BANNED_NAME_RE.search(name):
        raise InvalidArgumentError(f"name {shown(name)} contains a control character")


def check_path(path: str, field: str) -> None:
    """A node path from the CO: absolute (never relative to the plugin's working directory),
    no NUL, within the kernel's length limits."""
    require(path, field)
    if "\0" in path:
        raise InvalidArgumentError(f"{field} contains a NUL byte: {shown(path)}")
    if not path.startswith("/"):
        raise InvalidArgumentError(f"{field} must be an absolute path, not {shown(path)}")
    size = len(path.encode())
    if size >= PATH_MAX:
        raise InvalidArgumentError(f"{field} is {size} bytes, above PATH_MAX ({PATH_MAX - 1})")
    if any(len(part.encode()) > NAME_MAX for part in path.split("/")):
        raise InvalidArgumentError(f"{field} has a component above NAME_MAX ({NAME_MAX} bytes)")


def check_mount_flags(flags: Iterable[str]) -> None:
    flags = list(flags)
    if any("\0" in flag for flag in flags):
        raise InvalidArgumentError("mount_flags contain a NUL byte")
    if sum(len(flag.encode()) for flag in flags) > MAX_MAP_BYTES:
        raise InvalidArgumentError(f"mount_flags exceed {MAX_MAP_BYTES} bytes (CSI limit)")


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


def ascii_int(key: str, value: str, low: int, high: int) -> int:
    """A StorageClass integer parameter: ASCII digits only, within [low, high]."""
    if not _ASCII_INT_RE.fullmatch(value) or not low <= int(value) <= high:
        raise InvalidArgumentError(
            f"parameter {key} must be an integer {low}..{high}, got {shown(value)}"
        )
    return int(value)


def _check_map_size(params: Mapping[str, str]) -> None:
    size = sum(len(k.encode()) + len(v.encode()) for k, v in params.items())
    if size > MAX_MAP_BYTES:
        raise InvalidArgumentError(
            f"parameters are {size} bytes, above the CSI limit of {MAX_MAP_BYTES}"
        )


def parse_parameters(params: Mapping[str, str], default_replicas: int) -> VolumeParameters:
    _check_map_size(params)
    replicas = default_replicas
    fs_type = "ext4"
    min_in_sync: str | None = None
    accessibility = "replicas"
    for key, value in params.items():
        if key.startswith(_K8S_PARAMETER_PREFIX) and key != "csi.storage.k8s.io/fstype":
            continue
        if key == "replicas":
            replicas = ascii_int(key, value, 1, MAX_REPLICAS)
        elif key == "minInSync":
            min_in_sync = value  # its bound is replicas, which may come later in the map
        elif key == "accessibility":
            if value not in ACCESSIBILITY:
                raise InvalidArgumentError(f"parameter accessibility {shown(value)}: expected "
                                           "'replicas' (default) or 'any'")
            accessibility = value
        elif key in ("fsType", "csi.storage.k8s.io/fstype"):
            if value not in SUPPORTED_FS_TYPES:
                raise InvalidArgumentError(f"parameter fsType {shown(value)} is not supported")
            fs_type = value
        else:
            raise InvalidArgumentError(
                f"unknown parameter {shown(key)} "
                "(known: replicas, minInSync, accessibility, fsType)"
            )
    at_least = 1 if min_in_sync is None else ascii_int("minInSync", min_in_sync, 1, replicas)
    return VolumeParameters(replicas=replicas, fs_type=fs_type, min_in_sync=at_least,
                            accessibility=accessibility)


def topologies(items: Iterable[csi_pb2.Topology]) -> list[dict[str, str]]:
    return [dict(t.segments) for t in items]
