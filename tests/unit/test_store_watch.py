"""``Watch``, what ``Store.watch_prefix`` returns: opened lazily, ``established()`` shared by
a concurrent iteration, closed for good by ``aclose()`` (on MemoryStore; the contract tests
run the etcd side)."""

from __future__ import annotations

import asyncio

import pytest

from csi_driver.state.errors import StoreError
from csi_driver.state.memory import ManualClock, MemoryStore
from csi_driver.state.model import NodeRecord, pairs
from csi_driver.state.store import WatchEventType


def node(node_id: str) -> NodeRecord:
    return NodeRecord(node_id=node_id, agent_address=f"{node_id}:1", replica_address=f"{node_id}:2",
                      pool_kind="file", total_bytes=10, free_bytes=5,
                      topology=pairs({"zone": "a"}), max_volumes=4)


def test_a_watch_from_now_sees_every_change_after_it_is_established() -> None:
    async def body() -> None:
        store = MemoryStore(ManualClock())
        lease = await store.grant_lease(5)
        await store.put_node(node("n0"), lease)  # before the watch: not seen
        watch = store.watch_prefix("nodes")
        iterating = asyncio.ensure_future(anext(watch))  # an iteration waiting meanwhile
        await watch.established()
        await watch.established()  # idempotent
        put = await store.put_node(node("n1"), lease)
        event = await asyncio.wait_for(iterating, 1)
        assert (event.type, event.key, event.mod_revision) == (
            WatchEventType.PUT, "n1", put.mod_revision)
        await watch.aclose()
        with pytest.raises(StopAsyncIteration):
            await anext(watch)
        await store.close()

    asyncio.run(body())


def test_a_closed_watch_is_never_established() -> None:
    async def body() -> None:
        store = MemoryStore(ManualClock())
        watch = store.watch_prefix("volumes")
        await watch.aclose()  # never opened: nothing to cancel
        with pytest.raises(StoreError, match="closed"):
            await watch.established()
        with pytest.raises(ValueError):
            store.watch_prefix("names")  # refused at once, not on first use

    asyncio.run(body())
