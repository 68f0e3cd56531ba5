"""Controller domain logic: the volume lifecycle over etcd and the node agents.

Create is two-phase so a crash half-way leaves nothing unaccounted for: the record is
written first (phase ``creating``, create-if-absent with the name index), then the replicas,
then the record flips to ``ready`` by compare-and-swap. A retry of the same CreateVolume
rolls a ``creating`` record forward (replica creation is idempotent); the reconciler rolls
back records stuck in ``creating`` and finishes ``deleting`` ones. Servicers call this
module; it never sees a gRPC message.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from csi_driver import errors
from csi_driver.config import TOPOLOGY_KEY
from csi_driver.controller.placement import Candidate, PlacementError, place, usable_capacity
from csi_driver.locks import VolumeLocks
from csi_driver.node.agent import AgentClients
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

_CAS_RETRIES = 8


@dataclass(frozen=True)
class CreateSpec:
    """A validated CreateVolume request."""

    name: str
    size_bytes: int
    limit_bytes: int
    replicas: int
    fs_type: str
    access_type: str
    parameters: tuple[tuple[str, str], ...]
    min_in_sync: int = 1
    requisite: tuple[Mapping[str, str], ...] = ()
    preferred: tuple[Mapping[str, str], ...] = ()


def volume_id_for(name: str) -> str:
    """Deterministic id: a retried CreateVolume maps to the same record without a lookup."""
    return "vol-" + hashlib.sha256(name.encode()).hexdigest()[:24]


def _check_compatible(existing: VolumeRecord, spec: CreateSpec) -> None:
    if existing.name != spec.name:
        raise errors.AlreadyExistsError(f"volume id collision for name {spec.name!r}")
    if existing.size_bytes < spec.size_bytes or (
        spec.limit_bytes and existing.size_bytes > spec.limit_bytes
    ):
        raise errors.AlreadyExistsError(
            f"volume {spec.name!r} exists with {existing.size_bytes} bytes, incompatible "
            "with the requested capacity range"
        )
    if existing.access_type != spec.access_type:
        raise errors.AlreadyExistsError(
            f"volume {spec.name!r} exists with access type {existing.access_type}"
        )
    if dict(existing.parameters) != dict(spec.parameters):
        raise errors.AlreadyExistsError(f"volume {spec.name!r} exists with other parameters")
    if existing.access_type == "mount" and existing.fs_type != spec.fs_type:
        raise errors.AlreadyExistsError(
            f"volume {spec.name!r} exists with fs type {existing.fs_type}"
        )
    nodes = [{TOPOLOGY_KEY: n} for n in existing.replica_nodes()]
    if spec.requisite and not any(
        all(t.get(k) == v for k, v in req.items()) for req in spec.requisite for t in nodes
    ):
        raise errors.AlreadyExistsError(
            f"volume {spec.name!r} exists on {list(existing.replica_nodes())}, outside the "
            "requisite topologies"
        )


def candidates(nodes: Sequence[NodeRecord], volumes: Sequence[VolumeRecord]) -> list[Candidate]:
    counts: dict[str, int] = {}
    for volume in volumes:
        for node_id in volume.replica_nodes():
            counts[node_id] = counts.get(node_id, 0) + 1
    return [
        Candidate(
            node_id=n.node_id,
            free_bytes=n.free_bytes,
            segments=dict(n.topology),
            volume_count=counts.get(n.node_id, 0),
            max_volumes=n.max_volumes,
        )
        for n in nodes
    ]


class VolumeService:
    """Create / delete / expand / list, with the rules in the module docstring."""

    def __init__(self, store: Store, agents: AgentClients, locks: VolumeLocks) -> None:
        self._store = store
        self._agents = agents
        self._locks = locks

    async def live_nodes(self) -> dict[str, NodeRecord]:
        return {v.value.node_id: v.value for v in await self._store.list_nodes()}

    async def get(self, volume_id: str) -> VolumeRecord:
        found = await self._store.get_volume(volume_id)
        if found is None or found.value.phase is VolumePhase.DELETING:
            raise errors.NotFoundError(f"volume {volume_id} does not exist")
        return found.value

    async def list_ready(self) -> list[VolumeRecord]:
        return [
            v.value
            for v in await self._store.list_volumes()
            if v.value.phase is VolumePhase.READY
        ]

    async def create(self, spec: CreateSpec) -> VolumeRecord:
        volume_id = volume_id_for(spec.name)
        with self._locks.hold(volume_id):
            existing = await self._store.get_volume(volume_id)
            if existing is not None:
                _check_compatible(existing.value, spec)
                if existing.value.phase is VolumePhase.READY:
                    return existing.value
                if existing.value.phase is VolumePhase.DELETING:
                    raise errors.OperationPendingError(f"volume {spec.name!r} is being deleted")
                return await self._finish_create(existing)
            record = await self._new_record(volume_id, spec)
            try:
                created = await self._store.create_volume(record)
            except store_errors.AlreadyExistsError as exc:
                raise errors.OperationPendingError(
                    f"volume {spec.name!r} is being created by another caller"
                ) from exc
            log.info("volume=%s name=%s placed on %s", volume_id, spec.name,
                     ",".join(record.replica_nodes()))
            return await self._finish_create(created)

    async def _new_record(self, volume_id: str, spec: CreateSpec) -> VolumeRecord:
        nodes = await self.live_nodes()
        if not nodes:
            raise errors.ResourceExhaustedError("no live tandem nodes are registered")
        volumes = [v.value for v in await self._store.list_volumes()]
        count = min(spec.replicas, len(nodes))
        if count < spec.min_in_sync:
            # Placed short, such a volume could never acknowledge a write: refuse it now.
            raise errors.ResourceExhaustedError(
                f"minInSync {spec.min_in_sync} needs {spec.min_in_sync} replica nodes; only "
                f"{len(nodes)} live tandem nodes are registered")
        try:
            chosen = place(
                candidates(list(nodes.values()), volumes),
                spec.size_bytes,
                count,
                requisite=spec.requisite,
                preferred=spec.preferred,
            )
        except PlacementError as exc:
            raise errors.ResourceExhaustedError(str(exc)) from exc
        return VolumeRecord(
            volume_id=volume_id,
            name=spec.name,
            size_bytes=spec.size_bytes,
            replicas=tuple(ReplicaRef(n, ReplicaState.CREATING) for n in chosen),
            isr=(),
            epoch=0,
            owner=None,
            phase=VolumePhase.CREATING,
            fs_type=spec.fs_type,
            access_type=spec.access_type,
            parameters=spec.parameters,
            created_at=time.time(),
        )

    async def _finish_create(self, versioned: Versioned[VolumeRecord]) -> VolumeRecord:
        record = versioned.value
        nodes = await self.live_nodes()
        # Wait for every creation to finish before judging: rolling back while one is still
        # in flight would let it land after the rollback deleted it (an orphan).
        results = await asyncio.gather(
            *(self._create_replica(nodes, n, record) for n in record.replica_nodes()),
            return_exceptions=True,
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            log.warning("volume=%s replica creation failed; rolling back", record.volume_id)
            await self.remove(versioned)
            raise failures[0]
        ready = record.with_(
            phase=VolumePhase.READY,
            replicas=tuple(ReplicaRef(n, ReplicaState.READY) for n in record.replica_nodes()),
            isr=record.replica_nodes(),
        )
        return (await self._store.update_volume(ready, versioned.mod_revision)).value

    async def _create_replica(
        self, nodes: Mapping[str, NodeRecord], node_id: str, record: VolumeRecord
    ) -> None:
        node = nodes.get(node_id)
        if node is None:
            raise errors.UnavailableError(f"replica node {node_id} is not live")
        await self._agents.create_replica(node.agent_address, record.volume_id, record.size_bytes)

    async def delete(self, volume_id: str) -> None:
        with self._locks.hold(volume_id):
            found = await self._store.get_volume(volume_id)
            if found is None:
                return
            if found.value.owner is not None and found.value.phase is VolumePhase.READY:
                raise errors.FailedPreconditionError(
                    f"volume {volume_id} is staged on node {found.value.owner}"
                )
            await self.remove(found)

    async def remove(self, versioned: Versioned[VolumeRecord]) -> None:
        """Mark deleting, delete replicas on live nodes, drop the record.

        Replicas on nodes that are down are left for that node's orphan sweep when it
        returns (it deletes replicas that no record names).
        """
        record = versioned.value
        if record.phase is not VolumePhase.DELETING:
            versioned = await self._store.update_volume(
                record.with_(phase=VolumePhase.DELETING), versioned.mod_revision
            )
        nodes = await self.live_nodes()
        live = [nodes[n] for n in record.replica_nodes() if n in nodes]
        results = await asyncio.gather(
            *(self._agents.delete_replica(n.agent_address, record.volume_id) for n in live),
            return_exceptions=True,
        )
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise errors.UnavailableError(
                f"volume {record.volume_id}: {len(failed)} replica deletions failed "
                f"({failed[0]}); the record stays in phase deleting and is retried"
            )
        await self._store.delete_volume(record.volume_id, versioned.mod_revision)
        log.info("volume=%s deleted", record.volume_id)

    async def expand(
        self, volume_id: str, size_bytes: int, access_type: str | None = None
    ) -> VolumeRecord:
        with self._locks.hold(volume_id):
            for _ in range(_CAS_RETRIES):
                found = await self._store.get_volume(volume_id)
                if found is None or found.value.phase is not VolumePhase.READY:
                    raise errors.NotFoundError(f"volume {volume_id} does not exist")
                record = found.value
                if access_type is not None and access_type != record.access_type:
                    raise errors.InvalidArgumentError(
                        f"volume {volume_id} is a {record.access_type} volume"
                    )
                if size_bytes <= record.size_bytes:
                    return record
                if record.owner is not None:
                    # The NBD export's size is fixed while served (offline expansion).
                    raise errors.FailedPreconditionError(
                        f"volume {volume_id} is staged on {record.owner}; unstage it to expand"
                    )
                nodes = await self.live_nodes()
                missing = [n for n in record.replica_nodes() if n not in nodes]
                if missing:
                    raise errors.UnavailableError(
                        f"cannot expand {volume_id}: replica nodes {missing} are down"
                    )
                await asyncio.gather(
                    *(
                        self._agents.resize_replica(nodes[n].agent_address, volume_id, size_bytes)
                        for n in record.replica_nodes()
                    )
                )
                try:
                    updated = await self._store.update_volume(
                        record.with_(size_bytes=size_bytes), found.mod_revision
                    )
                    return updated.value
                except store_errors.ConflictError:
                    continue  # a node changed owner/epoch meanwhile: re-read and retry
            raise errors.OperationPendingError(f"volume {volume_id} keeps changing; retry")

    async def capacity(self, topology: Mapping[str, str] | None, replicas: int) -> int:
        nodes = list((await self.live_nodes()).values())
        volumes = [v.value for v in await self._store.list_volumes()]
        cands = candidates(nodes, volumes)
        if topology:
            node_id = topology.get(TOPOLOGY_KEY)
            matching = [c for c in cands if c.node_id == node_id]
            return matching[0].free_bytes if matching else 0
        return usable_capacity(cands, min(replicas, len(cands)) if cands else 1)
