"""LeaseKeeper: keeps a node's etcd lease alive and knows when it may have lapsed.

The agent's node key (and anything else it holds) is attached to one lease.
The keeper renews it over a LeaseKeepAlive stream and records when the last
renewal that etcd accepted was sent, which is what self-fencing needs: the lease
cannot expire before that moment plus the TTL, measured on the local monotonic
clock. Re-exported from csi_driver.state.etcd.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc.aio

from csi_driver._gen import etcd_pb2
from csi_driver.state.errors import StoreError, StoreUnavailableError
from csi_driver.state.etcd_ops import stream_write

if TYPE_CHECKING:
    from csi_driver.state.etcd import EtcdStore

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Keeps one lease alive over a LeaseKeepAlive stream, renewing every ttl/3.

    ``last_renewed_monotonic`` is the local monotonic time at which the last
    successful renewal was *sent*; the lease cannot expire before that time plus
    the TTL, so a holder that stops serving by ``expires_monotonic()`` can never
    outlive its lease (self-fencing). ``on_lost`` is called once, when etcd
    reports the lease gone or no renewal succeeded for a whole TTL.
    """

    def __init__(
        self,
        store: EtcdStore,
        lease_id: int,
        ttl_s: float,
        on_lost: Callable[[], None],
        granted_monotonic: float | None = None,
    ) -> None:
        """``granted_monotonic``: when the grant request was sent (default: now)."""
        self.lease_id = lease_id
        self.ttl_s = ttl_s
        self.last_renewed_monotonic = (
            time.monotonic() if granted_monotonic is None else granted_monotonic
        )
        self.lost = False
        self._store = store
        self._on_lost = on_lost
        self._task: asyncio.Task[None] | None = None

    def expires_monotonic(self) -> float:
        return self.last_renewed_monotonic + self.ttl_s

    def start(self) -> asyncio.Task[None]:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name=f"lease-keeper-{self.lease_id:x}")
        return self._task

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def _lose(self, why: str) -> None:
        if not self.lost:
            self.lost = True
            log.warning("lease %x lost: %s", self.lease_id, why)
            self._on_lost()

    async def run(self) -> None:
        interval = self.ttl_s / 3
        request = etcd_pb2.LeaseKeepAliveRequest(ID=self.lease_id)
        while not self.lost:
            call = self._store.open_keepalive_stream()
            try:
                while True:
                    sent = time.monotonic()
                    await stream_write(call, request)
                    resp = await asyncio.wait_for(call.read(), interval)
                    if not isinstance(resp, etcd_pb2.LeaseKeepAliveResponse):
                        raise StoreUnavailableError("keep-alive stream closed by etcd")
                    if resp.TTL <= 0:
                        self._lose("etcd reports it expired or revoked")
                        return
                    self.last_renewed_monotonic = sent
                    await asyncio.sleep(interval)
            except (grpc.aio.AioRpcError, StoreError, TimeoutError) as exc:
                log.info("lease %x renewal failed: %s", self.lease_id, exc)
                self._store.fail_over()
            except Exception:
                # A keeper that dies silently would leave the holder serving past its
                # lease: treat anything unexpected as a failed renewal and carry on.
                log.exception("lease %x renewal failed unexpectedly", self.lease_id)
            finally:
                call.cancel()
            if time.monotonic() >= self.expires_monotonic():
                self._lose(f"no renewal for {self.ttl_s} s")
                return
            await asyncio.sleep(min(interval, 0.2))
