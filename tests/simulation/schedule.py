"""A seeded random schedule of faults and actions over the simulation (``model``, ``steps``).

``run_seed(seed)`` is deterministic: the same seed makes the same choices in the same order
(one ``random.Random``, a manual clock, no wall time, no real concurrency), so a failing
seed replays exactly: ``pytest tests/simulation --sim-seed N``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from tests.simulation import steps
from tests.simulation.model import NODES, TTL, Sim, Target, raise_violation, setup

STEPS = 120
VOLUMES = 3
RECOVERY_ROUNDS = 12


def _live_targets(sim: Sim) -> list[Target]:
    return [t for t in [*sim.targets.values(), *sim.zombies] if sim.nodes[t.node].alive]


async def _write(sim: Sim) -> None:
    live = _live_targets(sim)
    if live:
        await steps.write(sim, sim.rng.choice(live))


async def _time(sim: Sim) -> None:
    sim.clock.advance(sim.rng.uniform(0.05, 0.7))
    await steps.renew(sim)


async def _stage(sim: Sim) -> None:
    vid = sim.rng.choice(sorted(steps.peek(sim)))
    await steps.stage(sim, vid, sim.rng.choice(NODES))


async def _race(sim: Sim) -> None:
    vid = sim.rng.choice(sorted(steps.peek(sim)))
    a, b = sim.rng.sample(NODES, 2)
    await asyncio.gather(steps.stage(sim, vid, a), steps.stage(sim, vid, b))


async def _unstage(sim: Sim) -> None:
    if sim.targets:
        await steps.unstage(sim, sim.rng.choice(sorted(sim.targets)))


async def _rebuild(sim: Sim) -> None:
    live = [t for t in sim.targets.values() if sim.nodes[t.node].alive]
    if live:
        await steps.rebuild(sim, sim.rng.choice(live))


def _toggle(attr: str) -> Callable[[Sim], Awaitable[None]]:
    async def flip(sim: Sim) -> None:
        node = sim.nodes[sim.rng.choice(NODES)]
        setattr(node, attr, not getattr(node, attr))
        sim.note(f"{node.node_id} {attr}={getattr(node, attr)}")
    return flip


async def _kill_or_revive(sim: Sim) -> None:
    node = sim.nodes[sim.rng.choice(NODES)]
    node.alive = not node.alive
    if node.alive:
        node.lease = None  # registers again at the next renewal
    sim.note(f"{node.node_id} {'revived' if node.alive else 'killed'}")


async def _etcd(sim: Sim) -> None:
    sim.store.set_unavailable(sim.store.available)
    sim.note(f"etcd {'up' if sim.store.available else 'down'}")


ACTIONS: list[tuple[int, Callable[[Sim], Awaitable[None]]]] = [
    (40, _write), (16, _time), (8, _stage), (3, _race), (4, _unstage), (6, _rebuild),
    (6, _kill_or_revive), (3, _toggle("disk_full")), (3, _etcd), (3, _toggle("etcd_cut")),
    (3, _toggle("peers_cut")), (3, _toggle("slow")),
]


def _forget_dead(sim: Sim) -> None:
    """Processes on a dead node are gone (their leases lapse in etcd by themselves)."""
    for vid, t in list(sim.targets.items()):
        if not sim.nodes[t.node].alive:
            del sim.targets[vid]
    sim.zombies = [t for t in sim.zombies if sim.nodes[t.node].alive and t.fenced is None]


async def _heal_and_recover(sim: Sim) -> None:
    """Every fault heals; then every volume must be stageable again (and writable when it
    has minInSync members), within a bounded number of rounds."""
    for node in sim.nodes.values():
        node.alive, node.etcd_cut, node.peers_cut, node.disk_full, node.slow = (
            True, False, False, False, False)
    sim.store.set_unavailable(False)
    sim.note("all faults healed")
    for vid in sorted(steps.peek(sim)):
        for _ in range(RECOVERY_ROUNDS):
            t = sim.targets.get(vid)
            if t is not None and t.fenced is None and await steps.may_serve(sim, t):
                break
            await steps.unstage(sim, vid)
            record = steps.peek(sim)[vid]
            order = [*record.isr, *[n for n in NODES if n not in record.isr]]
            if any([await steps.stage(sim, vid, n) for n in order[:1]]):
                continue
            for _ in range(int(TTL / 0.5) + 1):  # let an earlier claim lapse
                sim.clock.advance(0.5)
                await steps.renew(sim)
        else:
            raise_violation(sim, f"{vid} is not stageable after every fault healed")
        steps.check(sim)


async def run_seed(seed: int, steps_count: int = STEPS) -> Sim:
    sim = Sim.new(seed)
    await setup(sim, VOLUMES)
    weights = [w for w, _ in ACTIONS]
    for _ in range(steps_count):
        (action,) = sim.rng.choices([a for _, a in ACTIONS], weights)
        await action(sim)
        _forget_dead(sim)
        steps.check(sim)
    await _heal_and_recover(sim)
    return sim
