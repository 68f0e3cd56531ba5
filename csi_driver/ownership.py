"""Volume ownership: who may write a volume, moved only by etcd compare-and-swap.

Staging a volume on a node makes that node the owner and bumps the volume's epoch (I2);
unstaging releases it. Liveness of an owner is its target's claim (``owners/<volume>``,
bound to the target's own lease): a volume whose owner still holds a live claim is refused
with a retryable error (RWO); one whose claim is gone (released, or the lease expired
because the owner died or is cut off) is taken over at once (I6). Every acquisition bumps
the epoch, even by the same node, so a zombie target from an earlier stage is fenced too.
"""

from __future__ import annotations

import asyncio
import logging
import time

from csi_driver import errors
from csi_driver.state import errors as store_errors
from csi_driver.state.model import VolumePhase, VolumeRecord
from csi_driver.state.store import Store

log = logging.getLogger(__name__)

_CAS_RETRIES = 8
# While a dying owner's claim lapses, a takeover polls it: every poll is a cheap etcd read and
# lasts at most the claim wait (TTL + 1 s), and each 100 ms of poll period added ~50 ms to the
# average failover. (A watch on the key would remove even that; not needed yet.)
CLAIM_POLL_S = 0.025


class Ownership:
    def __init__(self, store: Store, node_id: str, claim_wait_s: float = 0.0) -> None:
        self._store = store
        self._node_id = node_id
        # How long a stage waits for another owner's claim to lapse before answering "held":
        # one lease TTL covers an owner that just died, so the takeover needs no CO retry.
        self._claim_wait_s = claim_wait_s

    async def acquire(self, volume_id: str) -> VolumeRecord:
        """Become the owner of ``volume_id``; return the record with our epoch."""
        for _ in range(_CAS_RETRIES):
            found = await self._store.get_volume(volume_id)
            if found is None or found.value.phase is not VolumePhase.READY:
                raise errors.NotFoundError(f"volume {volume_id} does not exist")
            record = found.value
            owner = record.owner
            if owner not in (None, self._node_id) and await self._claim_held(volume_id, owner):
                raise errors.FailedPreconditionError(
                    f"volume {volume_id} is staged on node {owner}, which still serves it; "
                    "unstage it there first (retry later)"
                )
            new = record.with_(owner=self._node_id, epoch=record.epoch + 1)
            try:
                await self._store.update_volume(new, found.mod_revision)
            except store_errors.ConflictError:
                continue
            log.info(
                "volume=%s node=%s epoch=%d acquired (previous owner %s)",
                volume_id, self._node_id, new.epoch, record.owner,
            )
            return new
        raise errors.OperationPendingError(f"volume {volume_id} ownership keeps changing")

    async def _claim_held(self, volume_id: str, owner: str | None) -> bool:
        """True while ``owner``'s claim lives, waiting up to ``claim_wait_s`` for it to lapse."""
        deadline = time.monotonic() + self._claim_wait_s
        while True:
            claim = await self._store.get_owner(volume_id)
            if claim is None or claim.node_id != owner:
                return False
            if time.monotonic() >= deadline:
                return True
            await asyncio.sleep(CLAIM_POLL_S)

    async def exists(self, volume_id: str) -> bool:
        found = await self._store.get_volume(volume_id)
        return found is not None and found.value.phase is VolumePhase.READY

    async def release(self, volume_id: str) -> None:
        """Give up ownership if we hold it (idempotent)."""
        for _ in range(_CAS_RETRIES):
            found = await self._store.get_volume(volume_id)
            if found is None or found.value.owner != self._node_id:
                return
            try:
                await self._store.update_volume(found.value.with_(owner=None), found.mod_revision)
            except store_errors.ConflictError:
                continue
            log.info("volume=%s node=%s epoch=%d released", volume_id, self._node_id,
                     found.value.epoch)
            return
        raise errors.OperationPendingError(f"volume {volume_id} ownership keeps changing")
