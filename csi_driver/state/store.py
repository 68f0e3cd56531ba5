"""The state-store contract: what the controller and agents may assume about etcd.

``Store`` is abstract so the guarantees are written down in one place, next to
each method, the way patroni documents its DCS: which reads are linearizable,
which writes are compare-and-swap, and which keys live and die with a lease.
``csi_driver.state.etcd.EtcdStore`` is the implementation.

All methods raise ``StoreUnavailableError`` when the backend cannot be reached
within the deadline; a write that failed that way may still have been applied.
"""

from __future__ import annotations

import abc
import asyncio
import enum
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

from csi_driver.state.errors import StoreError
from csi_driver.state.model import NodeRecord, OwnerClaim, Versioned, VolumeRecord
from replication.authority import ResyncProgress

WATCH_KINDS = ("nodes", "volumes")


class WatchEventType(enum.Enum):
    PUT = "PUT"
    DELETE = "DELETE"


@dataclass(frozen=True)
class WatchEvent:
    """One change under a watched prefix.

    ``key`` is the record id (the key relative to ``<prefix><kind>/``); ``value``
    is the record's JSON (decode with ``NodeRecord.from_json`` or
    ``VolumeRecord.from_json``), None for DELETE. ``mod_revision`` is the store
    revision of the change (for DELETE, the revision of the deletion).
    """

    type: WatchEventType
    key: str
    value: bytes | None
    mod_revision: int


# What a Store implementation hands to ``Watch``: None once, when the backend has
# confirmed the watch, then the events.
WatchStream = AsyncGenerator[WatchEvent | None, None]


class Watch(AsyncIterator[WatchEvent]):
    """One watch from ``Store.watch_prefix``: iterate it for events.

    Nothing reaches the backend until the first ``__anext__`` or ``established()``.
    ``established()`` opens the watch if need be and returns once the backend has
    confirmed it (on etcd: the watch-created answer); a watch "from now" then sees every
    change committed after ``established()`` returned. It raises what opening raised
    (StoreUnavailableError, ...); a compacted start revision is reported by iterating.
    ``aclose()`` cancels the watch on the backend and ends the iteration.
    """

    def __init__(self, stream: WatchStream) -> None:
        self._stream = stream
        self._opening = asyncio.Lock()
        self._open = False
        self._closed = False

    async def established(self) -> None:
        async with self._opening:  # one opener; a concurrent caller waits for it
            if self._closed:
                raise StoreError("the watch is closed")
            if self._open:
                return
            marker = await anext(self._stream)
            if marker is not None:
                raise StoreError("the watch stream sent an event before it was established")
            self._open = True

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> WatchEvent:
        if self._closed:
            raise StopAsyncIteration
        await self.established()
        event = await anext(self._stream)
        if event is None:
            raise StoreError("the watch stream was established twice")
        return event

    async def aclose(self) -> None:
        self._closed = True
        await self._stream.aclose()


class Store(abc.ABC):
    """Cluster state: node registrations, volume records, the name index and leases."""

    # -- nodes ---------------------------------------------------------------------------

    @abc.abstractmethod
    async def put_node(self, rec: NodeRecord, lease_id: int) -> Versioned[NodeRecord]:
        """Register or refresh a node, attaching its key to ``lease_id``.

        Unconditional write (last writer wins: only the node itself writes its key).
        The key is deleted by the backend when the lease expires or is revoked.
        Raises LeaseExpiredError if the lease is already gone.
        """

    @abc.abstractmethod
    async def get_node(self, node_id: str) -> Versioned[NodeRecord] | None:
        """Linearizable read of one node; None if absent (never registered or lease lost)."""

    @abc.abstractmethod
    async def list_nodes(self) -> list[Versioned[NodeRecord]]:
        """Linearizable snapshot of all registered nodes, sorted by node id.

        Only nodes whose lease is alive are present: node keys are attached to the
        node's lease, so a node that stopped renewing disappears within its TTL.
        """

    # -- volumes -------------------------------------------------------------------------

    @abc.abstractmethod
    async def create_volume(self, rec: VolumeRecord) -> Versioned[VolumeRecord]:
        """Create-if-absent the volume record and its ``names/<name>`` index entry.

        Both keys are written in one transaction, guarded by "neither key
        exists". Raises AlreadyExistsError, carrying the volume that holds the id
        or the name (or None if that volume vanished meanwhile), if either exists.
        """

    @abc.abstractmethod
    async def get_volume(self, volume_id: str) -> Versioned[VolumeRecord] | None:
        """Linearizable read of one volume; None if absent."""

    @abc.abstractmethod
    async def list_volumes(self) -> list[Versioned[VolumeRecord]]:
        """Linearizable snapshot of all volumes (one revision), sorted by volume id."""

    @abc.abstractmethod
    async def update_volume(
        self, rec: VolumeRecord, expected_mod_revision: int
    ) -> Versioned[VolumeRecord]:
        """Compare-and-swap the record: applied only if its mod_revision is unchanged.

        Returns the stored record with its new revision. Raises ConflictError,
        carrying the current record (None if deleted), when the revision moved.
        The name is immutable: changing it raises ValueError.
        """

    @abc.abstractmethod
    async def delete_volume(self, volume_id: str, expected_mod_revision: int) -> None:
        """Compare-and-delete the record and its name index entry, atomically.

        Raises ConflictError, carrying the current record (None if already
        absent), when the record's mod_revision differs from the expected one.
        """

    @abc.abstractmethod
    async def volume_id_for_name(self, name: str) -> str | None:
        """Linearizable lookup of the name index; None if no volume has the name."""

    # -- ownership claims ----------------------------------------------------------------

    @abc.abstractmethod
    async def take_ownership(
        self, rec: VolumeRecord, expected_mod_revision: int, claim: OwnerClaim,
        lease_id: int, replaces: OwnerClaim | None = None,
    ) -> Versioned[VolumeRecord]:
        """One transaction: CAS the volume record and create ``owners/<volume>``.

        Applied only if the record's mod_revision is ``expected_mod_revision`` *and* the
        claim key is absent (``replaces`` None) or holds exactly ``replaces``; the claim is
        written bound to ``lease_id``. Of two racing takeovers exactly one succeeds, and
        the winner's claim exists from the same revision as its epoch (patroni's
        "leader key + CAS" in one step). Raises ConflictError, carrying the current record,
        when either compare fails (the caller re-reads and decides again), and
        LeaseExpiredError when the lease is already gone. The name is immutable.
        """

    @abc.abstractmethod
    async def get_owner(self, volume_id: str) -> OwnerClaim | None:
        """The live claim on ``volume_id`` (linearizable), None when none is held."""

    @abc.abstractmethod
    async def release_owner(self, volume_id: str, claim: OwnerClaim) -> None:
        """Delete the claim if it is still exactly ``claim`` (idempotent)."""

    async def put_progress(
        self, volume_id: str, node_id: str, progress: ResyncProgress | None
    ) -> None:
        """Publish (None: clear) one replica's rebuild progress; last writer wins."""
        raise NotImplementedError

    async def get_progress(self, volume_id: str) -> dict[str, ResyncProgress]:
        """Published rebuild progress of ``volume_id``, by replica node."""
        raise NotImplementedError

    # -- leases --------------------------------------------------------------------------

    @abc.abstractmethod
    async def grant_lease(self, ttl_s: int) -> int:
        """Grant a new lease of ``ttl_s`` seconds; returns its id."""

    @abc.abstractmethod
    async def keep_alive_once(self, lease_id: int) -> int:
        """Renew the lease once; returns the renewed TTL in seconds.

        Raises LeaseExpiredError if the lease is unknown (expired or revoked).
        The TTL restarts from when the backend received the renewal.
        """

    @abc.abstractmethod
    async def revoke_lease(self, lease_id: int) -> None:
        """Revoke the lease now, deleting every key attached to it.

        Idempotent: revoking an unknown lease succeeds.
        """

    # -- change feed ---------------------------------------------------------------------

    @abc.abstractmethod
    async def current_revision(self) -> int:
        """The store's current revision (linearizable).

        For list-then-watch without gaps: read this first, list, then watch from
        revision + 1; events already reflected in the listing may be replayed.
        """

    @abc.abstractmethod
    def watch_prefix(self, kind: str, start_revision: int | None = None) -> Watch:
        """A watch of the changes to all records of ``kind`` ("nodes" or "volumes").

        Events arrive in revision order, without gaps, from ``start_revision``
        (inclusive; None means changes after the watch is established: await
        ``Watch.established()`` to know when that is). Raises ValueError at once for
        another kind. Iterating raises CompactedError if ``start_revision`` was
        compacted away, and StoreUnavailableError when the backend connection is lost:
        the watcher then re-lists and re-watches. ``aclose()`` the watch to cancel it.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections. The store must not be used afterwards."""
