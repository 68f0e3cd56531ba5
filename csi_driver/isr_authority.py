"""The data plane's ``Authority`` over etcd: ISR shrink by CAS, and the self-fencing clock.

A target may only remove a replica from the ISR while the volume record still names it as
owner at its epoch; otherwise another node took over and the target is fenced (I2/I3). When
etcd cannot be reached, the change is retried until a deadline and then reported as
unavailable, so the write that needed it is not acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from csi_driver.state import errors as store_errors
from csi_driver.state.model import Versioned, VolumeRecord
from csi_driver.state.store import Store
from replication.authority import AuthorityUnavailableError, FencedError, ResyncProgress

log = logging.getLogger(__name__)

CHANGE_DEADLINE_S = 10.0


class EtcdAuthority:
    def __init__(
        self, store: Store, volume_id: str, node_id: str, epoch: int, lease_ttl_s: float,
        safety_margin_s: float = 0.5,
    ) -> None:
        self._store = store
        self._volume_id = volume_id
        self._node_id = node_id
        self._epoch = epoch
        self._margin_s = min(safety_margin_s, lease_ttl_s / 2)
        started = time.monotonic() + lease_ttl_s
        # When our ownership lease may have expired; the target process points this at
        # its LeaseKeeper, whose clock starts when a renewal is *sent* (conservative).
        self.expires: Callable[[], float] = lambda: started

    def may_acknowledge(self) -> bool:
        return time.monotonic() < self.expires() - self._margin_s

    async def remove_from_isr(self, node_ids: frozenset[str], reason: str) -> tuple[str, ...]:
        deadline = time.monotonic() + CHANGE_DEADLINE_S
        delay = 0.05
        while True:
            try:
                return await self._try_remove(node_ids, reason)
            except store_errors.ConflictError:
                continue  # someone else changed the record: re-read and re-check the epoch
            except store_errors.StoreUnavailableError as exc:
                if time.monotonic() + delay > deadline:
                    raise AuthorityUnavailableError(f"etcd unavailable: {exc}") from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _ours(self) -> Versioned[VolumeRecord]:
        found = await self._store.get_volume(self._volume_id)
        if found is None:
            raise FencedError(f"volume {self._volume_id} no longer exists")
        record = found.value
        if record.epoch != self._epoch or record.owner != self._node_id:
            raise FencedError(
                f"volume {self._volume_id} is now owned by {record.owner} at epoch "
                f"{record.epoch} (ours: {self._node_id} at {self._epoch})"
            )
        return found

    async def _try_remove(self, node_ids: frozenset[str], reason: str) -> tuple[str, ...]:
        found = await self._ours()
        record = found.value
        isr = tuple(n for n in record.isr if n not in node_ids)
        if isr == record.isr:
            return isr
        await self._store.update_volume(record.with_(isr=isr), found.mod_revision)
        log.warning("volume=%s node=%s epoch=%d isr shrunk to %s: removed %s (%s)",
                    self._volume_id, self._node_id, self._epoch, list(isr),
                    sorted(node_ids), reason)
        return isr

    async def add_to_isr(self, node_id: str) -> tuple[str, ...]:
        for _ in range(8):
            found = await self._ours()
            record = found.value
            if node_id not in record.replica_nodes():
                raise FencedError(f"{node_id} is no longer a replica of {self._volume_id}")
            if node_id in record.isr:
                return record.isr
            isr = (*record.isr, node_id)
            try:
                await self._store.update_volume(record.with_(isr=isr), found.mod_revision)
            except store_errors.ConflictError:
                continue
            log.info("volume=%s node=%s epoch=%d replica %s joined the ISR: %s",
                     self._volume_id, self._node_id, self._epoch, node_id, list(isr))
            return isr
        raise AuthorityUnavailableError("the volume record keeps changing")

    async def report_progress(self, node_id: str, progress: ResyncProgress | None) -> None:
        try:
            await self._store.put_progress(self._volume_id, node_id, progress)
        except store_errors.StoreError as exc:
            log.debug("volume=%s progress not published: %s", self._volume_id, exc)
