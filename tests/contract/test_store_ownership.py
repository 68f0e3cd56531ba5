"""Contract tests for every Store: atomic takeover (``take_ownership``) and record invariants.

A takeover is one transaction: the epoch CAS and the create-only claim bound to the new
owner's lease, so of two racing takeovers exactly one wins and a refused one wrote nothing.
Every write of a volume record is checked against the invariants (I1b) and the epoch is
monotonic; a violation raises InvariantError with nothing written.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from csi_driver.state.errors import ConflictError, InvariantError, LeaseExpiredError
from csi_driver.state.memory import MemoryStore
from csi_driver.state.model import (
    OwnerClaim,
    ReplicaRef,
    ReplicaState,
    Versioned,
    VolumePhase,
    VolumeRecord,
)
from csi_driver.state.store import Store

Run = Callable[[Any], Any]


def ready(epoch: int = 1, owner: str | None = "n1",
          isr: tuple[str, ...] = ("n1", "n2")) -> VolumeRecord:
    return VolumeRecord(
        volume_id="vol-1", name="pvc-1", size_bytes=1 << 30,
        replicas=(ReplicaRef("n1", ReplicaState.READY), ReplicaRef("n2", ReplicaState.READY)),
        isr=isr, epoch=epoch, owner=owner, phase=VolumePhase.READY, fs_type="ext4",
        access_type="mount", parameters=(), created_at=1700000000.0,
    )


async def unchanged(store: Store, before: Versioned[VolumeRecord], revision: int,
                    owner: OwnerClaim | None) -> None:
    """Nothing was written: same records (and revisions), same claim. The store's own
    revision is checked only where nothing else writes: on the shared etcd other tests'
    leases expire (deleting their keys) at any time and move it."""
    assert await store.get_volume("vol-1") == before
    assert await store.list_volumes() == [before]
    assert await store.get_owner("vol-1") == owner
    if isinstance(store, MemoryStore):
        assert await store.current_revision() == revision


def test_take_ownership_claims_and_cas_in_one_revision(open_store: Any, run: Run) -> None:
    async def body() -> None:
        async with open_store() as store:
            v0 = await store.create_volume(ready())
            lease = await store.grant_lease(5)
            claim = OwnerClaim("n2", 2)
            v1 = await store.take_ownership(v0.value.with_(owner="n2", epoch=2),
                                            v0.mod_revision, claim, lease)
            assert v1.value.epoch == 2 and v1.value.owner == "n2"
            assert v1.mod_revision > v0.mod_revision
            assert v1.create_revision == v0.create_revision
            assert await store.get_volume("vol-1") == v1
            assert await store.get_owner("vol-1") == claim
            # Record and claim were one transaction: one revision for both.
            assert await store.current_revision() == v1.mod_revision

    run(body())


def test_take_ownership_refused_while_another_owner_holds_the_claim(
    open_store: Any, run: Run
) -> None:
    async def body() -> None:
        async with open_store() as store:
            v0 = await store.create_volume(ready())
            held = OwnerClaim("n1", 2)
            v1 = await store.take_ownership(v0.value.with_(epoch=2), v0.mod_revision, held,
                                            await store.grant_lease(5))
            lease = await store.grant_lease(5)
            revision = await store.current_revision()
            # The record revision is current: only the claim compare fails.
            with pytest.raises(ConflictError) as lost:
                await store.take_ownership(v1.value.with_(owner="n2", epoch=3),
                                           v1.mod_revision, OwnerClaim("n2", 3), lease)
            assert lost.value.current == v1
            await unchanged(store, v1, revision, held)

    run(body())


def test_take_ownership_refused_when_the_record_moved(open_store: Any, run: Run) -> None:
    async def body() -> None:
        async with open_store() as store:
            v0 = await store.create_volume(ready())
            v1 = await store.update_volume(v0.value.with_(epoch=2), v0.mod_revision)
            lease = await store.grant_lease(5)
            revision = await store.current_revision()
            with pytest.raises(ConflictError) as stale:
                await store.take_ownership(v0.value.with_(owner="n2", epoch=3),
                                           v0.mod_revision, OwnerClaim("n2", 3), lease)
            assert stale.value.current == v1
            await unchanged(store, v1, revision, None)

    run(body())


def test_take_ownership_replaces_exactly_the_named_claim(open_store: Any, run: Run) -> None:
    async def body() -> None:
        async with open_store() as store:
            v0 = await store.create_volume(ready())
            old_lease, new_lease = await store.grant_lease(5), await store.grant_lease(5)
            old = OwnerClaim("n1", 2)
            v1 = await store.take_ownership(v0.value.with_(epoch=2), v0.mod_revision, old,
                                            old_lease)
            revision = await store.current_revision()
            for wrong in (OwnerClaim("n1", 1), OwnerClaim("n2", 2)):
                with pytest.raises(ConflictError):
                    await store.take_ownership(v1.value, v1.mod_revision, old, new_lease,
                                               replaces=wrong)
                await unchanged(store, v1, revision, old)
            with pytest.raises(ConflictError):  # replaces= names a claim, not "any claim"
                await store.take_ownership(v1.value, v1.mod_revision, old, new_lease)
            # Same epoch, fresh lease: how an owner regains its claim after a lapse.
            v2 = await store.take_ownership(v1.value, v1.mod_revision, old, new_lease,
                                             replaces=old)
            assert await store.get_volume("vol-1") == v2
            await store.revoke_lease(old_lease)  # the claim moved to the new lease
            assert await store.get_owner("vol-1") == old
            await store.revoke_lease(new_lease)
            assert await store.get_owner("vol-1") is None
            assert await store.get_volume("vol-1") == v2  # records are bound to no lease

    run(body())


def test_racing_takeovers_have_exactly_one_winner(open_store: Any, run: Run) -> None:
    async def body() -> None:
        async with open_store() as store:
            v0 = await store.create_volume(ready(owner=None, isr=("n1", "n2")))
            leases = [await store.grant_lease(5) for _ in range(2)]
            claims = [OwnerClaim(n, 2) for n in ("n1", "n2")]
            results = await asyncio.gather(
                *(store.take_ownership(v0.value.with_(owner=c.node_id, epoch=2),
                                       v0.mod_revision, c, lease)
                  for c, lease in zip(claims, leases, strict=True)),
                return_exceptions=True,
            )
            winners = [r for r in results if isinstance(r, Versioned)]
            assert len(winners) == 1
            assert all(isinstance(r, ConflictError) for r in results if r not in winners)
            winner = winners[0]
            assert await store.get_volume("vol-1") == winner
            assert await store.get_owner("vol-1") == OwnerClaim(winner.value.owner or "", 2)

    run(body())


def test_take_ownership_with_a_dead_lease_writes_nothing(open_store: Any, run: Run) -> None:
    async def body() -> None:
        async with open_store() as store:
            v0 = await store.create_volume(ready())
            lease = await store.grant_lease(5)
            await store.revoke_lease(lease)
            revision = await store.current_revision()
            with pytest.raises(LeaseExpiredError):
                await store.take_ownership(v0.value.with_(epoch=2), v0.mod_revision,
                                           OwnerClaim("n1", 2), lease)
            await unchanged(store, v0, revision, None)

    run(body())


def test_the_claim_dies_with_its_lease(open_store: Any, run: Run) -> None:
    async def body() -> None:
        async with open_store() as store:
            v0 = await store.create_volume(ready())
            revoked, expiring = await store.grant_lease(5), await store.grant_lease(1)
            claim = OwnerClaim("n1", 2)
            v1 = await store.take_ownership(v0.value.with_(epoch=2), v0.mod_revision, claim,
                                            revoked)
            await store.revoke_lease(revoked)
            assert await store.get_owner("vol-1") is None
            await store.take_ownership(v1.value, (await store.get_volume("vol-1")).mod_revision,
                                       claim, expiring)
            assert await store.get_owner("vol-1") == claim
            await asyncio.sleep(2.5)  # TTL 1 s, never renewed
            assert await store.get_owner("vol-1") is None

    run(body())


@pytest.mark.parametrize(("change", "why"), [
    ({"isr": ()}, "must not be empty"),
    ({"isr": ("n1", "n9")}, "non-replicas"),
    ({"epoch": 0}, "epoch would go back"),
    ({"replicas": (ReplicaRef("n2", ReplicaState.READY),)}, "non-replicas"),
])
def test_writes_that_break_an_invariant_are_refused(
    change: dict[str, Any], why: str, open_store: Any, run: Run
) -> None:
    async def body() -> None:
        async with open_store() as store:
            v0 = await store.create_volume(ready())
            lease = await store.grant_lease(5)
            revision = await store.current_revision()
            bad = v0.value.with_(**change)
            with pytest.raises(InvariantError, match=why):
                await store.update_volume(bad, v0.mod_revision)
            with pytest.raises(InvariantError, match=why):
                await store.take_ownership(bad, v0.mod_revision, OwnerClaim("n1", 1), lease)
            await unchanged(store, v0, revision, None)

    run(body())


def test_create_of_a_ready_volume_without_isr_is_refused(open_store: Any, run: Run) -> None:
    async def body() -> None:
        async with open_store() as store:
            revision = await store.current_revision()
            for bad in (ready(isr=()), ready(isr=("n1", "n3"))):
                with pytest.raises(InvariantError):
                    await store.create_volume(bad)
            assert await store.get_volume("vol-1") is None
            assert await store.volume_id_for_name("pvc-1") is None
            assert await store.current_revision() == revision
            # A volume still being created has no data yet: an empty ISR is fine there.
            created = await store.create_volume(ready(isr=()).with_(phase=VolumePhase.CREATING))
            assert await store.get_volume("vol-1") == created

    run(body())
