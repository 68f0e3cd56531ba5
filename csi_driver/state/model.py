"""State records: the typed, immutable shapes stored in etcd and their JSON codec.

Every record is a frozen dataclass with ``to_json()`` / ``from_json()``. Decoding
is strict (unknown or missing fields, wrong types, bad enum values and unknown
schema versions all raise ValueError) because a record that half-parses is
worse than one that fails loudly: these records drive fencing decisions.
docs/state-schema.md describes the keys and fields.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, Self, TypeVar

SCHEMA_VERSION = 1

Pairs = tuple[tuple[str, str], ...]

T = TypeVar("T")


class ReplicaState(enum.Enum):
    """Lifecycle of one replica of a volume on one node."""

    CREATING = "creating"
    READY = "ready"
    REBUILDING = "rebuilding"
    DELETING = "deleting"


class VolumePhase(enum.Enum):
    """Lifecycle of a volume as a whole."""

    CREATING = "creating"
    READY = "ready"
    DELETING = "deleting"


ACCESS_TYPES = ("mount", "block")


def pairs(mapping: Mapping[str, str]) -> Pairs:
    """A mapping as the sorted tuple of pairs that records store (hashable, canonical)."""
    return tuple(sorted(mapping.items()))


# -- strict JSON field readers ------------------------------------------------------------


def _load_object(data: bytes, fields: set[str], kind: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{kind}: not valid JSON: {exc}") from exc
    return _check_object(obj, fields, kind)


def _check_object(obj: object, fields: set[str], kind: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ValueError(f"{kind}: expected a JSON object, got {type(obj).__name__}")
    missing = fields - obj.keys()
    unknown = obj.keys() - fields
    if missing or unknown:
        raise ValueError(f"{kind}: missing fields {sorted(missing)}, unknown {sorted(unknown)}")
    version = obj.get("version")
    if "version" in fields and (type(version) is not int or version != SCHEMA_VERSION):
        raise ValueError(f"{kind}: unsupported schema version {version!r}")
    return obj


def _str(obj: dict[str, Any], key: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise ValueError(f"field {key!r}: expected string, got {type(value).__name__}")
    return value


def _int(obj: dict[str, Any], key: str) -> int:
    value = obj[key]
    # bool is an int subclass in Python; JSON true must not pass as 1.
    if type(value) is not int:
        raise ValueError(f"field {key!r}: expected integer, got {type(value).__name__}")
    return value


def _float(obj: dict[str, Any], key: str) -> float:
    value = obj[key]
    if type(value) not in (int, float):
        raise ValueError(f"field {key!r}: expected number, got {type(value).__name__}")
    return float(value)


def _opt_str(obj: dict[str, Any], key: str) -> str | None:
    return None if obj[key] is None else _str(obj, key)


def _str_list(obj: dict[str, Any], key: str) -> tuple[str, ...]:
    value = obj[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"field {key!r}: expected a list of strings")
    return tuple(value)


def _str_map(obj: dict[str, Any], key: str) -> Pairs:
    value = obj[key]
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError(f"field {key!r}: expected an object of strings")
    return pairs(value)


def _enum(cls: type[enum.Enum], obj: dict[str, Any], key: str) -> Any:
    raw = _str(obj, key)
    try:
        return cls(raw)
    except ValueError:
        raise ValueError(f"field {key!r}: {raw!r} is not a valid {cls.__name__}") from None


def _dumps(obj: dict[str, Any]) -> bytes:
    # Sorted keys and no whitespace: identical records encode to identical bytes.
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _check_pairs(value: object, field: str) -> Pairs:
    # Untyped callers may hand in a dict: accept it, but nothing else that is not
    # a collection of (str, str) pairs.
    items = list(value.items()) if isinstance(value, Mapping) else list(value)  # type: ignore[call-overload]
    if not all(
        isinstance(p, tuple | list) and len(p) == 2 and all(isinstance(x, str) for x in p)
        for p in items
    ):
        raise ValueError(f"{field}: expected (str, str) pairs")
    canonical = tuple(sorted((k, v) for k, v in items))
    keys = [k for k, _ in canonical]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{field}: duplicate keys")
    return canonical


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


# -- records ------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeRecord:
    """A live tandem node: written by the node's agent, attached to its lease."""

    node_id: str
    agent_address: str
    replica_address: str
    pool_kind: str
    total_bytes: int
    free_bytes: int
    topology: Pairs
    max_volumes: int
    version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        _require(bool(self.node_id) and "/" not in self.node_id, f"bad node_id {self.node_id!r}")
        _require(self.total_bytes >= 0 and self.free_bytes >= 0, "byte counts must be >= 0")
        _require(self.max_volumes >= 0, "max_volumes must be >= 0")
        # Canonical order, so equal topologies compare and hash equal.
        object.__setattr__(self, "topology", _check_pairs(self.topology, "topology"))

    def topology_dict(self) -> dict[str, str]:
        return dict(self.topology)

    def to_json(self) -> bytes:
        obj = dataclasses.asdict(self)
        obj["topology"] = dict(self.topology)
        return _dumps(obj)

    @classmethod
    def from_json(cls, data: bytes) -> Self:
        obj = _load_object(data, {f.name for f in dataclasses.fields(cls)}, "NodeRecord")
        return cls(
            node_id=_str(obj, "node_id"),
            agent_address=_str(obj, "agent_address"),
            replica_address=_str(obj, "replica_address"),
            pool_kind=_str(obj, "pool_kind"),
            total_bytes=_int(obj, "total_bytes"),
            free_bytes=_int(obj, "free_bytes"),
            topology=_str_map(obj, "topology"),
            max_volumes=_int(obj, "max_volumes"),
            version=_int(obj, "version"),
        )


@dataclass(frozen=True)
class ReplicaRef:
    """One replica of a volume: the node that holds it and its state there."""

    node_id: str
    state: ReplicaState

    def to_obj(self) -> dict[str, str]:
        return {"node_id": self.node_id, "state": self.state.value}

    @classmethod
    def from_obj(cls, obj: object) -> Self:
        checked = _check_object(obj, {"node_id", "state"}, "ReplicaRef")
        return cls(_str(checked, "node_id"), _enum(ReplicaState, checked, "state"))


@dataclass(frozen=True)
class VolumeRecord:
    """A volume: placement, in-sync set, fencing epoch and owner, lifecycle phase.

    ``isr`` (in-sync replicas) names the replica nodes whose data is current;
    only they may be promoted. ``epoch`` increases on every ownership change and
    fences stale writers; ``owner`` is the node currently serving the volume.
    """

    volume_id: str
    name: str
    size_bytes: int
    replicas: tuple[ReplicaRef, ...]
    isr: tuple[str, ...]
    epoch: int
    owner: str | None
    phase: VolumePhase
    fs_type: str
    access_type: str
    parameters: Pairs
    created_at: float
    version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        _require(bool(self.volume_id) and "/" not in self.volume_id,
                 f"bad volume_id {self.volume_id!r}")
        _require(bool(self.name), "name must not be empty")
        _require(self.size_bytes >= 0, "size_bytes must be >= 0")
        _require(self.epoch >= 0, "epoch must be >= 0")
        _require(self.access_type in ACCESS_TYPES, f"bad access_type {self.access_type!r}")
        nodes = [r.node_id for r in self.replicas]
        _require(len(set(nodes)) == len(nodes), f"duplicate replica nodes {nodes}")
        _require(len(set(self.isr)) == len(self.isr), f"duplicate isr nodes {self.isr}")
        object.__setattr__(self, "replicas", tuple(self.replicas))
        object.__setattr__(self, "isr", tuple(self.isr))
        object.__setattr__(self, "parameters", _check_pairs(self.parameters, "parameters"))

    def replica_nodes(self) -> tuple[str, ...]:
        """Node ids holding a replica, in placement order."""
        return tuple(r.node_id for r in self.replicas)

    def invariant_problem(self) -> str | None:
        """Why this record must not be written (I1b), or None.

        Checked on every write rather than on decode: a record written by an older release
        that breaks a rule must still load, so that it can be repaired.
        """
        stray = [n for n in self.isr if n not in self.replica_nodes()]
        if stray:
            return f"isr {list(self.isr)} names non-replicas {stray}"
        if self.phase is VolumePhase.READY and self.replicas and not self.isr:
            # A ready volume may hold data: with no in-sync member nothing could serve it.
            return "a ready volume's isr must not be empty"
        return None

    def with_(self, **changes: Any) -> VolumeRecord:
        """A copy with ``changes`` applied (validated like a fresh record)."""
        return dataclasses.replace(self, **changes)

    def to_json(self) -> bytes:
        return _dumps({
            "volume_id": self.volume_id,
            "name": self.name,
            "size_bytes": self.size_bytes,
            "replicas": [r.to_obj() for r in self.replicas],
            "isr": list(self.isr),
            "epoch": self.epoch,
            "owner": self.owner,
            "phase": self.phase.value,
            "fs_type": self.fs_type,
            "access_type": self.access_type,
            "parameters": dict(self.parameters),
            "created_at": self.created_at,
            "version": self.version,
        })

    @classmethod
    def from_json(cls, data: bytes) -> Self:
        obj = _load_object(data, {f.name for f in dataclasses.fields(cls)}, "VolumeRecord")
        raw_replicas = obj["replicas"]
        if not isinstance(raw_replicas, list):
            raise ValueError("field 'replicas': expected a list")
        return cls(
            volume_id=_str(obj, "volume_id"),
            name=_str(obj, "name"),
            size_bytes=_int(obj, "size_bytes"),
            replicas=tuple(ReplicaRef.from_obj(r) for r in raw_replicas),
            isr=_str_list(obj, "isr"),
            epoch=_int(obj, "epoch"),
            owner=_opt_str(obj, "owner"),
            phase=_enum(VolumePhase, obj, "phase"),
            fs_type=_str(obj, "fs_type"),
            access_type=_str(obj, "access_type"),
            parameters=_str_map(obj, "parameters"),
            created_at=_float(obj, "created_at"),
            version=_int(obj, "version"),
        )


def min_in_sync_of(record: VolumeRecord) -> int:
    """The volume's ``minInSync`` StorageClass parameter (default 1), validated again here
    because the record is what the data plane trusts: ValueError if it makes no sense."""
    raw = dict(record.parameters).get("minInSync", "1")
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= max(len(record.replicas), 1):
        raise ValueError(f"volume {record.volume_id}: bad minInSync {raw!r} for "
                         f"{len(record.replicas)} replicas")
    return int(raw)


def transition_problem(old: VolumeRecord, new: VolumeRecord) -> str | None:
    """Why replacing ``old`` by ``new`` must not be written, or None (checked by stores)."""
    if new.epoch < old.epoch:
        return f"epoch would go back from {old.epoch} to {new.epoch}"
    return new.invariant_problem()


@dataclass(frozen=True)
class Versioned(Generic[T]):
    """A record as read from the store, with the etcd revisions that CAS updates need."""

    value: T
    mod_revision: int
    create_revision: int
    lease: int


@dataclass(frozen=True)
class OwnerClaim:
    """``owners/<volume>``: which node's target serves the volume at which epoch."""

    node_id: str
    epoch: int

    def to_json(self) -> bytes:
        return _dumps({"node_id": self.node_id, "epoch": self.epoch})

    @classmethod
    def from_json(cls, data: bytes) -> OwnerClaim:
        obj = _load_object(data, {"node_id", "epoch"}, "owner claim")
        return cls(node_id=_str(obj, "node_id"), epoch=_int(obj, "epoch"))
