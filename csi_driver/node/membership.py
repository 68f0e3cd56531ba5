"""Node liveness and capacity reporting: the node's record in etcd, bound to its lease.

The node grants a lease (TTL from config) and writes ``nodes/<id>`` attached to it; the
project's one lease keeper (``csi_driver.state.lease.LeaseKeeper``, the same one a target
keeps its claim with) renews it every TTL/3. If the lease is lost (etcd expired it, or no
renewal succeeded for a whole TTL) the node registers again with a new lease. Capacity is
republished when it changed and every POOL_CHECK_S (which also proves the pool answers).
``last_renewed`` (monotonic, when the last accepted renewal was sent) feeds readiness.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from csi_driver.config import TOPOLOGY_KEY, NodeConfig
from csi_driver.node.health import readiness
from csi_driver.state import errors as store_errors
from csi_driver.state.etcd import EtcdStore
from csi_driver.state.lease import LeaseKeeper
from csi_driver.state.model import NodeRecord
from replication.pool.base import Pool

log = logging.getLogger(__name__)

POOL_CHECK_S = 10.0


class _PoolUnusable(Exception):
    """The pool's capacity could not be read."""


class Membership:
    def __init__(
        self, config: NodeConfig, store: EtcdStore, pool: Pool,
        staged_count: Callable[[], int],
    ) -> None:
        self._config = config
        self._store = store
        self._pool = pool
        self._staged_count = staged_count
        self._keeper: LeaseKeeper | None = None
        self._dirty = asyncio.Event()
        self.pool_error: str | None = None  # the last capacity check's failure
        self._pool_checked = 0.0

    @property
    def _lease(self) -> int | None:
        """The lease our record is bound to, while it is not known to be lost."""
        keeper = self._keeper
        return keeper.lease_id if keeper is not None and not keeper.lost else None

    @property
    def last_renewed(self) -> float:
        return self._keeper.last_renewed_monotonic if self._keeper is not None else 0.0

    def capacity_changed(self) -> None:
        self._dirty.set()

    def readiness(self) -> str | None:
        """None when this node is fit to take volumes (``health.readiness``)."""
        renewed = self.last_renewed if self._keeper is not None else None
        return readiness(time.monotonic(), renewed, self._config.lease_ttl_s, self.pool_error)

    async def _record(self) -> NodeRecord:
        self._pool_checked = time.monotonic()
        try:
            capacity = await asyncio.to_thread(self._pool.capacity)
        except Exception as exc:  # the lease is renewed regardless: the node is alive
            self.pool_error = str(exc) or type(exc).__name__
            raise _PoolUnusable(self.pool_error) from exc
        self.pool_error = None
        return NodeRecord(
            node_id=self._config.node_id,
            agent_address=self._config.agent_address,
            replica_address=self._config.replica_address,
            pool_kind=self._pool.kind,
            total_bytes=capacity.total_bytes,
            free_bytes=capacity.free_bytes,
            topology=((TOPOLOGY_KEY, self._config.node_id),),
            max_volumes=self._config.max_volumes,
        )

    async def register(self) -> None:
        ttl = self._config.lease_ttl_s
        sent = time.monotonic()  # the lease runs from the grant's send, not its answer
        lease = await self._store.grant_lease(ttl)
        await self._store.put_node(await self._record(), lease)
        await self._stop_keeper()
        self._keeper = LeaseKeeper(self._store, lease, ttl, self._dirty.set,
                                   granted_monotonic=sent)
        self._keeper.start()
        log.info("node=%s registered lease=%x ttl=%.1fs", self._config.node_id, lease, ttl)

    async def run(self) -> None:
        """Re-register after a lost lease; republish capacity when dirty (the keeper renews)."""
        interval = self._config.lease_ttl_s / 3
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), timeout=interval)
            try:
                lease = self._lease
                if lease is None:
                    if self._keeper is not None:
                        log.warning("node=%s lease lost; registering again",
                                    self._config.node_id)
                    self._dirty.clear()
                    await self.register()
                    continue
                if time.monotonic() - self._pool_checked >= POOL_CHECK_S:
                    self._dirty.set()  # a fresh capacity, and proof the pool still answers
                if self._dirty.is_set():
                    self._dirty.clear()
                    await self._store.put_node(await self._record(), lease)
            except _PoolUnusable as exc:
                log.warning("node=%s pool check failed: %s", self._config.node_id, exc)
            except store_errors.LeaseExpiredError:
                log.warning("node=%s lease expired; registering again", self._config.node_id)
                await self._stop_keeper()
                self._keeper = None
            except store_errors.StoreError as exc:
                log.warning("node=%s registration or capacity update failed: %s",
                            self._config.node_id, exc)

    async def _stop_keeper(self) -> None:
        if self._keeper is not None:
            await self._keeper.stop()

    async def leave(self) -> None:
        lease = self._lease
        await self._stop_keeper()
        self._keeper = None
        if lease is not None:
            with contextlib.suppress(store_errors.StoreError):
                await self._store.revoke_lease(lease)
