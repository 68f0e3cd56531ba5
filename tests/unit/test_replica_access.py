"""Who may touch a replica, and which fences are real (issue 11 #2, #3): rule tables."""

from __future__ import annotations

import pytest

from csi_driver.node.replica_access import access_refusal
from csi_driver.state.model import ReplicaRef, ReplicaState, VolumePhase, VolumeRecord


def rec(replicas: str, owner: str | None, epoch: int) -> VolumeRecord:
    return VolumeRecord("vol-1", "pvc-1", 1 << 20,
                        tuple(ReplicaRef(n, ReplicaState.READY) for n in replicas.split()),
                        tuple(replicas.split()), epoch, owner, VolumePhase.READY, "ext4",
                        "block", (), 0.0)


@pytest.mark.parametrize(("record", "peer", "fence", "refused"), [
    (rec("a b c", "a", 4), "a", None, None),
    (rec("a b c", "a", 4), "b", 4, None),  # the owner-to-be fences at the epoch etcd issued
    (rec("a b c", "a", 4), "a", 5, "not vol-1's current epoch"),  # from the future
    (rec("a b c", "a", 4), "a", (1 << 48) - 1, "only an epoch etcd issued"),  # probe 3
    (rec("a b c", "a", 4), "a", 3, "current epoch 4"),  # an old owner
    (rec("a b c", "a", 4), "evil", None, "neither a replica nor the owner"),
    (rec("a b", "d", 2), "d", 2, None),  # an owner that holds no replica
    (None, "a", None, "has no record"),
])
def test_access_refusal(record: VolumeRecord | None, peer: str, fence: int | None,
                        refused: str | None) -> None:
    reason = access_refusal(record, "vol-1", peer, fence)
    if refused is None:
        assert reason is None
    else:
        assert reason is not None and refused in reason
