"""EtcdAuthority and owner claims against a real etcd: the CAS rules the data path relies on."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from csi_driver.isr_authority import EtcdAuthority
from csi_driver.state.model import (
    OwnerClaim,
    ReplicaRef,
    ReplicaState,
    VolumePhase,
    VolumeRecord,
)
from replication.authority import AuthorityUnavailableError, FencedError

Run = Callable[[Awaitable[Any]], Any]


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
            authority = EtcdAuthority(store, "vol-a", "n1", 3, lease_ttl_s=5)
            assert await authority.remove_from_isr(frozenset({"n3"}), "test") == ("n1", "n2")
            assert (await store.get_volume("vol-a")).value.isr == ("n1", "n2")
            # Idempotent: removing again changes nothing.
            assert await authority.remove_from_isr(frozenset({"n3"}), "test") == ("n1", "n2")
            # Takeover: n2 bumps the epoch; n1's next shrink must fail.
            found = await store.get_volume("vol-a")
            await store.update_volume(found.value.with_(owner="n2", epoch=4), found.mod_revision)
            with pytest.raises(FencedError):
                await authority.remove_from_isr(frozenset({"n2"}), "test")
            assert (await store.get_volume("vol-a")).value.isr == ("n1", "n2")

    run(body())


def test_shrink_without_etcd_is_not_acknowledged(
    open_store: Any, private_etcd: Any, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    import csi_driver.isr_authority as module

    monkeypatch.setattr(module, "CHANGE_DEADLINE_S", 1.0)

    async def body() -> None:
        async with open_store(endpoints=[private_etcd.endpoint], timeout_s=0.5) as store:
            await store.create_volume(record("n1", 1, ("n1", "n2")))
            authority = EtcdAuthority(store, "vol-a", "n1", 1, lease_ttl_s=5)
            private_etcd.stop()
            with pytest.raises(AuthorityUnavailableError):
                await authority.remove_from_isr(frozenset({"n2"}), "test")

    run(body())


def test_self_fencing_clock() -> None:
    authority = EtcdAuthority(None, "v", "n", 1, lease_ttl_s=3, safety_margin_s=1)  # type: ignore[arg-type]
    loop_time = [100.0]
    authority.expires = lambda: loop_time[0]
    import time

    loop_time[0] = time.monotonic() + 1.5
    assert authority.may_acknowledge()
    loop_time[0] = time.monotonic() + 0.9
    assert not authority.may_acknowledge()


def test_owner_claim_lives_and_dies_with_its_lease(open_store: Any, run: Run) -> None:
    async def body() -> None:
        async with open_store() as store:
            lease = await store.grant_lease(1)
            claim = OwnerClaim("n1", 7)
            await store.claim_owner("vol-a", claim, lease)
            assert await store.get_owner("vol-a") == claim
            await store.release_owner("vol-a", OwnerClaim("n1", 6))  # not ours: kept
            assert await store.get_owner("vol-a") == claim
            await asyncio.sleep(3.5)  # lease TTL 1 s, never renewed
            assert await store.get_owner("vol-a") is None
            lease = await store.grant_lease(5)
            await store.claim_owner("vol-a", claim, lease)
            await store.release_owner("vol-a", claim)
            assert await store.get_owner("vol-a") is None

    run(body())
