"""Replica placement: a pure function from (nodes, request) to the chosen nodes.

No I/O here. The rules, in order:
- only live nodes with room for the volume (free bytes, volume-count limit) are eligible;
- the CSI `requisite` topologies bind the *first* replica: a replicated volume is
  accessible from every replica node, so it satisfies "accessible from at least one
  requisite topology" as soon as one replica sits there;
- `preferred` topologies are tried first, in the order given (the scheduler puts the node it
  picked for the pod first);
- otherwise the most free space wins (spread), then fewer replicas, then the node id so the
  result is deterministic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Candidate:
    """What placement knows about one live node."""

    node_id: str
    free_bytes: int
    segments: Mapping[str, str] = field(default_factory=dict)
    volume_count: int = 0
    max_volumes: int = 0  # 0 = unlimited


class PlacementError(Exception):
    """No placement satisfies the request; the message says why."""


Topology = Mapping[str, str]


def _matches(candidate: Candidate, topology: Topology) -> bool:
    return all(candidate.segments.get(k) == v for k, v in topology.items())


def _preference_rank(candidate: Candidate, preferred: Sequence[Topology]) -> int:
    for rank, topology in enumerate(preferred):
        if _matches(candidate, topology):
            return rank
    return len(preferred)


def _has_room(candidate: Candidate, size_bytes: int) -> bool:
    if candidate.max_volumes and candidate.volume_count >= candidate.max_volumes:
        return False
    return candidate.free_bytes >= size_bytes


def place(
    candidates: Sequence[Candidate],
    size_bytes: int,
    count: int,
    requisite: Sequence[Topology] = (),
    preferred: Sequence[Topology] = (),
) -> tuple[str, ...]:
    """Choose ``count`` distinct nodes for a volume of ``size_bytes``; first is the primary."""
    if count < 1:
        raise PlacementError(f"replica count must be >= 1, got {count}")
    eligible = [c for c in candidates if _has_room(c, size_bytes)]
    if len(eligible) < count:
        raise PlacementError(
            f"need {count} nodes with {size_bytes} bytes free, only {len(eligible)} of "
            f"{len(candidates)} live nodes have room"
        )

    def rank(c: Candidate) -> tuple[int, int, int, str]:
        return (_preference_rank(c, preferred), -c.free_bytes, c.volume_count, c.node_id)

    ordered = sorted(eligible, key=rank)
    if requisite:
        in_requisite = [c for c in ordered if any(_matches(c, t) for t in requisite)]
        if not in_requisite:
            raise PlacementError("no node with room matches the requisite topologies")
        first = in_requisite[0]
        ordered = [first] + [c for c in ordered if c is not first]
    return tuple(c.node_id for c in ordered[:count])


def usable_capacity(candidates: Sequence[Candidate], count: int) -> int:
    """Largest volume that could be placed with ``count`` replicas (GetCapacity)."""
    if count < 1 or len(candidates) < count:
        return 0
    frees = sorted((c.free_bytes for c in candidates if _has_room(c, 0)), reverse=True)
    return frees[count - 1] if len(frees) >= count else 0
