"""A deterministic simulation of tandem's control plane under faults (FoundationDB-style).

The *real* decision code runs over the in-memory Store on a manual clock: ``Ownership``
(takeover: epoch CAS + claim in one transaction), ``EtcdAuthority`` (ISR shrink and join by
CAS, self-fencing clock, regaining a claim after an outage), the acknowledgement rule
(``replication.ack_rule``), the record invariants (the store), and the controller's replica
decisions (``csi_driver.replica_decisions``: replace and sweep). What is simulated are the
nodes, their replicas (block -> sequence number) and the data plane's transport: a write
reaches a member when both nodes are up, can talk, the member's disk has room and its fence
is not above the writer's epoch.

A seeded random schedule applies faults (node death and return, disk full, etcd outage,
partitions, slow renewals, racing stages) and actions (writes, stages, unstages, rebuilds,
reconciler passes, sweeps, time passing). ``check`` states the invariants; it runs after
every step. ``heal_and_recover`` ends every run: every volume must be stageable again.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from csi_driver.node.isr_authority import EtcdAuthority, Keeper
from csi_driver.node.ownership import Ownership
from csi_driver.state import errors as store_errors
from csi_driver.state.memory import ManualClock, MemoryStore
from csi_driver.state.model import (
    NodeRecord,
    ReplicaRef,
    ReplicaState,
    VolumePhase,
    VolumeRecord,
)

TTL = 2
NODES = ("n1", "n2", "n3", "n4")


class Violation(AssertionError):
    """An invariant broke: the message says which, the seed replays it."""


@dataclass
class SimKeeper:
    """A lease keeper the simulation renews by hand (``Keeper`` protocol)."""

    lease_id: int
    ttl_s: float
    last_renewed: float
    lost: bool = False

    def expires_monotonic(self) -> float:
        return self.last_renewed + self.ttl_s

    def start(self) -> object:
        return None

    async def stop(self) -> None:
        return None


class SimAuthority(EtcdAuthority):
    def _keeper(self, lease_id: int, granted_monotonic: float) -> Keeper:
        return SimKeeper(lease_id, self._ttl_s, granted_monotonic)


@dataclass
class Replica:
    blocks: dict[int, int] = field(default_factory=dict)
    fence: int = 0


@dataclass
class Node:
    node_id: str
    alive: bool = True
    etcd_cut: bool = False  # cannot reach etcd (partition)
    peers_cut: bool = False  # cannot reach other nodes
    disk_full: bool = False
    slow: bool = False  # its renewals do not get through
    lease: int | None = None
    replicas: dict[str, Replica] = field(default_factory=dict)


@dataclass
class Target:
    node: str
    volume: str
    epoch: int
    authority: SimAuthority
    isr: list[str]
    min_in_sync: int
    fenced: str | None = None


@dataclass
class Sim:
    seed: int
    rng: random.Random
    clock: ManualClock
    store: MemoryStore
    nodes: dict[str, Node]
    targets: dict[str, Target] = field(default_factory=dict)  # by volume: the live target
    zombies: list[Target] = field(default_factory=list)  # old targets still running
    acked: dict[tuple[str, int], int] = field(default_factory=dict)  # (volume, block) -> seq
    acks_by_epoch: dict[tuple[str, int], set[str]] = field(default_factory=dict)
    seq: int = 0
    log: list[str] = field(default_factory=list)
    dead_since: dict[str, float] = field(default_factory=dict)
    views: dict[str, MemoryStore] = field(default_factory=dict)

    @classmethod
    def new(cls, seed: int) -> Sim:
        clock = ManualClock(1000.0)
        return cls(seed, random.Random(seed), clock, MemoryStore(clock),
                   {n: Node(n) for n in NODES})

    def note(self, text: str) -> None:
        self.log.append(f"t={self.clock():.2f} {text}")

    # -- reachability -------------------------------------------------------------------

    def etcd_ok(self, node: str) -> bool:
        n = self.nodes[node]
        return n.alive and not n.etcd_cut and self.store.available

    def link(self, a: str, b: str) -> bool:
        na, nb = self.nodes[a], self.nodes[b]
        if not (na.alive and nb.alive):
            return False
        return a == b or not (na.peers_cut or nb.peers_cut)

    def view(self, node: str) -> MemoryStore:
        """The shared store as ``node`` sees it: unavailable while it cannot reach etcd."""
        found = self.views.get(node)
        if found is None:
            found = self.views[node] = _node_view(self, node)
        return found

    def ownership(self, node: str) -> Ownership:
        return Ownership(self.view(node), node, TTL, clock=self.clock)


def _node_view(sim: Sim, node: str) -> MemoryStore:
    class NodeView(MemoryStore):
        def _enter(self) -> None:
            if not sim.etcd_ok(node):
                raise store_errors.StoreUnavailableError(f"{node} cannot reach etcd")
            super()._enter()

    view = NodeView.__new__(NodeView)
    view.__dict__ = sim.store.__dict__  # one keyspace, clock and set of waiters for all
    return view


# -- records ----------------------------------------------------------------------------


def volume_record(volume_id: str, nodes: list[str], min_in_sync: int) -> VolumeRecord:
    return VolumeRecord(
        volume_id=volume_id, name=f"pvc-{volume_id}", size_bytes=1 << 20,
        replicas=tuple(ReplicaRef(n, ReplicaState.READY) for n in nodes), isr=tuple(nodes),
        epoch=0, owner=None, phase=VolumePhase.READY, fs_type="ext4", access_type="block",
        parameters=(("minInSync", str(min_in_sync)),), created_at=0.0)


async def register(sim: Sim, node: str) -> None:
    n = sim.nodes[node]
    store = sim.view(node)
    n.lease = await store.grant_lease(TTL)
    await store.put_node(NodeRecord(node, f"{node}:1", f"{node}:2", "file", 1 << 30, 1 << 30,
                                    (), 0), n.lease)


async def setup(sim: Sim, volumes: int) -> None:
    for node in NODES:
        await register(sim, node)
    for i in range(volumes):
        count = sim.rng.choice([1, 2, 3])
        placed = sim.rng.sample(NODES, count)
        min_in_sync = sim.rng.choice([1, 1, 1, min(2, count)])
        vid = f"vol-{i}"
        await sim.store.create_volume(volume_record(vid, placed, min_in_sync))
        for node in placed:
            sim.nodes[node].replicas[vid] = Replica()


def raise_violation(sim: Sim, text: str) -> None:
    raise Violation(f"seed {sim.seed}: {text}\n  last steps:\n    " +
                    "\n    ".join(sim.log[-25:]))


def on_replica_delete(sim: Sim, node: str, volume_id: str,
                      record: VolumeRecord | None) -> None:
    """A replica is about to be deleted: it must not be the last good copy (I1b)."""
    if record is None or record.phase is not VolumePhase.READY:
        return
    others = [n for n in record.isr if n != node and n in sim.nodes
              and volume_id in sim.nodes[n].replicas]
    if not others:
        raise_violation(sim, f"replica of {volume_id} on {node} deleted while it is the last "
                        f"good copy (isr {list(record.isr)})")
