"""The pure rules behind ownership and acknowledgement (issue 10 #2, #3, #5, #6), from tables."""

from __future__ import annotations

import argparse
import time

import pytest

from csi_driver.config import ConfigError, check_lease_ttl, lease_ttl_arg
from csi_driver.node.isr_authority import SELF_FENCE_MARGIN_S, EtcdAuthority, Keeper, fence_margin
from csi_driver.node.ownership import Takeover, decide_takeover
from csi_driver.state.memory import MemoryStore
from csi_driver.state.model import (
    OwnerClaim,
    ReplicaRef,
    ReplicaState,
    VolumePhase,
    VolumeRecord,
    min_in_sync_of,
    transition_problem,
)


def volume(isr: tuple[str, ...] = ("a", "b", "c"), epoch: int = 3,
           phase: VolumePhase = VolumePhase.READY, replicas: tuple[str, ...] = ("a", "b", "c"),
           params: tuple[tuple[str, str], ...] = ()) -> VolumeRecord:
    return VolumeRecord("vol-1", "pvc-1", 1 << 20,
                        tuple(ReplicaRef(n, ReplicaState.READY) for n in replicas), isr, epoch,
                        None, phase, "ext4", "mount", params, 0.0)


@pytest.mark.parametrize(("record", "claim", "expected"), [
    (None, None, "absent"),
    (volume(phase=VolumePhase.CREATING), None, "absent"),
    (volume(phase=VolumePhase.DELETING), None, "absent"),
    (volume(), None, Takeover(None)),
    (volume(), OwnerClaim("me", 3), Takeover(OwnerClaim("me", 3))),
    (volume(), OwnerClaim("other", 3), "staged on node other, which still serves it"),
])
def test_decide_takeover(record: VolumeRecord | None, claim: OwnerClaim | None,
                         expected: Takeover | str) -> None:
    assert decide_takeover(record, claim, "me") == expected


@pytest.mark.parametrize(("old", "new", "problem"), [
    (volume(), volume(isr=("a", "b")), None),
    (volume(), volume(epoch=4), None),
    (volume(), volume(epoch=2), "epoch would go back from 3 to 2"),
    (volume(), volume(isr=()), "a ready volume's isr must not be empty"),
    (volume(), volume(isr=("a", "z")), "isr ['a', 'z'] names non-replicas ['z']"),
    (volume(phase=VolumePhase.CREATING, isr=()), volume(phase=VolumePhase.CREATING, isr=()),
     None),
    (volume(), volume(phase=VolumePhase.DELETING, isr=()), None),
])
def test_record_transitions(old: VolumeRecord, new: VolumeRecord, problem: str | None) -> None:
    assert transition_problem(old, new) == problem


@pytest.mark.parametrize(("params", "replicas", "expected"), [
    ((), ("a", "b", "c"), 1),
    ((("minInSync", "2"),), ("a", "b", "c"), 2),
    ((("minInSync", "3"),), ("a", "b", "c"), 3),
    ((("minInSync", "4"),), ("a", "b", "c"), None),
    ((("minInSync", "0"),), ("a", "b", "c"), None),
    ((("minInSync", "\u0663"),), ("a", "b", "c"), None),  # ARABIC-INDIC DIGIT THREE
    ((("minInSync", "x"),), ("a",), None),
])
def test_min_in_sync(params: tuple[tuple[str, str], ...], replicas: tuple[str, ...],
                     expected: int | None) -> None:
    record = volume(params=params, replicas=replicas, isr=replicas)
    if expected is None:
        with pytest.raises(ValueError, match="minInSync"):
            min_in_sync_of(record)
    else:
        assert min_in_sync_of(record) == expected


@pytest.mark.parametrize(("text", "expected"), [("2", 2), ("2.0", 2), ("600", 600)])
def test_lease_ttl_accepts_whole_seconds(text: str, expected: int) -> None:
    assert lease_ttl_arg(text) == expected


@pytest.mark.parametrize("text", ["2.5", "0", "0.5", "601", "nan", "inf", "-3", "two"])
def test_lease_ttl_refuses_the_rest(text: str) -> None:
    """2.5 s was granted as round(2.5) = 2 s by etcd while the target fenced on 2.5 s."""
    with pytest.raises(argparse.ArgumentTypeError):
        lease_ttl_arg(text)


def test_node_config_lease_check() -> None:
    with pytest.raises(ConfigError, match="whole seconds"):
        check_lease_ttl(2.5)
    check_lease_ttl(2)


def test_self_fence_margin() -> None:
    assert SELF_FENCE_MARGIN_S == 0.5
    assert fence_margin(2) == 0.5
    assert fence_margin(1) == 0.5
    assert fence_margin(0.6) == pytest.approx(0.3)


class _Keeper:
    def __init__(self, lease_id: int, ttl_s: float, granted: float) -> None:
        self.lease_id, self.lost, self._expires = lease_id, False, granted + ttl_s

    def expires_monotonic(self) -> float:
        return self._expires

    def start(self) -> object:
        return None

    async def stop(self) -> None:
        return None


class _Authority(EtcdAuthority):
    def _keeper(self, lease_id: int, granted_monotonic: float) -> Keeper:
        return _Keeper(lease_id, self._ttl_s, granted_monotonic)


def test_self_fencing_clock_starts_at_the_grant_send() -> None:
    """The target stops acknowledging SELF_FENCE_MARGIN_S before the lease can lapse in
    etcd, counted from when the node *sent* the grant, not when the target started."""
    store = MemoryStore()
    sent = time.monotonic() - 1.6  # the node granted the lease 1.6 s ago
    assert not _Authority(store, "v", "n", 1, 0x1, 2, sent).may_acknowledge()  # 1.6 > 2 - 0.5
    assert _Authority(store, "v", "n", 1, 0x1, 2, time.monotonic()).may_acknowledge()
    clock = [10.0]
    at = _Authority(store, "v", "n", 1, 0x1, 2, 10.0, clock=lambda: clock[0])
    clock[0] = 11.49
    assert at.may_acknowledge()
    clock[0] = 11.5  # exactly TTL - margin after the grant was sent
    assert not at.may_acknowledge()
