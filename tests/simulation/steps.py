"""What happens in one simulation step: the data plane's side of a write, a stage, a rebuild,
time passing; and the invariants checked after every step (see ``model``)."""

from __future__ import annotations

import contextlib

from csi_driver import errors
from csi_driver.state import errors as store_errors
from csi_driver.state.model import VolumePhase, VolumeRecord, min_in_sync_of
from replication.ack_rule import plan_failure, write_refusal
from replication.authority import AuthorityUnavailableError, FencedError
from tests.simulation.model import (
    TTL,
    Sim,
    SimAuthority,
    SimKeeper,
    Target,
    raise_violation,
    register,
)

STAGE_REFUSED = (errors.FailedPreconditionError, errors.NotFoundError,
                 errors.OperationPendingError, store_errors.StoreError)


def peek(sim: Sim) -> dict[str, VolumeRecord]:
    """The records as they are in "etcd", whatever the faults (the checker's view)."""
    return {k.removeprefix("volumes/"): VolumeRecord.from_json(e.value)
            for k, e in sim.store._kv.entries.items() if k.startswith("volumes/")}


async def may_serve(sim: Sim, t: Target) -> bool:
    """The target's self-fencing check; a target that may not acknowledge tries to regain
    its claim (replication.hold), as the real one does while it holds I/O."""
    if t.fenced is not None or not sim.nodes[t.node].alive:
        return False
    if t.authority.may_acknowledge():
        return True
    try:
        await t.authority.regain()
    except FencedError as exc:
        t.fenced = str(exc)
        return False
    except AuthorityUnavailableError:
        return False
    sim.note(f"{t.node} regained {t.volume} at epoch {t.epoch}")
    return t.authority.may_acknowledge()


async def write(sim: Sim, t: Target) -> None:
    if not await may_serve(sim, t) or write_refusal(t.isr, t.min_in_sync) is not None:
        return
    block = sim.rng.randrange(16)
    sim.seq += 1
    failed, stale = [], False
    for member in list(t.isr):
        replica = sim.nodes[member].replicas.get(t.volume)
        if replica is None or not sim.link(t.node, member) or sim.nodes[member].disk_full:
            failed.append(member)
        elif replica.fence > t.epoch:
            stale = True
        else:
            replica.blocks[block] = sim.seq
    if stale:
        t.fenced = "a replica is fenced higher"
        return
    if failed and not await _drop(t, failed):
        return
    if write_refusal(t.isr, t.min_in_sync) is not None or not t.authority.may_acknowledge():
        return
    _acknowledge(sim, t, block)


async def _drop(t: Target, failed: list[str]) -> bool:
    """The target's failure handling; False when the write must not be acknowledged."""
    plan = plan_failure(t.isr, failed)
    if plan.fence is not None:
        t.fenced = plan.fence
        return False
    try:
        new_isr = await t.authority.remove_from_isr(frozenset(plan.remove), "simulated failure")
    except FencedError as exc:
        t.fenced = str(exc)
        return False
    except AuthorityUnavailableError:
        return False
    t.isr = [n for n in t.isr if n not in plan.remove and n in new_isr]
    return True


def _acknowledge(sim: Sim, t: Target, block: int) -> None:
    record = peek(sim).get(t.volume)
    if record is None or record.epoch != t.epoch or record.owner != t.node:
        raise_violation(sim, f"{t.node} acknowledged a write to {t.volume} at epoch {t.epoch} "
                        f"while the record says {record and (record.owner, record.epoch)}")
    owners = sim.acks_by_epoch.setdefault((t.volume, t.epoch), set())
    owners.add(t.node)
    if len(owners) > 1:
        raise_violation(sim, f"two owners acknowledged {t.volume} at epoch {t.epoch}: {owners}")
    sim.acked[(t.volume, block)] = sim.seq
    sim.note(f"{t.node} acked {t.volume} block {block} seq {sim.seq} isr {t.isr}")


async def stage(sim: Sim, volume_id: str, node: str) -> bool:
    """NodeStageVolume: the real takeover, then the target's fencing (replication.fencing)."""
    if not sim.nodes[node].alive:
        return False
    ownership = sim.ownership(node)
    try:
        record = await ownership.acquire(volume_id)
    except STAGE_REFUSED:
        return False
    lease = ownership.lease(volume_id)
    assert lease is not None
    authority = SimAuthority(sim.view(node), volume_id, node, record.epoch, lease.lease_id,
                             TTL, lease.granted_monotonic, clock=sim.clock,
                             change_deadline_s=0.0)
    fenced = []
    for member in record.replica_nodes():
        replica = sim.nodes[member].replicas.get(volume_id)
        if replica is not None and sim.link(node, member) and replica.fence <= record.epoch:
            replica.fence = record.epoch
            fenced.append(member)
    isr = [n for n in record.isr if n in fenced]
    try:
        if not isr:
            raise FencedError("none of the in-sync replicas could be fenced")
        if set(record.isr) - set(isr):
            await authority.remove_from_isr(frozenset(set(record.isr) - set(isr)), "takeover")
    except (FencedError, AuthorityUnavailableError):
        await _give_back(authority, ownership, volume_id)
        return False
    source = sim.nodes[isr[0]].replicas[volume_id]
    for member in isr[1:]:  # convergence (I4): the other members become the source's copy
        sim.nodes[member].replicas[volume_id].blocks = dict(source.blocks)
    old = sim.targets.get(volume_id)
    if old is not None:
        sim.zombies.append(old)
    sim.targets[volume_id] = Target(node, volume_id, record.epoch, authority, isr,
                                    min_in_sync_of(record))
    sim.note(f"{node} staged {volume_id} epoch {record.epoch} isr {isr}")
    return True


async def _give_back(authority: SimAuthority, ownership: object, volume_id: str) -> None:
    with contextlib.suppress(store_errors.StoreError):
        await authority.release()
    with contextlib.suppress(*STAGE_REFUSED):
        await ownership.release(volume_id)  # type: ignore[attr-defined]


async def unstage(sim: Sim, volume_id: str) -> None:
    t = sim.targets.pop(volume_id, None)
    if t is None or not sim.nodes[t.node].alive:
        return
    await _give_back(t.authority, sim.ownership(t.node), volume_id)
    sim.note(f"{t.node} unstaged {volume_id}")


async def rebuild(sim: Sim, t: Target) -> None:
    """The target's rejoin loop: copy a reachable out-of-sync replica, then join by CAS."""
    if not await may_serve(sim, t):
        return
    record = peek(sim).get(t.volume)
    if record is None:
        return
    source = sim.nodes[t.isr[0]].replicas.get(t.volume)
    for node in record.replica_nodes():
        replica = sim.nodes[node].replicas.get(t.volume)
        if (node in t.isr or replica is None or source is None or not sim.link(t.node, node)
                or sim.nodes[node].disk_full or replica.fence > t.epoch):
            continue
        replica.fence = t.epoch
        replica.blocks = dict(source.blocks)
        try:
            new_isr = await t.authority.add_to_isr(node)
        except (FencedError, AuthorityUnavailableError, store_errors.StoreError):
            return
        t.isr = [n for n in t.isr if n in new_isr] + [node]
        sim.note(f"{t.node} rebuilt {t.volume} on {node}: isr {t.isr}")
        return


async def renew(sim: Sim) -> None:
    """Every live node that reaches etcd keeps its node lease and its targets' leases."""
    for node in sim.nodes.values():
        if not sim.etcd_ok(node.node_id) or node.slow:
            continue
        view = sim.view(node.node_id)
        try:
            if node.lease is None:
                await register(sim, node.node_id)
            else:
                await view.keep_alive_once(node.lease)
        except store_errors.LeaseExpiredError:
            node.lease = None
    for t in [*sim.targets.values(), *sim.zombies]:
        keeper = t.authority.keeper
        if not sim.etcd_ok(t.node) or sim.nodes[t.node].slow or keeper.lost:
            continue
        assert isinstance(keeper, SimKeeper)
        sent = sim.clock()
        try:
            await sim.view(t.node).keep_alive_once(keeper.lease_id)
            keeper.last_renewed = sent
        except store_errors.LeaseExpiredError:
            keeper.lost = True


def check(sim: Sim) -> None:
    """The invariants, after every step."""
    records = peek(sim)
    for vid, record in records.items():
        if record.phase is not VolumePhase.READY:
            continue
        if not record.isr:
            raise_violation(sim, f"{vid}: empty ISR")
        if not set(record.isr) <= set(record.replica_nodes()):
            raise_violation(sim, f"{vid}: isr {record.isr} not within {record.replica_nodes()}")
        for node in record.isr:
            replica = sim.nodes[node].replicas.get(vid)
            if replica is None:
                raise_violation(sim, f"{vid}: ISR member {node} has no replica")
    for (vid, block), seq in sim.acked.items():
        found = records.get(vid)
        if found is None:
            continue
        for node in found.isr:
            have = sim.nodes[node].replicas[vid].blocks.get(block, 0)
            if have < seq:
                raise_violation(sim, f"{vid}: acknowledged block {block} seq {seq} lost on "
                                f"ISR member {node} (has {have})")
