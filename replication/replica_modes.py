"""Replica modes: the one table that says which replicas a volume's I/O goes to.

Every replica the target knows of is in one mode (longhorn-engine's RW / WO / ERR, with RW
split in two because an ISR member being converged after a takeover still counts):

    mode         written counted readable
    IN_SYNC      yes     yes     yes       an ISR member (RW)
    CONVERGING   yes     yes     yes       an ISR member being compared with the read
                                           source after a takeover (I4)
    REBUILDING   yes     no      no        outside the ISR, copied while it gets every
                                           write; joins the ISR by CAS when identical (I5)
    OUT_OF_SYNC  no      no      no        outside the ISR; its dirty bitmap records every
                                           region written since it left (ERR)

*Written*: every write is sent to it and waited for. *Counted*: the ISR; a write is
acknowledged only when every counted replica has it (I1), and a counted replica that fails
leaves the ISR by CAS first (I3). *Readable*: reads come from the first readable replica in
ISR order, the local one first.

The write path, the ISR changes and the resyncs all depend on these answers; one owner keeps
them consistent and lets the routing rule be tested without sockets. A mode is not stored but
follows from three facts kept here: ISR membership (ordered: the read preference), a resync
in progress (ordered by start), a dirty bitmap. Changing a fact cannot leave a stale mode.

Must not: do I/O or await, or decide when a replica changes mode (the ISR changes do once
etcd agreed, the resync runner when a copy ends): it records what they decided.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Generic, TypeVar

from replication.bitmap import DirtyBitmap

H = TypeVar("H")  # what the resync runner keeps per running resync (its task, say)


class Mode(enum.Enum):
    IN_SYNC = "in-sync"
    CONVERGING = "converging"
    REBUILDING = "rebuilding"
    OUT_OF_SYNC = "out-of-sync"


@dataclass(frozen=True)
class Routing:
    written: bool  # every write goes to it, and is waited for
    counted: bool  # the ack needs it (I1); its failure is an ISR removal by CAS (I3)
    readable: bool  # may serve reads


ROUTING: Final[Mapping[Mode, Routing]] = MappingProxyType({
    Mode.IN_SYNC: Routing(written=True, counted=True, readable=True),
    Mode.CONVERGING: Routing(written=True, counted=True, readable=True),
    Mode.REBUILDING: Routing(written=True, counted=False, readable=False),
    Mode.OUT_OF_SYNC: Routing(written=False, counted=False, readable=False),
})


def mode_of(in_isr: bool, resyncing: bool, has_bitmap: bool) -> Mode | None:
    """The mode those facts make; None for a replica the target does not track."""
    if in_isr:
        return Mode.CONVERGING if resyncing else Mode.IN_SYNC
    if resyncing:
        return Mode.REBUILDING
    return Mode.OUT_OF_SYNC if has_bitmap else None


@dataclass(frozen=True)
class Route:
    write_to: tuple[str, ...]  # remote replicas first: on the wire while the local one writes
    counted: tuple[str, ...]  # the ISR, in read-preference order
    read_from: tuple[str, ...]  # in order of preference


def routing(table: Sequence[tuple[str, Mode]], local: str | None) -> Route:
    """The routing rule: where I/O goes, given each replica's mode in table order."""
    written = [node for node, mode in table if ROUTING[mode].written]
    return Route(
        write_to=tuple(sorted(written, key=lambda n: n == local)),
        counted=tuple(node for node, mode in table if ROUTING[mode].counted),
        read_from=tuple(node for node, mode in table if ROUTING[mode].readable),
    )


class ReplicaModes(Generic[H]):
    """The modes of one volume's replicas; every change is one of the transitions below."""

    def __init__(self, size: int, isr: Iterable[str], local: str | None,
                 bitmaps: Mapping[str, DirtyBitmap]) -> None:
        self._size = size
        self._local = local
        self._isr = sorted(isr, key=lambda n: n != local)
        self._resyncs: dict[str, H] = {}
        # Regions each replica outside the ISR (or being resynced) may lack.
        self._bitmaps = dict(bitmaps)
        # Read on every write, so kept until the next transition.
        self._route: Route | None = None

    # -- what the I/O paths ask -----------------------------------------------------------

    def table(self) -> list[tuple[str, Mode]]:
        """Every tracked replica's mode: ISR order, then resyncs by start, then the rest."""
        rows: list[tuple[str, Mode]] = []
        for node in self._isr:
            rows.append((node, Mode.CONVERGING if node in self._resyncs else Mode.IN_SYNC))
        rows.extend((n, Mode.REBUILDING) for n in self._resyncs if n not in self._isr)
        rows.extend((n, Mode.OUT_OF_SYNC) for n in self._bitmaps
                    if n not in self._isr and n not in self._resyncs)
        return rows

    @property
    def route(self) -> Route:
        route = self._route
        if route is None:
            route = self._route = routing(self.table(), self._local)
        return route

    @property
    def isr(self) -> tuple[str, ...]:
        return self.route.counted

    def read_source(self) -> str | None:
        read_from = self.route.read_from
        return read_from[0] if read_from else None

    def mode(self, node: str) -> Mode | None:
        return mode_of(node in self._isr, node in self._resyncs, node in self._bitmaps)

    def in_isr(self, node: str) -> bool:
        return node in self._isr

    def resyncing(self, node: str) -> bool:
        return node in self._resyncs

    def is_member(self, node: str) -> bool:
        """Gets every write: in the ISR or being brought into it."""
        mode = self.mode(node)
        return mode is not None and ROUTING[mode].written

    def out_of_sync(self) -> list[str]:
        return [node for node, mode in self.table() if mode is Mode.OUT_OF_SYNC]

    def bitmap(self, node: str) -> DirtyBitmap | None:
        return self._bitmaps.get(node)

    def bitmaps_outside_isr(self) -> list[tuple[str, DirtyBitmap]]:
        """What must outlive this process: the regions each non-ISR replica lacks."""
        return [(n, b) for n, b in self._bitmaps.items() if n not in self._isr]

    def resyncs(self) -> list[tuple[str, H]]:
        return list(self._resyncs.items())

    def mark_written(self, offset: int, length: int) -> None:
        """A write is going out: every replica with a bitmap may miss it, or it may race
        that replica's copy of the region (then the copy is redone)."""
        for bitmap in self._bitmaps.values():
            bitmap.mark(offset, length)

    def mark_batch_written(self, ranges: Sequence[tuple[int, int]]) -> None:
        for bitmap in self._bitmaps.values():
            for offset, length in ranges:
                bitmap.mark(offset, length)

    # -- transitions ----------------------------------------------------------------------

    def missed(self, node: str, ranges: Iterable[tuple[int, int]]) -> None:
        """``node`` failed these writes: any mode; it now has a bitmap that says so."""
        bitmap = self._bitmaps.get(node)
        if bitmap is None:
            bitmap = self._bitmaps[node] = DirtyBitmap(self._size)
        for offset, length in ranges:
            bitmap.mark(offset, length)

    def removed_from_isr(self, node: str, isr: Collection[str]) -> None:
        """IN_SYNC -> OUT_OF_SYNC once etcd removed it (``isr``: the ISR etcd now holds;
        members etcd no longer lists leave with it)."""
        self._isr = [n for n in self._isr if n != node and n in isr]
        self._route = None

    def joined_isr(self, node: str, isr: Collection[str]) -> None:
        """REBUILDING -> CONVERGING once etcd added it; its resync ends next."""
        joined = [n for n in self._isr if n in isr] + [node]
        self._isr = sorted(joined, key=lambda n: n != self._local)
        self._route = None

    def resync_started(self, node: str, bitmap: DirtyBitmap, handle: H) -> None:
        """OUT_OF_SYNC (or untracked) -> REBUILDING, IN_SYNC -> CONVERGING. ``bitmap`` is
        what it lacks, marked by every write from now on."""
        self._bitmaps[node] = bitmap
        self._resyncs[node] = handle
        self._route = None

    def resync_ended(self, node: str) -> H | None:
        """Failed or aborted: CONVERGING -> IN_SYNC, REBUILDING -> OUT_OF_SYNC with its
        bitmap kept (what it still lacks)."""
        handle = self._resyncs.pop(node, None)
        self._route = None
        return handle

    def resync_succeeded(self, node: str) -> None:
        """CONVERGING -> IN_SYNC with nothing left to copy: its bitmap goes."""
        self._resyncs.pop(node, None)
        self._bitmaps.pop(node, None)
        self._route = None

    def end_all_resyncs(self) -> list[H]:
        """At close: every resync stops where it is (bitmaps kept)."""
        handles = list(self._resyncs.values())
        self._resyncs.clear()
        self._route = None
        return handles
