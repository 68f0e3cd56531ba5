"""Contract tests for every Store (EtcdStore on a real etcd, MemoryStore): the guarantees
Store documents.

CRUD and the name index, compare-and-swap, watches, unavailability (leases and node keys:
test_store_leases.py; ownership and record invariants: test_store_ownership.py). Endpoint
failover and prefix isolation are etcd's alone. On etcd each test works under its own key
prefix on the shared server unless it needs to stop etcd.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from csi_driver.state.errors import (
    AlreadyExistsError,
    CompactedError,
    ConflictError,
    StoreUnavailableError,
)
from csi_driver.state.etcd_server import EtcdServer
from csi_driver.state.model import (
    NodeRecord,
    ReplicaRef,
    ReplicaState,
    VolumePhase,
    VolumeRecord,
    pairs,
)
from csi_driver.state.store import Store, Watch, WatchEvent, WatchEventType

Run = Callable[[Any], Any]


def volume(volume_id: str, name: str | None = None, **changes: Any) -> VolumeRecord:
    rec = VolumeRecord(
        volume_id=volume_id,
        name=name or f"pvc-{volume_id}",
        size_bytes=1 << 30,
        replicas=(ReplicaRef("n1", ReplicaState.CREATING), ReplicaRef("n2", ReplicaState.CREATING)),
        isr=(),
        epoch=0,
        owner=None,
        phase=VolumePhase.CREATING,
        fs_type="ext4",
        access_type="mount",
        parameters=pairs({"replicas": "2"}),
        created_at=1700000000.5,
    )
    return rec.with_(**changes) if changes else rec


def node(node_id: str) -> NodeRecord:
    return NodeRecord(
        node_id=node_id,
        agent_address=f"{node_id}:7001",
        replica_address=f"{node_id}:7002",
        pool_kind="file",
        total_bytes=100 << 30,
        free_bytes=60 << 30,
        topology=pairs({"topology.tandem.io/node": node_id}),
        max_volumes=64,
    )


def test_create_get_list(open_store: Any, run: Run) -> None:
    async def body() -> None:
        async with open_store() as store:
            assert await store.list_volumes() == []
            assert await store.get_volume("vol-b") is None
            created = {}
            for vid in ("vol-c", "vol-a", "vol-b"):
                created[vid] = await store.create_volume(volume(vid))
                assert created[vid].mod_revision == created[vid].create_revision > 0
                assert created[vid].lease == 0
            got = await store.get_volume("vol-b")
            assert got == created["vol-b"]
            assert got.value == volume("vol-b")
            listed = await store.list_volumes()
            assert [v.value.volume_id for v in listed] == ["vol-a", "vol-b", "vol-c"]
            assert listed == [created["vol-a"], created["vol-b"], created["vol-c"]]
            assert await store.volume_id_for_name("pvc-vol-a") == "vol-a"
            assert await store.volume_id_for_name("nope") is None

    run(body())


def test_create_is_create_if_absent(open_store: Any, run: Run) -> None:
    async def body() -> None:
        async with open_store() as store:
            first = await store.create_volume(volume("vol-1", name="data"))
            with pytest.raises(AlreadyExistsError) as same_id:
                await store.create_volume(volume("vol-1", name="other-name"))
            assert same_id.value.existing == first
            # The failed create must not have claimed its name.
            assert await store.volume_id_for_name("other-name") is None

            with pytest.raises(AlreadyExistsError) as same_name:
                await store.create_volume(volume("vol-2", name="data"))
            assert same_name.value.existing == first
            assert await store.get_volume("vol-2") is None
            assert [v.value.volume_id for v in await store.list_volumes()] == ["vol-1"]

    run(body())


def test_update_is_compare_and_swap(open_store: Any, run: Run) -> None:
    async def body() -> None:
        async with open_store() as store:
            v0 = await store.create_volume(volume("vol-1"))
            ready = v0.value.with_(phase=VolumePhase.READY, isr=("n1", "n2"), epoch=1, owner="n1")
            v1 = await store.update_volume(ready, v0.mod_revision)
            assert v1.value == ready
            assert v1.mod_revision > v0.mod_revision
            assert v1.create_revision == v0.create_revision
            assert await store.get_volume("vol-1") == v1

            # A writer holding the old revision loses, and learns the current record.
            with pytest.raises(ConflictError) as lost:
                await store.update_volume(v0.value.with_(epoch=7), v0.mod_revision)
            assert lost.value.current == v1
            assert (await store.get_volume("vol-1")) == v1

            with pytest.raises(ValueError, match="immutable"):
                await store.update_volume(v1.value.with_(name="renamed"), v1.mod_revision)

            await store.delete_volume("vol-1", v1.mod_revision)
            with pytest.raises(ConflictError) as gone:
                await store.update_volume(v1.value, v1.mod_revision)
            assert gone.value.current is None

    run(body())


def test_concurrent_cas_has_exactly_one_winner(open_store: Any, run: Run) -> None:
    async def body() -> None:
        async with open_store() as store:
            v0 = await store.create_volume(volume("vol-1"))
            results = await asyncio.gather(
                *(store.update_volume(v0.value.with_(epoch=i), v0.mod_revision)
                  for i in range(1, 9)),
                return_exceptions=True,
            )
            winners = [r for r in results if not isinstance(r, BaseException)]
            assert len(winners) == 1
            assert all(isinstance(r, ConflictError) for r in results if r not in winners)
            assert (await store.get_volume("vol-1")) == winners[0]

    run(body())


def test_delete_is_compare_and_swap(open_store: Any, run: Run) -> None:
    async def body() -> None:
        async with open_store() as store:
            v0 = await store.create_volume(volume("vol-1", name="data"))
            v1 = await store.update_volume(v0.value.with_(phase=VolumePhase.READY, isr=("n1",)),
                                           v0.mod_revision)
            with pytest.raises(ConflictError) as stale:
                await store.delete_volume("vol-1", v0.mod_revision)
            assert stale.value.current == v1
            assert await store.volume_id_for_name("data") == "vol-1"

            await store.delete_volume("vol-1", v1.mod_revision)
            assert await store.get_volume("vol-1") is None
            assert await store.volume_id_for_name("data") is None
            with pytest.raises(ConflictError) as absent:
                await store.delete_volume("vol-1", v1.mod_revision)
            assert absent.value.current is None
            # Both keys are gone, so id and name are free again.
            again = await store.create_volume(volume("vol-1", name="data"))
            assert again.create_revision > v1.mod_revision

    run(body())


async def first_events(watch: Watch, count: int) -> list[WatchEvent]:
    """The first ``count`` events of ``watch``, which is closed afterwards."""
    events: list[WatchEvent] = []
    try:
        async for event in watch:
            events.append(event)
            if len(events) == count:
                break
    finally:
        await watch.aclose()
    return events


async def collect(store: Store, kind: str, count: int, **kw: Any) -> list[WatchEvent]:
    return await first_events(store.watch_prefix(kind, **kw), count)


def test_watch_sees_put_and_delete(open_store: Any, run: Run) -> None:
    async def body() -> None:
        async with open_store() as store:
            start = await store.current_revision()
            # Watching from a known revision makes the test independent of when the
            # watch is actually established.
            watcher = asyncio.create_task(collect(store, "volumes", 3, start_revision=start + 1))
            v0 = await store.create_volume(volume("vol-1"))
            v1 = await store.update_volume(v0.value.with_(epoch=2), v0.mod_revision)
            await store.delete_volume("vol-1", v1.mod_revision)
            await store.put_node(node("n1"), await store.grant_lease(5))  # other kind
            events = await asyncio.wait_for(watcher, 10)
            assert [(e.type, e.key) for e in events] == [
                (WatchEventType.PUT, "vol-1"),
                (WatchEventType.PUT, "vol-1"),
                (WatchEventType.DELETE, "vol-1"),
            ]
            assert VolumeRecord.from_json(events[0].value or b"") == v0.value
            assert VolumeRecord.from_json(events[1].value or b"") == v1.value
            assert events[2].value is None
            revs = [e.mod_revision for e in events]
            assert revs[:2] == [v0.mod_revision, v1.mod_revision] and revs[2] > revs[1]

            # A watch from "now" sees only changes after it was established.
            live = store.watch_prefix("volumes")
            await asyncio.wait_for(live.established(), 10)
            v2 = await store.create_volume(volume("vol-2"))
            events = await asyncio.wait_for(first_events(live, 1), 10)
            assert [e.mod_revision for e in events] == [v2.mod_revision]
            with pytest.raises(ValueError):
                await collect(store, "names", 1)  # only nodes and volumes are watchable

    run(body())


def test_watch_sees_node_expiry(open_store: Any, run: Run) -> None:
    async def body() -> None:
        async with open_store() as store:
            lease = await store.grant_lease(5)
            start = await store.current_revision()
            watcher = asyncio.create_task(collect(store, "nodes", 2, start_revision=start + 1))
            await store.put_node(node("n9"), lease)
            await store.revoke_lease(lease)
            events = await asyncio.wait_for(watcher, 10)
            assert [(e.type, e.key) for e in events] == [
                (WatchEventType.PUT, "n9"),
                (WatchEventType.DELETE, "n9"),
            ]
            assert NodeRecord.from_json(events[0].value or b"") == node("n9")

    run(body())


def test_unavailable_when_the_backend_is_cut_off(open_faulty_store: Any, run: Run) -> None:
    async def body() -> None:
        async with open_faulty_store() as (store, outage):
            await store.create_volume(volume("vol-1"))
            start = await store.current_revision()
            watch = store.watch_prefix("volumes", start_revision=start + 1)
            await asyncio.wait_for(watch.established(), 10)
            first = asyncio.ensure_future(watch.__anext__())
            outage()
            with pytest.raises(StoreUnavailableError):
                await asyncio.wait_for(first, 10)  # an open watch breaks, too
            for call in (store.get_volume("vol-1"), store.list_volumes(),
                         store.create_volume(volume("vol-2")), store.grant_lease(5),
                         store.keep_alive_once(1), store.put_node(node("n1"), 1)):
                started = time.monotonic()
                with pytest.raises(StoreUnavailableError):
                    await call
                assert time.monotonic() - started < 3.0  # bounded by the deadline
            with pytest.raises(StoreUnavailableError):
                await collect(store, "volumes", 1)
            with pytest.raises(StoreUnavailableError):  # opening says so, too
                await store.watch_prefix("volumes").established()

    run(body())


def test_fails_over_to_next_endpoint(private_etcd: EtcdServer, etcd_server: EtcdServer,
                                     open_etcd_store: Any, run: Run) -> None:
    async def body() -> None:
        dead = private_etcd.endpoint
        private_etcd.stop()
        live = etcd_server.endpoint.removeprefix("http://")  # both endpoint forms work
        async with open_etcd_store(endpoints=[dead, live]) as store:
            created = await store.create_volume(volume("vol-1"))
            assert await store.get_volume("vol-1") == created

    run(body())


def test_prefixes_are_isolated(open_etcd_store: Any, prefix: str, run: Run) -> None:
    async def body() -> None:
        async with (open_etcd_store(prefix=prefix + "a") as a,
                    open_etcd_store(prefix=prefix + "ab") as b):
            start = await a.current_revision()
            watch_b = asyncio.create_task(collect(b, "volumes", 1, start_revision=start + 1))
            va = await a.create_volume(volume("vol-1", name="same"))
            vb = await b.create_volume(volume("vol-1", name="same", size_bytes=5))
            await a.put_node(node("n1"), await a.grant_lease(5))
            assert [v.value for v in await a.list_volumes()] == [va.value]
            assert [v.value for v in await b.list_volumes()] == [vb.value]
            assert await b.list_nodes() == []
            events = await asyncio.wait_for(watch_b, 10)
            assert VolumeRecord.from_json(events[0].value or b"") == vb.value
            await a.delete_volume("vol-1", va.mod_revision)
            assert await b.get_volume("vol-1") == vb
            assert await b.volume_id_for_name("same") == "vol-1"

    run(body())


def test_watch_from_compacted_revision(compact: Any, open_store: Any, run: Run) -> None:
    async def body() -> None:
        async with open_store() as store:
            v0 = await store.create_volume(volume("vol-1"))
            v1 = await store.update_volume(v0.value.with_(epoch=1), v0.mod_revision)
            await compact(store, v1.mod_revision)
            with pytest.raises(CompactedError) as compacted:
                await collect(store, "volumes", 1, start_revision=v0.mod_revision)
            assert compacted.value.compact_revision == v1.mod_revision
            # The compaction revision itself is still there to watch from.
            replay = await asyncio.wait_for(
                collect(store, "volumes", 1, start_revision=v1.mod_revision), 10)
            assert [e.mod_revision for e in replay] == [v1.mod_revision]
            # The documented recovery: re-list, then watch from the listing's revision.
            assert [v.mod_revision for v in await store.list_volumes()] == [v1.mod_revision]

    run(body())
