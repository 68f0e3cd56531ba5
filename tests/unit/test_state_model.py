"""State record codec: JSON round-trips exactly and rejects anything malformed."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from csi_driver.state.model import (
    NodeRecord,
    ReplicaRef,
    ReplicaState,
    VolumePhase,
    VolumeRecord,
    pairs,
)

NODE = NodeRecord(
    node_id="n1", agent_address="10.0.0.1:7001", replica_address="10.0.0.1:7002",
    pool_kind="file", total_bytes=100, free_bytes=40,
    topology=pairs({"zone": "a", "topology.tandem.io/node": "n1"}), max_volumes=8,
)
VOLUME = VolumeRecord(
    volume_id="vol-1", name="pvc-1", size_bytes=1 << 30,
    replicas=(ReplicaRef("n1", ReplicaState.READY), ReplicaRef("n2", ReplicaState.REBUILDING)),
    isr=("n1",), epoch=3, owner="n1", phase=VolumePhase.READY, fs_type="xfs",
    access_type="block", parameters=pairs({"replicas": "2"}), created_at=1700000000.25,
)


def test_round_trip_and_canonical_encoding() -> None:
    assert NodeRecord.from_json(NODE.to_json()) == NODE
    assert VolumeRecord.from_json(VOLUME.to_json()) == VOLUME
    assert VOLUME.replica_nodes() == ("n1", "n2")
    # Topology order does not matter: records are canonical and hashable.
    shuffled = NodeRecord(**{**NODE.__dict__, "topology": tuple(reversed(NODE.topology))})
    assert shuffled == NODE and hash(shuffled) == hash(NODE)
    assert shuffled.to_json() == NODE.to_json()
    assert VOLUME.with_(owner=None).owner is None
    assert VolumeRecord.from_json(VOLUME.with_(owner=None).to_json()).owner is None


def _mutated(record: Any, **changes: Any) -> bytes:
    obj = json.loads(record.to_json())
    for key, value in changes.items():
        if value is KeyError:
            del obj[key]
        else:
            obj[key] = value
    return json.dumps(obj).encode()


@pytest.mark.parametrize("data", [
    b"", b"not json", b"[]", b"null", b"\xff\xfe",
    _mutated(VOLUME, epoch=True),            # bool is not an int
    _mutated(VOLUME, epoch="3"),
    _mutated(VOLUME, size_bytes=1.5),
    _mutated(VOLUME, name=KeyError),         # missing field
    _mutated(VOLUME, extra=1),               # unknown field
    _mutated(VOLUME, version=2),             # future schema
    _mutated(VOLUME, phase="gone"),
    _mutated(VOLUME, access_type="nfs"),
    _mutated(VOLUME, replicas=[{"node_id": "n1", "state": "lost"}]),
    _mutated(VOLUME, replicas=[{"node_id": "n1"}]),
    _mutated(VOLUME, replicas=[{"node_id": "n1", "state": "ready"}] * 2),
    _mutated(VOLUME, isr="n1"),
    _mutated(VOLUME, owner=5),
    _mutated(VOLUME, parameters={"a": 1}),
    _mutated(VOLUME, volume_id=""),
    _mutated(VOLUME, volume_id="a/b"),
])
def test_malformed_volume_is_rejected(data: bytes) -> None:
    with pytest.raises(ValueError):
        VolumeRecord.from_json(data)


@pytest.mark.parametrize("data", [
    _mutated(NODE, topology=[["zone", "a"]]),
    _mutated(NODE, free_bytes=-1),
    _mutated(NODE, max_volumes=None),
    _mutated(NODE, node_id=KeyError),
])
def test_malformed_node_is_rejected(data: bytes) -> None:
    with pytest.raises(ValueError):
        NodeRecord.from_json(data)


text = st.text(min_size=1, max_size=12).filter(lambda s: "/" not in s)


@given(
    volume_id=text, name=st.text(min_size=1), size=st.integers(0, 1 << 62),
    nodes=st.lists(text, max_size=4, unique=True), epoch=st.integers(0, 1 << 40),
    owner=st.none() | text, params=st.dictionaries(st.text(), st.text(), max_size=4),
    created=st.floats(0, 4e9), state=st.sampled_from(ReplicaState),
    phase=st.sampled_from(VolumePhase),
)
def test_any_volume_round_trips(volume_id: str, name: str, size: int, nodes: list[str],
                                epoch: int, owner: str | None, params: dict[str, str],
                                created: float, state: ReplicaState,
                                phase: VolumePhase) -> None:
    rec = VolumeRecord(
        volume_id=volume_id, name=name, size_bytes=size,
        replicas=tuple(ReplicaRef(n, state) for n in nodes), isr=tuple(nodes[:1]),
        epoch=epoch, owner=owner, phase=phase, fs_type="ext4", access_type="mount",
        parameters=pairs(params), created_at=created,
    )
    assert VolumeRecord.from_json(rec.to_json()) == rec
