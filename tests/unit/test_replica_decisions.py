"""Never delete the last good copy (I1b): replace and sweep decisions from tables."""

from __future__ import annotations

import pytest

from csi_driver.replica_decisions import may_delete, replaceable
from csi_driver.state.model import ReplicaRef, ReplicaState, VolumePhase, VolumeRecord


def rec(replicas: str, isr: str, phase: VolumePhase = VolumePhase.READY) -> VolumeRecord:
    return VolumeRecord("vol-1", "pvc-1", 1 << 20,
                        tuple(ReplicaRef(n, ReplicaState.READY) for n in replicas.split()),
                        tuple(isr.split()), 3, None, phase, "ext4", "block", (), 0.0)


@pytest.mark.parametrize(("record", "dead", "live", "expected"), [
    (rec("a", "a"), {"a"}, {"b", "c"}, None),  # 1 replica, its node away: keep waiting
    (rec("a b c", "a b c"), {"c"}, {"a", "b", "d"}, ["c"]),
    (rec("a b c", "a b c"), {"a", "b", "c"}, {"d"}, None),  # a rack: all in-sync nodes down
    (rec("a b c", "a"), {"b", "c"}, {"a", "d"}, ["b", "c"]),  # stale ones, a live source
    (rec("a b c", "a"), {"a"}, {"b", "c"}, None),  # the only in-sync one is dead
    (rec("a b", "a b"), set(), {"a", "b"}, []),
])
def test_replaceable(record: VolumeRecord, dead: set[str], live: set[str],
                     expected: list[str] | None) -> None:
    decision = replaceable(record, dead, live)
    if expected is None:
        assert isinstance(decision, str) and "no in-sync replica is alive" in decision
    else:
        assert decision == expected


@pytest.mark.parametrize(("record", "node", "live", "delete"), [
    (None, "a", set(), True),  # volume deleted while away
    (rec("a b", "a b", VolumePhase.DELETING), "a", {"a"}, True),
    (rec("a b", "a b"), "a", {"a", "b"}, False),  # named: needed
    (rec("b c", "b c"), "a", {"a", "b"}, True),  # replaced, a live in-sync source remains
    (rec("b c", "b c"), "a", {"a"}, False),  # replaced, but nobody else can serve it
    (rec("a b", "a", VolumePhase.CREATING), "a", {"a"}, False),
])
def test_may_delete(record: VolumeRecord | None, node: str, live: set[str],
                    delete: bool) -> None:
    assert may_delete(record, node, live) is delete
