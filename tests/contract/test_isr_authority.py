"""EtcdAuthority and owner claims against every Store: the CAS rules the data path relies on.

The authority's ISR changes are plain Store CAS, so they run against etcd and MemoryStore;
its lease keeper is replaced by a fixed one here (LeaseKeeper is etcd's and has its own
tests in test_store_leases.py), so these tests are about the CAS rules only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from csi_driver.node.isr_authority import SELF_FENCE_MARGIN_S, EtcdAuthority, Keeper
from csi_driver.state.errors import ConflictError
from csi_driver.state.model import (
    OwnerClaim,
    ReplicaRef,
    ReplicaState,
    VolumePhase,
    VolumeRecord,
)
from csi_driver.state.store import Store
from replication.authority import AuthorityUnavailableError, FencedError

Run = Callable[[Awaitable[Any]], Any]


class FixedKeeper:
    """A keeper whose lease runs out at ``expires`` (never lost unless told)."""

    def __init__(self, lease_id: int, expires: float) -> None:
        self.lease_id = lease_id
        self.lost = False
        self.expires = expires

    def expires_monotonic(self) -> float:
        return self.expires

    def start(self) -> object:
        return None

    async def stop(self) -> None:
        return None


class FixedKeeperAuthority(EtcdAuthority):
    def _keeper(self, lease_id: int, granted_monotonic: float) -> Keeper:
        return FixedKeeper(lease_id, granted_monotonic + self._ttl_s)


def authority(store: Store, owner: str, epoch: int, **kw: Any) -> FixedKeeperAuthority:
    return FixedKeeperAuthority(store, "vol-a", owner, epoch, lease_id=0, lease_ttl_s=5,
                                granted_monotonic=time.monotonic(), **kw)


def record(owner: str | None, epoch: int, isr: tuple[str, ...]) -> VolumeRecord:
    return VolumeRecord(
        volume_id="vol-a", name="a", size_bytes=1 << 20,
        replicas=tuple(ReplicaRef(n, ReplicaState.READY) for n in ("n1", "n2", "n3")),
        isr=isr, epoch=epoch, owner=owner, phase=VolumePhase.READY, fs_type="ext4",
        access_type="mount", parameters=(), created_at=0.0,
    )


def test_shrink_is_cas_on_owner_and_epoch(open_store: Any, run: Run) -> None:
    async def body() -> None:
        async with open_store() as store:
            await store.create_volume(record("n1", 3, ("n1", "n2", "n3")))
            auth = authority(store, "n1", 3)
            assert await auth.remove_from_isr(frozenset({"n3"}), "test") == ("n1", "n2")
            assert (await store.get_volume("vol-a")).value.isr == ("n1", "n2")
            # Idempotent: removing again changes nothing.
            assert await auth.remove_from_isr(frozenset({"n3"}), "test") == ("n1", "n2")
            # The last in-sync members are never removed: the owner fences instead.
            with pytest.raises(FencedError):
                await auth.remove_from_isr(frozenset({"n1", "n2"}), "test")
            assert (await store.get_volume("vol-a")).value.isr == ("n1", "n2")
            # Takeover: n2 bumps the epoch; n1's next shrink must fail.
            found = await store.get_volume("vol-a")
            await store.update_volume(found.value.with_(owner="n2", epoch=4), found.mod_revision)
            with pytest.raises(FencedError):
                await auth.remove_from_isr(frozenset({"n2"}), "test")
            assert (await store.get_volume("vol-a")).value.isr == ("n1", "n2")

    run(body())


def test_shrink_without_the_store_is_not_acknowledged(open_faulty_store: Any, run: Run) -> None:
    async def body() -> None:
        async with open_faulty_store() as (store, outage):
            await store.create_volume(record("n1", 1, ("n1", "n2")))
            auth = authority(store, "n1", 1, change_deadline_s=1.0)
            outage()
            with pytest.raises(AuthorityUnavailableError):
                await auth.remove_from_isr(frozenset({"n2"}), "test")

    run(body())


def test_self_fencing_clock() -> None:
    now = [100.0]
    auth = FixedKeeperAuthority(None, "v", "n", 1, lease_id=1, lease_ttl_s=3,  # type: ignore[arg-type]
                                granted_monotonic=0.0, clock=lambda: now[0])
    keeper = auth.keeper
    assert isinstance(keeper, FixedKeeper)
    keeper.expires = now[0] + SELF_FENCE_MARGIN_S + 0.1
    assert auth.may_acknowledge()
    keeper.expires = now[0] + SELF_FENCE_MARGIN_S - 0.1  # inside the margin: stop acking
    assert not auth.may_acknowledge()
    keeper.expires, keeper.lost = now[0] + 60, True
    assert not auth.may_acknowledge()


def test_owner_claim_lives_and_dies_with_its_lease(open_store: Any, run: Run) -> None:
    async def body() -> None:
        async with open_store() as store:
            found = await store.create_volume(record("n1", 6, ("n1", "n2")))
            lease = await store.grant_lease(1)
            claim = OwnerClaim("n1", 7)
            found = await store.take_ownership(found.value.with_(epoch=7), found.mod_revision,
                                               claim, lease)
            assert await store.get_owner("vol-a") == claim
            await store.release_owner("vol-a", OwnerClaim("n1", 6))  # not ours: kept
            assert await store.get_owner("vol-a") == claim
            await asyncio.sleep(3.5)  # lease TTL 1 s, never renewed
            assert await store.get_owner("vol-a") is None
            # The claim is gone, the record stays: the same epoch can be claimed again.
            lease = await store.grant_lease(5)
            await store.take_ownership(found.value, found.mod_revision, claim, lease)
            await store.release_owner("vol-a", claim)
            assert await store.get_owner("vol-a") is None
            await store.release_owner("vol-a", claim)  # idempotent
            with pytest.raises(ConflictError):  # the revision moved with the last claim
                await store.take_ownership(found.value, found.mod_revision, claim, lease)

    run(body())
