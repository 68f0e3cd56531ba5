"""MemoryStore: the Store contract in one process's memory, for unit tests and simulations.

It gives every guarantee ``Store`` documents, the way etcd gives them, so code tested over
it behaves the same over ``EtcdStore`` (tests/contract runs one spec against both):

- Linearizable, trivially: one process, and no method awaits between reading and writing
  state, so every call is one atomic step at one point in time.
- One global revision with etcd's ``mod_revision``/``create_revision`` (memory_kv.KeySpace).
- CAS and create-only writes check every compare, in EtcdStore's order, before applying
  all their keys at one revision: a refused write (ConflictError, AlreadyExistsError,
  InvariantError, LeaseExpiredError, ValueError for a rename) has written nothing.
- Values are kept as the records' JSON bytes: encoded on write, decoded strictly on every
  read, so a caller can never mutate stored state and a corrupt value fails as on etcd.
- Leases run on ``clock`` (default ``time.monotonic``; a ``ManualClock`` for simulations):
  a lease expires when ``clock() >= granted or renewed + ttl``; its expiry deletes every
  key attached to it in one revision, with DELETE events to watchers. Expiry is evaluated
  at every call, by ``expire_leases()``, and at once when a ``ManualClock`` advances.
- Watches replay from ``start_revision`` out of a bounded history; a revision older than
  the history (or than ``compact()``) raises CompactedError, as on etcd.
- Faults: ``set_unavailable(True)`` makes every call, and every open watch, raise
  StoreUnavailableError, like clients cut off from etcd. The store itself keeps running
  meanwhile (leases still expire on its clock), as an etcd quorum behind a partition does.

It must not grow behaviour etcd does not have: it is a test double held to the contract.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import Callable
from typing import TypeVar

from csi_driver.state.errors import (
    AlreadyExistsError,
    ConflictError,
    InvariantError,
    LeaseExpiredError,
    StoreError,
    StoreUnavailableError,
)
from csi_driver.state.memory_kv import DEFAULT_HISTORY, KeySpace
from csi_driver.state.model import (
    NodeRecord,
    OwnerClaim,
    Versioned,
    VolumeRecord,
    transition_problem,
)
from csi_driver.state.store import (
    WATCH_KINDS,
    Store,
    Watch,
    WatchEvent,
    WatchEventType,
    WatchStream,
)
from replication.authority import ResyncProgress

__all__ = ["ManualClock", "MemoryStore"]

Rec = TypeVar("Rec", NodeRecord, VolumeRecord)

# How often a waiting watch re-checks lease expiry on a clock that cannot say it moved.
_EXPIRY_POLL_S = 0.1


class ManualClock:
    """A clock that moves only by ``advance``; a store built on it expires leases at once."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._listeners: list[Callable[[], object]] = []

    def __call__(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"a clock does not go back ({seconds} s)")
        self._now += seconds
        for listener in list(self._listeners):
            listener()

    def subscribe(self, listener: Callable[[], object]) -> None:
        self._listeners.append(listener)

    def unsubscribe(self, listener: Callable[[], object]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)


def _conflict(volume_id: str, expected: int, current: Versioned[VolumeRecord] | None
              ) -> ConflictError:
    return ConflictError(f"volume {volume_id} changed (expected mod_revision {expected})", current)


class MemoryStore(Store):
    """Store in memory. Keys: ``{nodes,volumes,names,owners,progress}/<id>``, as on etcd."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 history: int = DEFAULT_HISTORY) -> None:
        self._clock = clock
        self._kv = KeySpace(history, on_change=self._wake)
        self._waiters: set[asyncio.Event] = set()
        self._available = True
        self._closed = False
        if isinstance(clock, ManualClock):
            clock.subscribe(self.expire_leases)

    # -- fault injection and time --------------------------------------------------------

    @property
    def available(self) -> bool:
        return self._available

    def set_unavailable(self, down: bool = True) -> None:
        """Cut the clients off (``down``) or reconnect them; open watches break at once."""
        self._available = not down
        self._wake()

    def expire_leases(self) -> int:
        """Revoke every lease whose time is up on the clock; returns how many expired."""
        return self._kv.expire(self._clock())

    def compact(self, revision: int) -> None:
        """Forget history before ``revision`` (etcd's Compact): older watches fail."""
        self._kv.compact(revision)

    def _enter(self) -> None:
        """The preamble of every call: the store is usable, reachable and up to date."""
        if self._closed:
            raise StoreError("the memory store is closed")
        if not self._available:
            raise StoreUnavailableError("memory store: unavailable (fault injected)")
        self.expire_leases()

    def _wake(self) -> None:
        for waiter in self._waiters:
            waiter.set()

    def _require_lease(self, lease_id: int) -> None:
        if lease_id and not self._kv.has_lease(lease_id):
            raise LeaseExpiredError(f"lease {lease_id:x} not found (expired or revoked)")

    def _value(self, key: str) -> bytes | None:
        entry = self._kv.entries.get(key)
        return entry.value if entry is not None else None

    def _decode(self, cls: type[Rec], key: str) -> Versioned[Rec] | None:
        entry = self._kv.entries.get(key)
        if entry is None:
            return None
        try:
            rec = cls.from_json(entry.value)
        except ValueError as exc:
            raise StoreError(f"corrupt {cls.__name__} at {key!r}: {exc}") from exc
        return Versioned(rec, entry.mod_revision, entry.create_revision, entry.lease)

    def _list(self, cls: type[Rec], kind: str) -> list[Versioned[Rec]]:
        found = (self._decode(cls, k) for k in self._kv.keys(f"{kind}/"))
        return [v for v in found if v is not None]

    # -- nodes ---------------------------------------------------------------------------

    async def put_node(self, rec: NodeRecord, lease_id: int) -> Versioned[NodeRecord]:
        self._enter()
        self._require_lease(lease_id)
        key = f"nodes/{rec.node_id}"
        rev = self._kv.apply({key: (rec.to_json(), lease_id)}, set())
        return Versioned(rec, rev, self._kv.entries[key].create_revision, lease_id)

    async def get_node(self, node_id: str) -> Versioned[NodeRecord] | None:
        self._enter()
        return self._decode(NodeRecord, f"nodes/{node_id}")

    async def list_nodes(self) -> list[Versioned[NodeRecord]]:
        self._enter()
        return self._list(NodeRecord, "nodes")

    # -- volumes -------------------------------------------------------------------------

    async def create_volume(self, rec: VolumeRecord) -> Versioned[VolumeRecord]:
        self._enter()
        problem = rec.invariant_problem()
        if problem is not None:
            raise InvariantError(f"volume {rec.volume_id}: refused: {problem}")
        by_id = self._decode(VolumeRecord, f"volumes/{rec.volume_id}")
        if by_id is not None:
            raise AlreadyExistsError(f"volume {rec.volume_id} exists", by_id)
        holder = self._value(f"names/{rec.name}")
        if holder is not None:
            raise AlreadyExistsError(f"name {rec.name!r} is taken by volume {holder!r}",
                                     self._decode(VolumeRecord, f"volumes/{holder.decode()}"))
        rev = self._kv.apply({f"volumes/{rec.volume_id}": (rec.to_json(), 0),
                              f"names/{rec.name}": (rec.volume_id.encode(), 0)}, set())
        return Versioned(rec, rev, rev, 0)

    async def get_volume(self, volume_id: str) -> Versioned[VolumeRecord] | None:
        self._enter()
        return self._decode(VolumeRecord, f"volumes/{volume_id}")

    async def list_volumes(self) -> list[Versioned[VolumeRecord]]:
        self._enter()
        return self._list(VolumeRecord, "volumes")

    async def update_volume(
        self, rec: VolumeRecord, expected_mod_revision: int
    ) -> Versioned[VolumeRecord]:
        self._enter()
        current = self._replaceable(rec, expected_mod_revision)
        rev = self._kv.apply({f"volumes/{rec.volume_id}": (rec.to_json(), 0)}, set())
        return Versioned(rec, rev, current.create_revision, 0)

    def _replaceable(self, rec: VolumeRecord, expected: int) -> Versioned[VolumeRecord]:
        """The record ``rec`` may replace, checked in EtcdStore's order: the revision
        (ConflictError), the invariants (InvariantError), the immutable name (ValueError)."""
        current = self._decode(VolumeRecord, f"volumes/{rec.volume_id}")
        if current is None or current.mod_revision != expected:
            raise _conflict(rec.volume_id, expected, current)
        problem = transition_problem(current.value, rec)
        if problem is not None:
            raise InvariantError(f"volume {rec.volume_id}: refused: {problem}")
        if current.value.name != rec.name:
            raise ValueError(f"volume {rec.volume_id}: the name is immutable")
        return current

    async def delete_volume(self, volume_id: str, expected_mod_revision: int) -> None:
        self._enter()
        current = self._decode(VolumeRecord, f"volumes/{volume_id}")
        if current is None or current.mod_revision != expected_mod_revision:
            raise _conflict(volume_id, expected_mod_revision, current)
        deletes = {f"volumes/{volume_id}"}
        name_key = f"names/{current.value.name}"
        # As on etcd: the name goes only if it still points here.
        if self._value(name_key) == volume_id.encode():
            deletes.add(name_key)
        self._kv.apply({}, deletes)

    async def volume_id_for_name(self, name: str) -> str | None:
        self._enter()
        holder = self._value(f"names/{name}")
        return holder.decode() if holder is not None else None

    # -- ownership claims ----------------------------------------------------------------

    async def take_ownership(
        self, rec: VolumeRecord, expected_mod_revision: int, claim: OwnerClaim,
        lease_id: int, replaces: OwnerClaim | None = None,
    ) -> Versioned[VolumeRecord]:
        self._enter()
        current = self._replaceable(rec, expected_mod_revision)
        key = f"owners/{rec.volume_id}"
        if self._value(key) != (None if replaces is None else replaces.to_json()):
            raise ConflictError(f"volume {rec.volume_id}: the owner claim is not "
                                f"{'absent' if replaces is None else replaces}", current)
        # etcd checks the leases of the branch it runs, so only once the compares held.
        self._require_lease(lease_id)
        rev = self._kv.apply({f"volumes/{rec.volume_id}": (rec.to_json(), 0),
                              key: (claim.to_json(), lease_id)}, set())
        return Versioned(rec, rev, current.create_revision, 0)

    async def get_owner(self, volume_id: str) -> OwnerClaim | None:
        self._enter()
        held = self._value(f"owners/{volume_id}")
        return OwnerClaim.from_json(held) if held is not None else None

    async def release_owner(self, volume_id: str, claim: OwnerClaim) -> None:
        self._enter()
        key = f"owners/{volume_id}"
        if self._value(key) == claim.to_json():
            self._kv.apply({}, {key})

    async def put_progress(
        self, volume_id: str, node_id: str, progress: ResyncProgress | None
    ) -> None:
        self._enter()
        key = f"progress/{volume_id}/{node_id}"
        if progress is None:
            self._kv.apply({}, {key})
        else:
            self._kv.apply({key: (json.dumps(dataclasses.asdict(progress)).encode(), 0)}, set())

    async def get_progress(self, volume_id: str) -> dict[str, ResyncProgress]:
        self._enter()
        start = f"progress/{volume_id}/"
        out = {}
        for key in self._kv.keys(start):
            try:
                out[key[len(start):]] = ResyncProgress(**json.loads(self._kv.entries[key].value))
            except (ValueError, TypeError):
                continue  # as EtcdStore: a malformed record is not worth failing a status read
        return out

    # -- leases --------------------------------------------------------------------------

    async def grant_lease(self, ttl_s: int) -> int:
        self._enter()
        # etcd takes whole seconds; anything else is a caller bug it could not even express.
        if type(ttl_s) is not int or ttl_s < 1:
            raise ValueError(f"lease TTL must be a positive whole number of seconds: {ttl_s!r}")
        return self._kv.grant(ttl_s, self._clock())

    async def keep_alive_once(self, lease_id: int) -> int:
        self._enter()
        ttl = self._kv.renew(lease_id, self._clock())
        if ttl is None:
            raise LeaseExpiredError(f"lease {lease_id:x} has expired or was revoked")
        return ttl

    async def revoke_lease(self, lease_id: int) -> None:
        self._enter()
        self._kv.revoke(lease_id)

    # -- change feed ---------------------------------------------------------------------

    async def current_revision(self) -> int:
        self._enter()
        return self._kv.revision

    def watch_prefix(self, kind: str, start_revision: int | None = None) -> Watch:
        if kind not in WATCH_KINDS:
            raise ValueError(f"unknown watch kind {kind!r}; expected one of {WATCH_KINDS}")
        return Watch(self._watch(f"{kind}/", start_revision))

    async def _watch(self, prefix: str, start_revision: int | None) -> WatchStream:
        self._enter()
        # etcd treats a start revision of 0 as "from now", like None.
        next_rev = start_revision or self._kv.revision + 1
        wake = asyncio.Event()
        self._waiters.add(wake)
        try:
            yield None  # established: every change from ``next_rev`` on will be seen
            while True:
                wake.clear()
                self._enter()
                batch = self._kv.changes_since(prefix, next_rev)
                # Taken with the batch: no gap, no repeat (and a future start stays put).
                next_rev = max(next_rev, self._kv.revision + 1)
                for c in batch:
                    yield WatchEvent(
                        WatchEventType.PUT if c.entry else WatchEventType.DELETE,
                        c.key[len(prefix):], c.entry.value if c.entry else None, c.revision)
                if not batch:
                    await self._wait(wake)
        finally:
            self._waiters.discard(wake)

    async def _wait(self, wake: asyncio.Event) -> None:
        if isinstance(self._clock, ManualClock) or self._kv.next_deadline() is None:
            await wake.wait()  # every change, expiry included, sets ``wake``
            return
        # On a free-running clock only a call notices that a lease ran out: look again
        # soon, so an expiry reaches watchers even when nobody else calls the store.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), _EXPIRY_POLL_S)

    async def close(self) -> None:
        self._closed = True
        if isinstance(self._clock, ManualClock):
            self._clock.unsubscribe(self.expire_leases)
        self._wake()
