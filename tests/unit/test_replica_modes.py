"""Replica modes and the routing rule from tables: replication/replica_modes.py."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replication.bitmap import DirtyBitmap
from replication.replica_modes import ROUTING, Mode, ReplicaModes, Route, mode_of, routing

MIB = 1 << 20
SIZE = 8 * MIB
IN, CONV, REB, OUT = Mode.IN_SYNC, Mode.CONVERGING, Mode.REBUILDING, Mode.OUT_OF_SYNC


@pytest.mark.parametrize(("in_isr", "resyncing", "has_bitmap", "mode"), [
    (True, False, False, IN),
    (True, False, True, IN),  # a convergence failed: its bitmap stays until the retry
    (True, True, True, CONV),
    (False, True, True, REB),
    (False, False, True, OUT),
    (False, False, False, None),  # never heard of: gets nothing, and nothing is kept for it
])
def test_mode_of(in_isr: bool, resyncing: bool, has_bitmap: bool, mode: Mode | None) -> None:
    assert mode_of(in_isr, resyncing, has_bitmap) is mode


@pytest.mark.parametrize(("table", "local", "route"), [
    # The local replica is written last: the remote frames are on the wire meanwhile.
    ([("a", IN), ("b", IN), ("c", IN)], "a",
     Route(("b", "c", "a"), ("a", "b", "c"), ("a", "b", "c"))),
    ([("a", IN), ("b", IN), ("c", IN)], None,
     Route(("a", "b", "c"), ("a", "b", "c"), ("a", "b", "c"))),
    # A rebuilding replica gets every write but neither counts nor serves reads (WO).
    ([("a", IN), ("c", REB)], "c", Route(("a", "c"), ("a",), ("a",))),
    # An out-of-sync replica gets nothing, not even when it is the local one (ERR).
    ([("a", IN), ("b", OUT)], "b", Route(("a",), ("a",), ("a",))),
    # A converging ISR member still counts, and serves reads once ahead in ISR order.
    ([("b", CONV), ("a", IN)], None, Route(("b", "a"), ("b", "a"), ("b", "a"))),
    ([("a", IN), ("b", CONV), ("c", REB), ("d", OUT)], "a",
     Route(("b", "c", "a"), ("a", "b"), ("a", "b"))),
    ([("c", REB), ("d", OUT)], None, Route(("c",), (), ())),  # nothing may be acknowledged
    ([], "a", Route((), (), ())),
])
def test_routing(table: list[tuple[str, Mode]], local: str | None, route: Route) -> None:
    assert routing(table, local) == route


def test_every_mode_has_a_routing() -> None:
    assert set(ROUTING) == set(Mode)
    # Nothing counts towards an acknowledgement unless it is written, or read unless counted.
    for rule in ROUTING.values():
        assert rule.written or not rule.counted
        assert rule.counted or not rule.readable


def make(isr: list[str], local: str | None = "a",
         out_of_sync: tuple[str, ...] = ()) -> ReplicaModes[str]:
    bitmaps = {n: DirtyBitmap(SIZE) for n in out_of_sync}
    return ReplicaModes(SIZE, isr, local, bitmaps)


Step = Callable[[ReplicaModes[str]], object]


def start(node: str) -> Step:
    return lambda m: m.resync_started(node, DirtyBitmap(SIZE), f"resync-{node}")


def joined(node: str, *isr: str) -> Step:
    return lambda m: m.joined_isr(node, isr)


def removed(node: str, *isr: str) -> Step:
    return lambda m: m.removed_from_isr(node, isr)


def missed(node: str) -> Step:
    return lambda m: m.missed(node, [(0, 4096)])


def ended(node: str) -> Step:
    return lambda m: m.resync_ended(node)


def succeeded(node: str) -> Step:
    return lambda m: m.resync_succeeded(node)


@pytest.mark.parametrize(("isr", "out_of_sync", "steps", "table"), [
    pytest.param(["a", "b"], ("c",), [start("c")],
                 [("a", IN), ("b", IN), ("c", REB)], id="rebuild-starts"),
    pytest.param(["a", "b"], ("c",), [start("c"), joined("c", "a", "b", "c")],
                 [("a", IN), ("b", IN), ("c", CONV)], id="rebuild-joins"),
    pytest.param(["a", "b"], ("c",), [start("c"), joined("c", "a", "b", "c"), succeeded("c")],
                 [("a", IN), ("b", IN), ("c", IN)], id="rebuild-done"),
    pytest.param(["a", "b"], ("c",), [start("c"), ended("c")],
                 [("a", IN), ("b", IN), ("c", OUT)], id="rebuild-fails"),
    pytest.param(["a"], (), [start("n")], [("a", IN), ("n", REB)], id="new-replica"),
    pytest.param(["a", "b"], (), [start("b")], [("a", IN), ("b", CONV)], id="converge-starts"),
    pytest.param(["a", "b"], (), [start("b"), succeeded("b")], [("a", IN), ("b", IN)],
                 id="converge-done"),
    pytest.param(["a", "b"], (), [start("b"), ended("b")], [("a", IN), ("b", IN)],
                 id="converge-fails"),
    pytest.param(["a", "b", "c"], (), [missed("c")], [("a", IN), ("b", IN), ("c", IN)],
                 id="failed-still-in-isr-until-etcd-agrees"),
    pytest.param(["a", "b", "c"], (), [missed("c"), removed("c", "a", "b")],
                 [("a", IN), ("b", IN), ("c", OUT)], id="dropped"),
    # etcd's answer is the ISR: a member it no longer lists leaves too (untracked: no
    # bitmap says what it lacks, so only a rejoin by checksums brings it back).
    pytest.param(["a", "b", "c"], (), [missed("c"), removed("c", "a")],
                 [("a", IN), ("c", OUT)], id="etcd-dropped-another"),
    pytest.param(["a", "b"], (), [start("b"), missed("b"), ended("b"), removed("b", "a")],
                 [("a", IN), ("b", OUT)], id="converging-member-dropped"),
    # The local replica is read first, whatever order etcd lists the ISR in.
    pytest.param(["b", "c", "a"], (), [], [("a", IN), ("b", IN), ("c", IN)], id="local-first"),
    pytest.param(["b"], ("a",), [start("a"), joined("a", "b", "a")],
                 [("a", CONV), ("b", IN)], id="local-rejoins-first"),
])
def test_transitions(isr: list[str], out_of_sync: tuple[str, ...], steps: list[Step],
                     table: list[tuple[str, Mode]]) -> None:
    modes = make(isr, out_of_sync=out_of_sync)
    for step in steps:
        step(modes)
    assert modes.table() == table
    assert modes.route == routing(table, "a")  # the cached route followed every change
    for node, mode in table:
        assert modes.mode(node) is mode
        assert modes.is_member(node) is ROUTING[mode].written
    assert modes.out_of_sync() == [n for n, mode in table if mode is OUT]


def test_bitmaps_follow_the_modes() -> None:
    modes = make(["a", "b"], out_of_sync=("c",))
    kept = modes.bitmap("c")
    assert kept is not None
    modes.mark_written(2 * MIB, 1)
    assert kept.is_marked(2)
    assert modes.bitmap("a") is None  # in sync: nothing to remember for it
    modes.missed("b", [(5 * MIB, 1)])
    missed_b = modes.bitmap("b")
    assert missed_b is not None and missed_b.dirty_regions == 1
    # Only replicas outside the ISR need their bitmap to outlive the process.
    assert [n for n, _ in modes.bitmaps_outside_isr()] == ["c"]
    rebuild = DirtyBitmap(SIZE)
    modes.resync_started("c", rebuild, "resync-c")
    assert modes.bitmap("c") is rebuild
    modes.mark_batch_written([(0, 1), (7 * MIB, 1)])
    assert [rebuild.is_marked(r) for r in (0, 2, 7)] == [True, False, True]
    assert kept.is_marked(2) and not kept.is_marked(7)  # replaced: no longer marked
    modes.joined_isr("c", ("a", "b", "c"))
    assert modes.bitmaps_outside_isr() == []
    modes.resync_succeeded("c")
    assert modes.bitmap("c") is None


def test_resync_handles() -> None:
    modes = make(["a", "b"], out_of_sync=("c",))
    start("c")(modes)
    start("b")(modes)
    assert modes.resyncs() == [("c", "resync-c"), ("b", "resync-b")]
    assert modes.resync_ended("c") == "resync-c"
    assert modes.resync_ended("c") is None
    assert modes.end_all_resyncs() == ["resync-b"]
    assert modes.table() == [("a", IN), ("b", IN), ("c", OUT)]


def test_read_source() -> None:
    modes = make(["a", "b"])
    assert modes.read_source() == "a"
    removed("a", "b")(modes)
    assert modes.read_source() == "b"
    removed("b")(modes)
    assert modes.read_source() is None


class Containers:
    """The replica state as three containers, mutated the way the target did before the
    modes had an owner: ReplicaModes must route exactly as this did."""

    def __init__(self, isr: list[str], local: str | None, out_of_sync: list[str]) -> None:
        self.local = local
        self.isr = sorted(isr, key=lambda n: n != local)
        self.resyncs: dict[str, None] = {}
        self.bitmaps = dict.fromkeys(out_of_sync)

    def apply(self, event: str, node: str, isr: frozenset[str]) -> None:
        if event == "start":
            self.bitmaps[node] = None
            self.resyncs[node] = None
        elif event == "end":
            self.resyncs.pop(node, None)
        elif event == "succeed":
            self.resyncs.pop(node, None)
            self.bitmaps.pop(node, None)
        elif event == "miss":
            self.bitmaps.setdefault(node, None)
        elif event == "remove":
            self.isr = [n for n in self.isr if n != node and n in isr]
        elif event == "join":
            joined = [n for n in self.isr if n in isr] + [node]
            self.isr = sorted(joined, key=lambda n: n != self.local)

    def write_set(self) -> tuple[str, ...]:
        members = self.isr + [n for n in self.resyncs if n not in self.isr]
        return tuple(sorted(members, key=lambda n: n == self.local))


NODES = ["a", "b", "c", "d"]
EVENTS = st.lists(st.tuples(
    st.sampled_from(["start", "end", "succeed", "miss", "remove", "join"]),
    st.sampled_from(NODES),
    st.frozensets(st.sampled_from(NODES)),
), max_size=30)


@given(st.lists(st.sampled_from(NODES), min_size=1, max_size=4, unique=True),
       st.sampled_from(["a", "d", None]), EVENTS)
def test_routes_as_the_containers_did(isr: list[str], local: str | None,
                                      events: list[tuple[str, str, frozenset[str]]]) -> None:
    old = Containers(isr, local, [n for n in NODES if n not in isr])
    modes: ReplicaModes[str] = ReplicaModes(
        SIZE, isr, local, {n: DirtyBitmap(SIZE) for n in NODES if n not in isr})
    for event, node, new_isr in events:
        old.apply(event, node, new_isr)
        if event == "start":
            modes.resync_started(node, DirtyBitmap(SIZE), node)
        elif event == "end":
            modes.resync_ended(node)
        elif event == "succeed":
            modes.resync_succeeded(node)
        elif event == "miss":
            modes.missed(node, [(0, 1)])
        elif event == "remove":
            modes.removed_from_isr(node, new_isr)
        else:
            modes.joined_isr(node, new_isr)
        assert modes.route.write_to == old.write_set()
        assert modes.isr == tuple(old.isr)
        assert modes.read_source() == (old.isr[0] if old.isr else None)
        assert modes.out_of_sync() == [
            n for n in old.bitmaps if n not in old.isr and n not in old.resyncs]
        assert [n for n, _ in modes.bitmaps_outside_isr()] == [
            n for n in old.bitmaps if n not in old.isr]
        for n in NODES:
            assert modes.is_member(n) is (n in old.isr or n in old.resyncs)
