"""The data plane's ``Authority`` over etcd: ISR changes by CAS, the ownership lease and
the self-fencing clock, and regaining the claim after an etcd outage.

A target may only change the ISR while the volume record still names it as owner at its
epoch; otherwise another node took over and the target is fenced (I2/I3). When etcd cannot
be reached, a change is retried until a deadline and then reported as unavailable, so the
write that needed it is not acknowledged. The authority owns the claim's lease: it keeps it
alive, says when it may have lapsed (``may_acknowledge``, a safety margin before the lease
can expire in etcd), and after a lapse takes the claim again at the same epoch in one
transaction with a fresh lease (``regain``), unless the epoch moved meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

from csi_driver.state import errors as store_errors
from csi_driver.state.etcd import EtcdStore, LeaseKeeper
from csi_driver.state.model import OwnerClaim, Versioned, VolumeRecord
from csi_driver.state.store import Store
from replication.authority import AuthorityUnavailableError, FencedError, ResyncProgress

log = logging.getLogger(__name__)

CHANGE_DEADLINE_S = 10.0
# An owner stops acknowledging this long before its lease can expire in etcd: covers the
# clock-rate difference between this node and etcd's leader and the scheduling delay of
# the check itself. A named constant with a test, because at 0 s the margin is gone.
SELF_FENCE_MARGIN_S = 0.5
_CAS_RETRIES = 8


def isr_after_removal(record: VolumeRecord, node_ids: frozenset[str]) -> tuple[str, ...]:
    """The ISR without ``node_ids``; FencedError rather than an empty one (I1a: the last
    in-sync member stays the source of truth, whatever failed)."""
    isr = tuple(n for n in record.isr if n not in node_ids)
    if not isr and record.isr:
        raise FencedError(f"refusing to remove the last in-sync replicas {list(record.isr)} "
                          f"of {record.volume_id}")
    return isr


def fence_margin(ttl_s: float) -> float:
    """The self-fencing margin for a lease of ``ttl_s`` (at most half of it)."""
    return min(SELF_FENCE_MARGIN_S, ttl_s / 2)


class Keeper(Protocol):
    """What the authority needs of a lease keeper (``LeaseKeeper`` over etcd)."""

    lease_id: int
    lost: bool

    def expires_monotonic(self) -> float: ...
    def start(self) -> object: ...
    async def stop(self) -> None: ...


class EtcdAuthority:
    def __init__(
        self, store: Store, volume_id: str, node_id: str, epoch: int, lease_id: int,
        lease_ttl_s: int, granted_monotonic: float, *,
        clock: Callable[[], float] = time.monotonic,
        change_deadline_s: float = CHANGE_DEADLINE_S,
    ) -> None:
        """``granted_monotonic``: when the grant of ``lease_id`` was *sent* (the node did
        it, in the takeover transaction): the lease cannot expire before that plus TTL.
        ``clock`` and ``change_deadline_s`` let the simulation drive time."""
        self._clock = clock
        self._change_deadline_s = change_deadline_s
        self._store = store
        self._volume_id = volume_id
        self._node_id = node_id
        self._epoch = epoch
        self._ttl_s = lease_ttl_s
        self._margin_s = fence_margin(lease_ttl_s)
        self.claim = OwnerClaim(node_id, epoch)
        self.keeper = self._keeper(lease_id, granted_monotonic)

    def _ctx(self) -> str:
        return f"volume={self._volume_id} node={self._node_id} epoch={self._epoch}"

    def _keeper(self, lease_id: int, granted_monotonic: float) -> Keeper:
        assert isinstance(self._store, EtcdStore), "over other stores, override _keeper"
        return LeaseKeeper(self._store, lease_id, self._ttl_s,
                           on_lost=lambda: log.error("%s ownership lease lost", self._ctx()),
                           granted_monotonic=granted_monotonic)

    def start(self) -> None:
        self.keeper.start()

    def may_acknowledge(self) -> bool:
        keeper = self.keeper
        return not keeper.lost and self._clock() < keeper.expires_monotonic() - self._margin_s

    async def regain(self) -> None:
        if self.may_acknowledge():
            return  # the keeper got through again before the lease could lapse
        try:
            found = await self._ours()
            claim = await self._store.get_owner(self._volume_id)
            if claim is not None and claim != self.claim:
                raise FencedError(f"volume {self._volume_id} is claimed by {claim.node_id} "
                                  f"at epoch {claim.epoch}")
            sent = self._clock()
            lease_id = await self._store.grant_lease(self._ttl_s)
            try:
                # The record is rewritten unchanged: the CAS proves the epoch did not move
                # between the check above and the claim.
                await self._store.take_ownership(found.value, found.mod_revision, self.claim,
                                                 lease_id, replaces=claim)
            except BaseException:
                with contextlib.suppress(store_errors.StoreError):
                    await self._store.revoke_lease(lease_id)
                raise
        except (store_errors.StoreUnavailableError, store_errors.ConflictError) as exc:
            raise AuthorityUnavailableError(f"claim not regained yet: {exc}") from exc
        old, self.keeper = self.keeper, self._keeper(lease_id, sent)
        await old.stop()
        self.keeper.start()
        with contextlib.suppress(store_errors.StoreError):
            await self._store.revoke_lease(old.lease_id)  # its claim was moved to the new one
        log.warning("%s claim regained with lease %x after it lapsed", self._ctx(), lease_id)

    async def release(self) -> None:
        """Give the claim back and revoke its lease (a stop, or a start that failed)."""
        with contextlib.suppress(store_errors.StoreError):
            await self._store.release_owner(self._volume_id, self.claim)
        await self.keeper.stop()
        with contextlib.suppress(store_errors.StoreError):
            await self._store.revoke_lease(self.keeper.lease_id)

    async def remove_from_isr(self, node_ids: frozenset[str], reason: str) -> tuple[str, ...]:
        deadline = self._clock() + self._change_deadline_s
        delay = 0.05
        while True:
            try:
                return await self._try_remove(node_ids, reason)
            except store_errors.ConflictError:
                # Someone else changed the record: re-read and re-check the epoch.
                if self._clock() > deadline:
                    raise AuthorityUnavailableError("the volume record keeps changing") from None
                continue
            except store_errors.StoreUnavailableError as exc:
                if self._clock() + delay > deadline:
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
        isr = isr_after_removal(record, node_ids)
        if isr == record.isr:
            return isr
        await self._store.update_volume(record.with_(isr=isr), found.mod_revision)
        log.warning("%s isr shrunk to %s: removed %s (%s)", self._ctx(), list(isr),
                    sorted(node_ids), reason)
        return isr

    async def add_to_isr(self, node_id: str) -> tuple[str, ...]:
        for _ in range(_CAS_RETRIES):
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
            log.info("%s replica %s joined the ISR: %s", self._ctx(), node_id, list(isr))
            return isr
        raise AuthorityUnavailableError("the volume record keeps changing")

    async def report_progress(self, node_id: str, progress: ResyncProgress | None) -> None:
        try:
            await self._store.put_progress(self._volume_id, node_id, progress)
        except store_errors.StoreError as exc:
            log.debug("volume=%s progress not published: %s", self._volume_id, exc)
