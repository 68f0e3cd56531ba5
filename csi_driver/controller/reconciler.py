"""The controller's reconciler: one pass reads a snapshot, decides, acts, says what it did.

- volumes stuck in ``creating`` past a grace period (a controller died mid-create) are rolled
  back, and ``deleting`` ones are finished;
- a replica whose node has been dead longer than the replacement grace is replaced: a new
  replica is placed on another live node with room, written into the record first (so the
  new node's orphan sweep never deletes it), then created through the node's agent. The
  owner's target rebuilds it (full copy of the regions holding data) and adds it to the ISR;
  an unowned volume's new replica is rebuilt when the volume is next staged.
The dead node's replica is left for that node's orphan sweep when it returns. Nothing is
replaced while no in-sync member is alive (``replica_decisions``): a dead node may then hold
the last good copy, and stays in the record until it returns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from csi_driver import errors
from csi_driver.controller.placement import PlacementError, place
from csi_driver.controller.volumes import VolumeService, candidates
from csi_driver.locks import VolumeLocks
from csi_driver.node.agent import AgentClients
from csi_driver.replica_decisions import replaceable
from csi_driver.state import errors as store_errors
from csi_driver.state.model import (
    NodeRecord,
    ReplicaRef,
    ReplicaState,
    Versioned,
    VolumePhase,
    VolumeRecord,
)
from csi_driver.state.store import Store

log = logging.getLogger(__name__)


@dataclass
class Reconciler:
    store: Store
    agents: AgentClients
    locks: VolumeLocks
    volumes: VolumeService
    creating_grace_s: float
    replace_after_s: float
    now: Callable[[], float]
    monotonic: Callable[[], float]
    # When each replica node was first seen dead (in-memory: a restart only delays).
    _dead_since: dict[str, float] = field(default_factory=dict)

    async def run_once(self) -> list[str]:
        """One pass; returns one sentence per action taken."""
        volumes = await self.store.list_volumes()
        nodes = {v.value.node_id: v.value for v in await self.store.list_nodes()}
        self._track_dead(volumes, nodes)
        actions: list[str] = []
        for versioned in volumes:
            record = versioned.value
            if self.locks.is_held(record.volume_id):
                continue
            try:
                with self.locks.hold(record.volume_id):
                    action = await self._reconcile(versioned, nodes, volumes)
            except (errors.TandemError, store_errors.StoreError) as exc:
                log.info("volume=%s reconcile deferred: %s", record.volume_id, exc)
                continue
            if action:
                log.info("volume=%s reconciled: %s", record.volume_id, action)
                actions.append(action)
        return actions

    def _track_dead(
        self, volumes: list[Versioned[VolumeRecord]], nodes: dict[str, NodeRecord]
    ) -> None:
        replica_nodes = {n for v in volumes for n in v.value.replica_nodes()}
        now = self.monotonic()
        for node in replica_nodes - set(nodes):
            self._dead_since.setdefault(node, now)
        for node in list(self._dead_since):
            if node in nodes:
                del self._dead_since[node]

    async def _reconcile(
        self, versioned: Versioned[VolumeRecord], nodes: dict[str, NodeRecord],
        volumes: list[Versioned[VolumeRecord]],
    ) -> str | None:
        record = versioned.value
        if record.phase is VolumePhase.DELETING or (
            record.phase is VolumePhase.CREATING
            and self.now() - record.created_at > self.creating_grace_s
        ):
            await self.volumes.remove(versioned)
            return f"removed half-{record.phase.value} volume"
        if record.phase is not VolumePhase.READY:
            return None
        now = self.monotonic()
        dead = {n for n, since in self._dead_since.items() if now - since >= self.replace_after_s}
        decision = replaceable(record, dead, nodes)
        if isinstance(decision, str):
            return decision
        if decision:
            return await self._replace(versioned, decision[0], nodes, volumes)
        return None

    async def _replace(
        self, versioned: Versioned[VolumeRecord], dead: str, nodes: dict[str, NodeRecord],
        volumes: list[Versioned[VolumeRecord]],
    ) -> str:
        record = versioned.value
        others = [n for n in nodes.values() if n.node_id not in record.replica_nodes()]
        try:
            (new,) = place(candidates(others, [v.value for v in volumes]), record.size_bytes, 1)
        except PlacementError as exc:
            return f"cannot replace replica on dead {dead}: {exc}"
        replicas = tuple(
            ReplicaRef(new, ReplicaState.REBUILDING) if r.node_id == dead else r
            for r in record.replicas
        )
        isr = tuple(n for n in record.isr if n != dead)
        updated = await self.store.update_volume(
            record.with_(replicas=replicas, isr=isr), versioned.mod_revision
        )
        try:
            await self.agents.create_replica(nodes[new].agent_address, record.volume_id,
                                             record.size_bytes)
        except errors.TandemError:
            await self.store.update_volume(record.with_(isr=isr), updated.mod_revision)
            raise
        return f"replica on {dead} (dead) replaced by a new one on {new}"
