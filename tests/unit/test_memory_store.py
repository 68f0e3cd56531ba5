"""MemoryStore's own knobs, beyond the Store contract (which tests/contract runs against it
and etcd alike): leases on a manual clock, fault injection, bounded history, strict decoding.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from csi_driver.state.errors import (
    AlreadyExistsError,
    CompactedError,
    ConflictError,
    LeaseExpiredError,
    StoreError,
    StoreUnavailableError,
)
from csi_driver.state.memory import ManualClock, MemoryStore
from csi_driver.state.model import (
    NodeRecord,
    OwnerClaim,
    ReplicaRef,
    ReplicaState,
    VolumePhase,
    VolumeRecord,
    pairs,
)
from csi_driver.state.store import Store, WatchEvent, WatchEventType
from replication.authority import ResyncProgress


def run(body: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(body, 10))


def node(node_id: str) -> NodeRecord:
    return NodeRecord(node_id=node_id, agent_address=f"{node_id}:1", replica_address=f"{node_id}:2",
                      pool_kind="file", total_bytes=10, free_bytes=5,
                      topology=pairs({"zone": "a"}), max_volumes=4)


def volume(volume_id: str = "vol-1") -> VolumeRecord:
    return VolumeRecord(
        volume_id=volume_id, name=f"pvc-{volume_id}", size_bytes=1 << 20,
        replicas=(ReplicaRef("n1", ReplicaState.READY),), isr=("n1",), epoch=1, owner="n1",
        phase=VolumePhase.READY, fs_type="ext4", access_type="mount", parameters=(),
        created_at=0.0,
    )


async def next_events(watch: Any, count: int) -> list[WatchEvent]:
    return [await watch.__anext__() for _ in range(count)]


def test_lease_expiry_on_the_manual_clock_deletes_keys_and_tells_watchers() -> None:
    async def body() -> None:
        clock = ManualClock(1000.0)
        store = MemoryStore(clock)
        lease, other = await store.grant_lease(10), await store.grant_lease(30)
        created = await store.create_volume(volume())
        await store.take_ownership(created.value, created.mod_revision, OwnerClaim("n1", 1),
                                   lease)
        await store.put_node(node("n1"), lease)
        put = await store.put_node(node("n2"), other)
        watch = store.watch_prefix("nodes", start_revision=put.mod_revision + 1)
        pending = asyncio.ensure_future(next_events(watch, 1))
        await asyncio.sleep(0)  # the watch is waiting: only the clock can wake it now
        clock.advance(9.5)
        assert [n.value.node_id for n in await store.list_nodes()] == ["n1", "n2"]
        assert await store.keep_alive_once(other) == 30  # from now: 1009.5 + 30
        clock.advance(0.5)  # exactly granted + ttl: expired, with nobody calling the store
        (event,) = await asyncio.wait_for(pending, 1)
        assert (event.type, event.key, event.value) == (WatchEventType.DELETE, "n1", None)
        assert event.mod_revision == await store.current_revision()
        assert await store.get_owner("vol-1") is None  # the claim went in the same revision
        assert await store.get_volume("vol-1") is not None
        clock.advance(29)
        assert [n.value.node_id for n in await store.list_nodes()] == ["n2"]
        clock.advance(0.5)
        assert await store.list_nodes() == []
        await watch.aclose()
        await store.close()

    run(body())


def test_expire_leases_on_any_clock() -> None:
    async def body() -> None:
        now = [0.0]
        store = MemoryStore(lambda: now[0])
        await store.put_node(node("n1"), await store.grant_lease(5))
        start = await store.current_revision()
        now[0] = 5.0
        assert store.expire_leases() == 1  # a simulation's explicit step
        assert store.expire_leases() == 0
        events = await next_events(store.watch_prefix("nodes", start_revision=start + 1), 1)
        assert [(e.type, e.key) for e in events] == [(WatchEventType.DELETE, "n1")]

    run(body())


def store_calls(store: Store) -> dict[str, Callable[[], Awaitable[Any]]]:
    """One call of every Store method, with arguments that would otherwise succeed."""
    vol = volume()
    progress = ResyncProgress("rebuild", 1, 2, 3.0, 4)
    return {
        "put_node": lambda: store.put_node(node("n1"), 0),
        "get_node": lambda: store.get_node("n1"),
        "list_nodes": store.list_nodes,
        "create_volume": lambda: store.create_volume(volume("vol-2")),
        "get_volume": lambda: store.get_volume("vol-1"),
        "list_volumes": store.list_volumes,
        "update_volume": lambda: store.update_volume(vol, 2),
        "delete_volume": lambda: store.delete_volume("vol-1", 2),
        "volume_id_for_name": lambda: store.volume_id_for_name("pvc-vol-1"),
        "take_ownership": lambda: store.take_ownership(vol, 2, OwnerClaim("n1", 1), 0),
        "get_owner": lambda: store.get_owner("vol-1"),
        "release_owner": lambda: store.release_owner("vol-1", OwnerClaim("n1", 1)),
        "put_progress": lambda: store.put_progress("vol-1", "n1", progress),
        "get_progress": lambda: store.get_progress("vol-1"),
        "grant_lease": lambda: store.grant_lease(5),
        "keep_alive_once": lambda: store.keep_alive_once(1),
        "revoke_lease": lambda: store.revoke_lease(1),
        "current_revision": store.current_revision,
        "watch_prefix": lambda: anext(aiter(store.watch_prefix("volumes", start_revision=1))),
    }


def test_unavailable_mode_refuses_every_call_and_breaks_watches() -> None:
    async def body() -> None:
        clock = ManualClock()
        store = MemoryStore(clock)
        await store.create_volume(volume())
        await store.put_node(node("n9"), await store.grant_lease(2))
        calls = store_calls(store)
        public = {n for n, f in inspect.getmembers(Store, inspect.isfunction)
                  if not n.startswith("_")} - {"close"}
        assert set(calls) == public  # a method added to the contract must be added here
        waiting = asyncio.ensure_future(anext(aiter(store.watch_prefix("volumes"))))
        await asyncio.sleep(0)
        store.set_unavailable()
        assert not store.available
        with pytest.raises(StoreUnavailableError):
            await asyncio.wait_for(waiting, 1)  # an open watch breaks at once
        for name, call in calls.items():
            try:
                await call()
            except StoreUnavailableError:
                continue
            pytest.fail(f"{name} answered while the store was unavailable")
        clock.advance(2)  # the clients are cut off, not the store: leases still run out
        store.set_unavailable(False)
        assert store.available
        assert await store.get_node("n9") is None
        found = await store.get_volume("vol-1")
        assert found is not None and found.value == volume()
        for call in calls.values():
            # Every call answers again: a CAS may lose now, which is an answer too.
            with contextlib.suppress(ConflictError, AlreadyExistsError, LeaseExpiredError):
                await call()

    run(body())


def test_bounded_history_reports_compaction() -> None:
    async def body() -> None:
        store = MemoryStore(ManualClock(), history=3)
        v = await store.create_volume(volume())
        first = v.mod_revision
        for epoch in range(2, 6):  # 4 more revisions: the first two fall off
            v = await store.update_volume(v.value.with_(epoch=epoch), v.mod_revision)
        with pytest.raises(CompactedError) as compacted:
            await next_events(store.watch_prefix("volumes", start_revision=first), 1)
        assert compacted.value.compact_revision == first + 2
        replay = await next_events(store.watch_prefix("volumes", start_revision=first + 2), 3)
        assert [e.mod_revision for e in replay] == [first + 2, first + 3, first + 4]
        with pytest.raises(CompactedError):
            store.compact(first)

    run(body())


def test_watch_from_a_future_revision_waits_for_it() -> None:
    async def body() -> None:
        store = MemoryStore(ManualClock())
        start = await store.current_revision()
        watch = store.watch_prefix("volumes", start_revision=start + 2)
        pending = asyncio.ensure_future(next_events(watch, 1))
        v = await store.create_volume(volume())  # start + 1: before the watch's start
        await asyncio.sleep(0)
        v = await store.update_volume(v.value.with_(epoch=2), v.mod_revision)
        assert [e.mod_revision for e in await asyncio.wait_for(pending, 1)] == [v.mod_revision]

    run(body())


def test_values_are_stored_as_bytes_and_decoded_strictly() -> None:
    async def body() -> None:
        store = MemoryStore(ManualClock())
        await store.create_volume(volume())
        raw = store._kv.entries["volumes/vol-1"]
        assert raw.value == volume().to_json()
        store._kv.apply({"volumes/vol-1": (raw.value.replace(b'"epoch":1', b'"epoch":true'),
                                           0)}, set())
        with pytest.raises(StoreError, match="corrupt VolumeRecord"):
            await store.get_volume("vol-1")

    run(body())


def test_closed_store_and_bad_lease_ttls() -> None:
    async def body() -> None:
        clock = ManualClock()
        store = MemoryStore(clock)
        for ttl in (0, -1, 1.5, True):
            with pytest.raises(ValueError):
                await store.grant_lease(ttl)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            clock.advance(-1)
        await store.close()
        with pytest.raises(StoreError):
            await store.list_volumes()
        clock.advance(5)  # a closed store no longer listens to the clock

    run(body())
