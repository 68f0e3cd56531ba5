"""Which replicas may be replaced or deleted: pure decisions over a snapshot (I1b).

Never delete the last good copy: a replica may go only while an in-sync member *other than
it* is alive to serve (and rebuild) the volume. The reconciler asks ``replaceable``, a
node's orphan sweep and the agent's DeleteReplica ask ``may_delete``. Both take plain values
(the record, who is alive) so they are table-tested and used by the simulation.

Must not: read etcd, call agents or touch pools (the callers do).
"""

from __future__ import annotations

from collections.abc import Collection

from csi_driver.state.model import VolumePhase, VolumeRecord


def live_sources(record: VolumeRecord, live: Collection[str], besides: str = "") -> list[str]:
    """In-sync members that are alive, other than ``besides``: who can serve the volume."""
    return [n for n in record.isr if n in live and n != besides]


def replaceable(record: VolumeRecord, dead: Collection[str], live: Collection[str]
                ) -> list[str] | str:
    """Replica nodes, dead past the grace, whose replica may be replaced now; or why none.

    A new replica is rebuilt from a live in-sync member, and a dead node that is the last
    in-sync member holds the only good copy: while no such member is alive, nothing is
    replaced (the dead nodes stay in the record, so their replicas are kept when they
    return, and the first to return serves as the source of truth).
    """
    candidates = [n for n in record.replica_nodes() if n in dead]
    if not candidates:
        return []
    if not live_sources(record, live):
        return (f"not replacing {candidates}: no in-sync replica is alive "
                f"(isr {list(record.isr)}); a dead node may hold the last good copy")
    return candidates


def may_delete(record: VolumeRecord | None, node_id: str, live: Collection[str]) -> bool:
    """May ``node_id`` delete its replica of this volume (``record`` None: no record)?"""
    if record is None:
        return True  # the volume was deleted while this node was away
    if record.phase is VolumePhase.DELETING:
        return True
    if node_id in record.replica_nodes():
        return False  # still named: needed, or being created
    # Replaced while away: stale, unless the volume has nobody else to serve it.
    return bool(live_sources(record, live, besides=node_id))
