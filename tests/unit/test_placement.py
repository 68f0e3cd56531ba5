"""Placement is pure: every rule checked from small tables."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from csi_driver.controller.placement import Candidate, PlacementError, place, usable_capacity

K = "tandem.csi.io/node"
GIB = 1 << 30


def node(name: str, free_gib: int, count: int = 0, max_volumes: int = 0) -> Candidate:
    return Candidate(name, free_gib * GIB, {K: name}, count, max_volumes)


def test_most_free_space_first() -> None:
    nodes = [node("a", 5), node("b", 9), node("c", 7)]
    assert place(nodes, GIB, 2) == ("b", "c")


def test_ties_broken_by_volume_count_then_id() -> None:
    nodes = [node("b", 5, count=2), node("a", 5, count=2), node("c", 5, count=1)]
    assert place(nodes, GIB, 3) == ("c", "a", "b")


def test_nodes_without_room_are_skipped() -> None:
    nodes = [node("a", 1), node("b", 9), node("c", 7), node("d", 0)]
    assert place(nodes, 2 * GIB, 2) == ("b", "c")


def test_not_enough_nodes_with_room_is_an_error() -> None:
    with pytest.raises(PlacementError, match="need 3 nodes"):
        place([node("a", 9), node("b", 1), node("c", 9)], 2 * GIB, 3)


def test_volume_count_limit() -> None:
    nodes = [node("a", 9, count=4, max_volumes=4), node("b", 1), node("c", 2)]
    assert place(nodes, GIB, 2) == ("c", "b")


def test_preferred_topology_goes_first() -> None:
    nodes = [node("a", 9), node("b", 2), node("c", 5)]
    assert place(nodes, GIB, 2, preferred=[{K: "b"}]) == ("b", "a")


def test_requisite_binds_the_first_replica_only() -> None:
    nodes = [node("a", 9), node("b", 2), node("c", 5)]
    chosen = place(nodes, GIB, 3, requisite=[{K: "b"}])
    assert chosen[0] == "b" and set(chosen) == {"a", "b", "c"}


def test_requisite_without_room_is_an_error() -> None:
    with pytest.raises(PlacementError, match="requisite"):
        place([node("a", 9), node("b", 0)], GIB, 1, requisite=[{K: "b"}])


def test_count_must_be_positive() -> None:
    with pytest.raises(PlacementError):
        place([node("a", 9)], GIB, 0)


def test_usable_capacity_is_the_kth_largest_free() -> None:
    nodes = [node("a", 9), node("b", 2), node("c", 5)]
    assert usable_capacity(nodes, 1) == 9 * GIB
    assert usable_capacity(nodes, 2) == 5 * GIB
    assert usable_capacity(nodes, 3) == 2 * GIB
    assert usable_capacity(nodes, 4) == 0


@given(
    frees=st.lists(st.integers(0, 20), min_size=1, max_size=8),
    size=st.integers(1, 10),
    count=st.integers(1, 5),
)
def test_placement_properties(frees: list[int], size: int, count: int) -> None:
    nodes = [node(f"n{i}", f) for i, f in enumerate(frees)]
    try:
        chosen = place(nodes, size * GIB, count)
    except PlacementError:
        assert sum(f >= size for f in frees) < count
        return
    assert len(chosen) == count == len(set(chosen))
    by_name = {n.node_id: n for n in nodes}
    assert all(by_name[c].free_bytes >= size * GIB for c in chosen)
    # Spread: nobody left out has more free space than someone chosen.
    worst_chosen = min(by_name[c].free_bytes for c in chosen)
    assert all(n.free_bytes <= worst_chosen for n in nodes if n.node_id not in chosen)
