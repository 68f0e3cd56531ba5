"""Contract tests for leases: node keys live and die with their lease; LeaseKeeper.

Against every Store (``open_store``): expiry without renewal, renewal, revocation and
re-registration. Against real etcd processes only, because LeaseKeeper speaks etcd's
keep-alive stream: survival with LeaseKeeper, loss reporting (revoked lease, unreachable
etcd) and riding out an etcd restart.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from csi_driver.state.errors import LeaseExpiredError
from csi_driver.state.etcd import LeaseKeeper
from csi_driver.state.etcd_server import EtcdServer
from csi_driver.state.model import NodeRecord, pairs

Run = Callable[[Any], Any]


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


async def wait_until(cond: Callable[[], Any], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not await cond():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


def test_node_keys_vanish_after_lease_expiry(open_store: Any, run: Run) -> None:
    async def body() -> None:
        async with open_store() as store:
            lease = await store.grant_lease(2)
            stored = await store.put_node(node("n1"), lease)
            assert stored.lease == lease
            got = await store.get_node("n1")
            assert got is not None and got.value == node("n1") and got.lease == lease
            assert [n.value.node_id for n in await store.list_nodes()] == ["n1"]

            async def gone() -> Any:
                return not await store.list_nodes()

            started = time.monotonic()
            assert await wait_until(gone, timeout_s=6.0)
            assert time.monotonic() - started >= 1.0  # not before (most of) the TTL
            assert await store.get_node("n1") is None
            with pytest.raises(LeaseExpiredError):
                await store.keep_alive_once(lease)
            with pytest.raises(LeaseExpiredError):
                await store.put_node(node("n1"), lease)

    run(body())


def test_renewal_restarts_the_ttl_and_revoke_deletes(open_store: Any, run: Run) -> None:
    async def body() -> None:
        async with open_store() as store:
            lease = await store.grant_lease(2)
            first = await store.put_node(node("n1"), lease)
            for _ in range(3):  # 3 s in all: longer than the TTL, renewed every second
                await asyncio.sleep(1.0)
                assert await store.keep_alive_once(lease) == 2
            again = await store.put_node(node("n1"), lease)  # a refresh keeps the key's birth
            assert again.create_revision == first.create_revision
            assert again.mod_revision > first.mod_revision
            assert await store.get_node("n1") == again
            await store.revoke_lease(lease)
            await store.revoke_lease(lease)  # idempotent
            assert await store.list_nodes() == []
            with pytest.raises(LeaseExpiredError):
                await store.keep_alive_once(lease)

    run(body())


def test_node_keys_survive_while_kept_alive(open_etcd_store: Any, run: Run) -> None:
    async def body() -> None:
        async with open_etcd_store() as store:
            lease = await store.grant_lease(2)
            assert 1 <= await store.keep_alive_once(lease) <= 2
            await store.put_node(node("n1"), lease)
            lost: list[bool] = []
            keeper = LeaseKeeper(store, lease, 2.0, lambda: lost.append(True))
            first = keeper.last_renewed_monotonic
            keeper.start()
            try:
                await asyncio.sleep(4.5)  # more than twice the TTL
                assert [n.value.node_id for n in await store.list_nodes()] == ["n1"]
                assert keeper.last_renewed_monotonic > first
                assert time.monotonic() - keeper.last_renewed_monotonic < 1.5
                assert keeper.expires_monotonic() > time.monotonic()
                assert not lost
            finally:
                await keeper.stop()
            await store.revoke_lease(lease)
            await store.revoke_lease(lease)  # idempotent
            assert await store.list_nodes() == []

    run(body())


@pytest.mark.parametrize("cause", ["revoked", "etcd down"])
def test_lease_keeper_reports_loss(cause: str, private_etcd: EtcdServer, open_etcd_store: Any,
                                   run: Run) -> None:
    async def body() -> None:
        async with open_etcd_store(endpoints=[private_etcd.endpoint], timeout_s=1.0) as store:
            lost = asyncio.Event()
            keeper = LeaseKeeper(store, await store.grant_lease(2), 2.0, lost.set)
            keeper.start()
            try:
                await asyncio.sleep(0.5)
                if cause == "revoked":
                    await store.revoke_lease(keeper.lease_id)
                else:
                    private_etcd.stop()  # unreachable: lost once a whole TTL passed unrenewed
                await asyncio.wait_for(lost.wait(), timeout=4.0)
                assert keeper.lost
                if cause == "etcd down":
                    assert time.monotonic() >= keeper.expires_monotonic()
            finally:
                await keeper.stop()

    run(body())


def test_lease_keeper_rides_out_an_etcd_restart(private_etcd: EtcdServer,
                                                 open_etcd_store: Any, run: Run) -> None:
    async def body() -> None:
        async with open_etcd_store(endpoints=[private_etcd.endpoint], timeout_s=1.0) as store:
            lease = await store.grant_lease(3)
            await store.put_node(node("n1"), lease)
            lost: list[bool] = []
            keeper = LeaseKeeper(store, lease, 3.0, lambda: lost.append(True))
            keeper.start()
            try:
                await asyncio.sleep(0.3)
                private_etcd.stop()  # same data dir and ports: a restart, not a new cluster
                await asyncio.sleep(0.5)
                private_etcd.start()
                renewed = keeper.last_renewed_monotonic

                async def renewed_again() -> bool:
                    return keeper.last_renewed_monotonic > renewed

                assert await wait_until(renewed_again, timeout_s=3.0)
                assert not lost
                assert [n.value.node_id for n in await store.list_nodes()] == ["n1"]
            finally:
                await keeper.stop()

    run(body())
