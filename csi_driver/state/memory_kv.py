"""KeySpace: the etcd-shaped core of MemoryStore: keys, one revision counter, leases, history.

The mechanics etcd's MVCC store gives and the Store contract is written against, with no
knowledge of records, asyncio or the wall clock (time is passed in), so they can be read
and checked on their own:

- One global revision: every applied transaction that changes a key bumps it once, and
  all its keys share that revision; a transaction that changes nothing (a delete of
  absent keys, a revocation of a lease without keys) leaves it alone, as etcd does.
- ``create_revision`` survives a re-put; ``mod_revision`` is the revision of the last put.
- A key put with a lease is attached to it (and detached from a previous one); revoking
  or expiring the lease deletes all its keys in one revision.
- A bounded history of applied revisions for watch replay; what falls off the end, or
  is compacted explicitly, is reported as CompactedError to a watch asking for it.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from csi_driver.state.errors import CompactedError

# etcd keeps history until it is compacted; a bound keeps a long simulation's memory flat.
DEFAULT_HISTORY = 10_000


@dataclass(frozen=True)
class Entry:
    """A key's current value and revisions (etcd's KeyValue, less the version count)."""

    value: bytes
    create_revision: int
    mod_revision: int
    lease: int


@dataclass(frozen=True)
class Change:
    """One key changed at ``revision``: its new entry, or None for a deletion."""

    revision: int
    key: str
    entry: Entry | None


@dataclass
class _Lease:
    ttl: int
    expires_at: float
    keys: set[str] = field(default_factory=set)


class KeySpace:
    """Keys, revisions, leases and history; ``on_change`` is called after every revision."""

    def __init__(self, history: int = DEFAULT_HISTORY,
                 on_change: Callable[[], None] = lambda: None) -> None:
        self.entries: dict[str, Entry] = {}
        # A fresh etcd cluster is at revision 1 before its first write.
        self.revision = 1
        self.compacted = 0  # a watch may start at this revision or later
        self._leases: dict[int, _Lease] = {}
        self._lease_ids = itertools.count(1)  # 0 means "no lease", as in etcd
        self._history: deque[tuple[Change, ...]] = deque()
        self._history_limit = history
        self._on_change = on_change

    # -- keys ----------------------------------------------------------------------------

    def keys(self, prefix: str) -> list[str]:
        """Keys under ``prefix`` in etcd's order (str code-point order is UTF-8 byte order)."""
        return sorted(k for k in self.entries if k.startswith(prefix))

    def apply(self, puts: dict[str, tuple[bytes, int]], deletes: set[str]) -> int:
        """Apply one transaction (puts: key -> (value, lease)) at one new revision.

        Callers check every compare first: this never fails part-way. Returns the
        revision the transaction is at (the current one when it changed nothing).
        """
        deletes = {k for k in deletes if k in self.entries and k not in puts}
        if not puts and not deletes:
            return self.revision
        rev = self.revision + 1
        changes: list[Change] = []
        for key, (value, lease) in puts.items():
            old = self.entries.get(key)
            self._detach(key, old)
            entry = Entry(value, old.create_revision if old else rev, rev, lease)
            self.entries[key] = entry
            if lease:
                self._leases[lease].keys.add(key)
            changes.append(Change(rev, key, entry))
        for key in sorted(deletes):
            self._detach(key, self.entries.pop(key))
            changes.append(Change(rev, key, None))
        self.revision = rev
        self._history.append(tuple(changes))
        while len(self._history) > self._history_limit:
            self.compacted = self._history.popleft()[0].revision + 1
        self._on_change()
        return rev

    def _detach(self, key: str, entry: Entry | None) -> None:
        if entry is not None and entry.lease in self._leases:
            self._leases[entry.lease].keys.discard(key)

    # -- leases --------------------------------------------------------------------------

    def grant(self, ttl: int, now: float) -> int:
        lease_id = next(self._lease_ids)
        self._leases[lease_id] = _Lease(ttl, now + ttl)
        return lease_id

    def has_lease(self, lease_id: int) -> bool:
        return lease_id in self._leases

    def renew(self, lease_id: int, now: float) -> int | None:
        """Restart the lease's TTL at ``now``; its TTL, or None if it is gone."""
        lease = self._leases.get(lease_id)
        if lease is None:
            return None
        lease.expires_at = now + lease.ttl
        return lease.ttl

    def revoke(self, lease_id: int) -> None:
        lease = self._leases.pop(lease_id, None)
        if lease is not None:
            self.apply({}, set(lease.keys))

    def expire(self, now: float) -> int:
        """Revoke every lease with ``now >= renewed + ttl``, oldest deadline first."""
        due = sorted((lease.expires_at, lid) for lid, lease in self._leases.items()
                     if now >= lease.expires_at)
        for _, lease_id in due:
            self.revoke(lease_id)
        return len(due)

    def next_deadline(self) -> float | None:
        return min((lease.expires_at for lease in self._leases.values()), default=None)

    # -- history -------------------------------------------------------------------------

    def compact(self, revision: int) -> None:
        """Forget history before ``revision``, as etcd's Compact."""
        if revision > self.revision:
            raise ValueError(f"revision {revision} is in the future ({self.revision})")
        if revision < self.compacted:
            raise CompactedError(f"revision {revision} is already compacted", self.compacted)
        self.compacted = revision
        while self._history and self._history[0][0].revision < revision:
            self._history.popleft()

    def changes_since(self, prefix: str, since: int) -> list[Change]:
        """Every change under ``prefix`` at revision ``since`` or later, in order."""
        if since < self.compacted:
            raise CompactedError(f"revision {since} is compacted", self.compacted)
        # Walk back from the newest revision: a live watch is only a few revisions behind.
        recent = itertools.takewhile(lambda t: t[0].revision >= since, reversed(self._history))
        return [c for txn in reversed(list(recent)) for c in txn if c.key.startswith(prefix)]
