"""Node liveness and capacity reporting: the node's record in etcd, bound to its lease.

The node grants a lease (TTL from config), writes ``nodes/<id>`` attached to it and renews
it every TTL/3. If the lease is lost (etcd expired it while we were cut off) it registers
again with a new lease. ``last_renewed`` (monotonic) is what self-fencing reads: an owner
that has not renewed for TTL minus a margin stops acknowledging writes.
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
from csi_driver.state.model import NodeRecord
from csi_driver.state.store import Store
from replication.pool.base import Pool

log = logging.getLogger(__name__)

POOL_CHECK_S = 10.0


class _PoolUnusable(Exception):
    """The pool's capacity could not be read."""


class Membership:
    def __init__(
        self, config: NodeConfig, store: Store, pool: Pool, staged_count: Callable[[], int]
    ) -> None:
        self._config = config
        self._store = store
        self._pool = pool
        self._staged_count = staged_count
        self._lease: int | None = None
        self._dirty = asyncio.Event()
        self.last_renewed = 0.0
        self.pool_error: str | None = None  # the last capacity check's failure
        self._pool_checked = 0.0

    def capacity_changed(self) -> None:
        self._dirty.set()

    def readiness(self) -> str | None:
        """None when this node is fit to take volumes (``health.readiness``)."""
        renewed = self.last_renewed if self._lease is not None else None
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
        self._lease = await self._store.grant_lease(ttl)
        await self._store.put_node(await self._record(), self._lease)
        self.last_renewed = sent
        log.info("node=%s registered lease=%x ttl=%.1fs", self._config.node_id, self._lease, ttl)

    async def run(self) -> None:
        """Renew forever; re-register after a lost lease; republish capacity when dirty."""
        interval = self._config.lease_ttl_s / 3
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), timeout=interval)
            try:
                if self._lease is None:
                    await self.register()
                    continue
                sent = time.monotonic()
                await self._store.keep_alive_once(self._lease)
                self.last_renewed = sent
                if time.monotonic() - self._pool_checked >= POOL_CHECK_S:
                    self._dirty.set()  # a fresh capacity, and proof the pool still answers
                if self._dirty.is_set():
                    self._dirty.clear()
                    await self._store.put_node(await self._record(), self._lease)
            except _PoolUnusable as exc:
                log.warning("node=%s pool check failed: %s", self._config.node_id, exc)
            except store_errors.LeaseExpiredError:
                log.warning("node=%s lease expired; registering again", self._config.node_id)
                self._lease = None
            except store_errors.StoreError as exc:
                log.warning("node=%s lease renewal failed: %s", self._config.node_id, exc)

    async def leave(self) -> None:
        if self._lease is not None:
            with contextlib.suppress(store_errors.StoreError):
                await self._store.revoke_lease(self._lease)
            self._lease = None
