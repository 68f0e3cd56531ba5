"""Volume ownership: who may write a volume, moved only by one etcd transaction.

Staging a volume on a node makes that node the owner: in **one transaction** the epoch is
bumped by CAS on the volume record and the owner's claim (``owners/<volume>``) is created,
bound to a fresh lease that the volume's target process then keeps alive (I2, I6). Of two
racing stages exactly one wins; the loser re-reads and finds the winner's live claim. A
volume whose claim is live (another node serves it) is refused with a retryable error (RWO);
one whose claim is gone (released, or the lease expired because the owner died or is cut off
from etcd) is taken over at once. Every acquisition bumps the epoch, even by the same node,
so a zombie target from an earlier stage is fenced too.

``decide_takeover`` is the decision, pure; ``Ownership`` reads, decides, acts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from csi_driver import errors
from csi_driver.state import errors as store_errors
from csi_driver.state.model import OwnerClaim, VolumePhase, VolumeRecord
from csi_driver.state.store import Store

log = logging.getLogger(__name__)

_CAS_RETRIES = 8
# While a dying owner's claim lapses, a takeover polls it: every poll is a cheap etcd read and
# lasts at most the claim wait (TTL + 1 s), and each 100 ms of poll period added ~50 ms to the
# average failover. (A watch on the key would remove even that; not needed yet.)
CLAIM_POLL_S = 0.025


@dataclass(frozen=True)
class OwnerLease:
    """The lease our claim is bound to, handed to the target process that keeps it alive.

    ``granted_monotonic`` is when the grant was *sent* (CLOCK_MONOTONIC is system-wide, so
    another process on this node can use it): the lease cannot expire before that moment
    plus ``ttl_s``, which is what the target's self-fencing clock starts from.
    """

    lease_id: int
    ttl_s: int
    granted_monotonic: float


@dataclass(frozen=True)
class Takeover:
    """What ``decide_takeover`` allows: take the volume, replacing ``replaces`` (or none)."""

    replaces: OwnerClaim | None


def decide_takeover(record: VolumeRecord | None, claim: OwnerClaim | None,
                    node_id: str) -> Takeover | str:
    """May ``node_id`` take the volume now? A Takeover, or why not (a sentence).

    Our own claim (a target of ours from an earlier stage, whose lease has not lapsed yet)
    is replaced; the epoch bump fences that target. Anyone else's live claim blocks.
    """
    if record is None or record.phase is not VolumePhase.READY:
        return "absent"
    if claim is None:
        return Takeover(None)
    if claim.node_id == node_id:
        return Takeover(claim)
    return f"staged on node {claim.node_id}, which still serves it"


class Ownership:
    def __init__(self, store: Store, node_id: str, lease_ttl_s: int,
                 claim_wait_s: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._clock = clock
        self._node_id = node_id
        self._ttl_s = lease_ttl_s
        # How long a stage waits for another owner's claim to lapse before answering "held":
        # one lease TTL covers an owner that just died, so the takeover needs no CO retry.
        self._claim_wait_s = claim_wait_s
        self._leases: dict[str, OwnerLease] = {}

    def lease(self, volume_id: str) -> OwnerLease | None:
        """The lease of our current claim on ``volume_id`` (None when we hold none)."""
        return self._leases.get(volume_id)

    async def acquire(self, volume_id: str) -> VolumeRecord:
        """Become the owner of ``volume_id``; return the record with our epoch. The claim's
        lease is then ``lease(volume_id)``: the target must keep it alive, or revoke it."""
        deadline = self._clock() + self._claim_wait_s
        conflicts = 0
        while conflicts < _CAS_RETRIES:
            found = await self._store.get_volume(volume_id)
            claim = await self._store.get_owner(volume_id)
            decision = decide_takeover(found.value if found else None, claim, self._node_id)
            if decision == "absent" or found is None:
                raise errors.NotFoundError(f"volume {volume_id} does not exist")
            if isinstance(decision, str):
                if self._clock() < deadline:  # bounded by the claim wait
                    await asyncio.sleep(CLAIM_POLL_S)
                    continue
                raise errors.FailedPreconditionError(
                    f"volume {volume_id} is {decision}; unstage it there first (retry later)")
            conflicts += 1
            record = found.value
            new = record.with_(owner=self._node_id, epoch=record.epoch + 1)
            lease = await self._grant()
            try:
                await self._store.take_ownership(new, found.mod_revision,
                                                 OwnerClaim(self._node_id, new.epoch),
                                                 lease.lease_id, decision.replaces)
            except store_errors.ConflictError:
                await self._revoke(lease)
                continue
            except BaseException:
                await self._revoke(lease)
                raise
            self._leases[volume_id] = lease
            log.info("volume=%s node=%s epoch=%d acquired (previous owner %s)",
                     volume_id, self._node_id, new.epoch, record.owner)
            return new
        raise errors.OperationPendingError(f"volume {volume_id} ownership keeps changing")

    async def _grant(self) -> OwnerLease:
        sent = self._clock()
        lease_id = await self._store.grant_lease(self._ttl_s)
        return OwnerLease(lease_id, self._ttl_s, sent)

    async def _revoke(self, lease: OwnerLease) -> None:
        # Best effort: a lease we cannot revoke lapses by itself within its TTL.
        with contextlib.suppress(store_errors.StoreError):
            await self._store.revoke_lease(lease.lease_id)

    async def exists(self, volume_id: str) -> bool:
        found = await self._store.get_volume(volume_id)
        return found is not None and found.value.phase is VolumePhase.READY

    async def release(self, volume_id: str) -> None:
        """Give up ownership if we hold it (idempotent): the claim goes with its lease."""
        lease = self._leases.pop(volume_id, None)
        if lease is not None:
            await self._revoke(lease)
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
