"""Fault modes of ``tandem bench failover`` beyond killing the owner (issue 10).

Each trial, like a kill trial: a fresh 3-replica volume is staged and published on one node
and writer threads write checksummed, sequence-numbered blocks through it; 0.5-2 s in, one
fault is injected, held for a random while, and healed:

- ``replica-stop``: SIGSTOP every process of a replica node that is not the owner (a node
  stalled by a hung disk or swapping), then SIGCONT;
- ``partition``: cut such a node off from its peers (nft drop; processes alive), then heal;
- ``etcd-outage``: stop etcd (the owner holds I/O instead of failing it), then start it;
- ``enospc``: the pools' filesystems fill up (small tmpfs mounts over the pool directories
  and a filler file): on one replica node, or on all three at once (then the owner fences
  itself and fails writes), then space is freed.

Then the trial proves what every mode must: no acknowledged write lost (``crashcheck``),
every in-sync replica equal to what the owner serves (``settle``), and the volume
recoverable (written again, restaged if the fault fenced its owner); a volume that cannot
be is counted ``unrecoverable``. Time to heal, from the end of the fault: ``replica-stop``
and ``partition`` until the ISR holds all three replicas again; ``etcd-outage`` until the
writers' next acknowledged write (same device, no restage); ``enospc`` until the next
acknowledged write (after a restage when all replicas were full) and the ISR is whole.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from csi_driver.client import CsiClient
from devtools import devcluster
from devtools import failover_io as fio
from devtools.crashcheck import BLOCK_SIZE, WriterLog, check
from devtools.failover_csi import (
    create_block_volume,
    describe,
    publish,
    stage,
    take_over,
    unpublish_unstage,
)
from devtools.failover_trial import (
    WRITE_BLOCKS,
    TrialResult,
    best_effort,
    cleanup_volume,
    settle,
    volume_isr,
)

FAULT_MODES = ("replica-stop", "partition", "etcd-outage", "enospc")
HEAL_TIMEOUT_S = 90.0
_TMPFS_BYTES = 24 << 20  # a pool filesystem that the writers' 16 MiB region can fill


class Unrecoverable(RuntimeError):
    """The volume could not be written (and checked) again after the fault healed."""


class NotHealed(RuntimeError):
    """The volume serves, but its ISR was not whole again in time."""


@dataclass
class Trial:
    """What a fault needs to act and what it reports back."""

    spec: devcluster.ClusterSpec
    volume_id: str
    owner: str
    replicas: tuple[str, ...]
    rng: random.Random
    work: Path
    clients: dict[str, CsiClient]
    log: WriterLog
    device: Path
    writer: fio.BlockWriter | None = None
    fault: str = ""  # a word on what was done (which node, how long)
    heal_s: float | None = None
    restaged: bool = False  # the owner fenced itself: the volume was staged again

    @property
    def dir(self) -> Path:
        return Path(self.spec.dir)

    def other_replica(self) -> str:
        return self.rng.choice([n for n in self.replicas if n != self.owner])


def _wait_isr_whole(t: Trial, since: float) -> float:
    deadline = time.monotonic() + HEAL_TIMEOUT_S
    while set(volume_isr(t.spec, t.volume_id)) != set(t.replicas):
        if time.monotonic() > deadline:
            raise NotHealed(f"the ISR was not whole {HEAL_TIMEOUT_S:g} s after the fault")
        time.sleep(0.1)
    return time.monotonic() - since


def _wait_new_ack(t: Trial, since: float, timeout_s: float = HEAL_TIMEOUT_S) -> float:
    """Seconds from ``since`` until the writers' first write acknowledged after it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = [w.completed for w in t.log.acked()
                if w.completed is not None and w.completed > since]
        if done:
            return min(done) - since
        time.sleep(0.05)
    raise Unrecoverable(f"no write acknowledged within {timeout_s:g} s after the fault")


def _replica_stop(t: Trial) -> None:
    victim, hold = t.other_replica(), t.rng.uniform(2.0, 10.0)
    t.fault = f"{victim} stopped {hold:.1f}s"
    devcluster.pause_node(t.dir, victim)
    try:
        time.sleep(hold)
    finally:
        devcluster.pause_node(t.dir, victim, resume=True)
    t.heal_s = _wait_isr_whole(t, time.monotonic())


def _partition(t: Trial) -> None:
    victim, hold = t.other_replica(), t.rng.uniform(2.0, 10.0)
    t.fault = f"{victim} cut off {hold:.1f}s"
    devcluster.partition_node(t.dir, victim, from_etcd=False, from_peers=True)
    try:
        time.sleep(hold)
    finally:
        devcluster.heal_node(t.dir, victim)
    t.heal_s = _wait_isr_whole(t, time.monotonic())


def _etcd_outage(t: Trial) -> None:
    hold = t.rng.uniform(1.0, 6.0)
    t.fault = f"etcd down {hold:.1f}s"
    stopped = devcluster.stop_etcd(t.dir)
    try:
        time.sleep(hold)
    finally:
        back = devcluster.start_etcd(t.dir, stopped)
    t.heal_s = _wait_new_ack(t, back)


def _enospc(t: Trial) -> None:
    everywhere = t.rng.random() < 0.5
    full = list(t.replicas) if everywhere else [t.other_replica()]
    t.fault = f"pools full on {','.join(full)}"
    fillers = [Path(t.spec.node(n).pool.dir) / "filler" for n in full]
    for filler in fillers:
        _fill(filler)
    try:
        if everywhere:  # every replica fails: the owner fences itself, writes fail
            _wait_failed_write(t, time.monotonic())
        else:
            time.sleep(t.rng.uniform(1.0, 4.0))
    finally:
        for filler in fillers:
            filler.unlink(missing_ok=True)
    freed = time.monotonic()
    if everywhere:
        _restage(t)
        t.heal_s = _wait_new_ack(t, freed)
    _wait_isr_whole(t, freed)
    t.heal_s = time.monotonic() - freed if t.heal_s is None else t.heal_s


def _fill(filler: Path) -> None:
    """Fill the filesystem of ``filler`` but for a few blocks (then ENOSPC is near)."""
    chunk = b"\1" * (64 << 10)
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while True:  # unbuffered: a buffered file would raise ENOSPC again on close
            os.write(fd, chunk)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
    # Leave ~64 KiB: the writers fill it at once.
    os.truncate(filler, max(0, filler.stat().st_size - (64 << 10)))


def _wait_failed_write(t: Trial, since: float, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(not w.acked and w.completed is not None and w.completed > since
               for w in t.log.writes()):
            return
        time.sleep(0.05)
    raise RuntimeError("no write failed although every pool was full")


def _restage(t: Trial) -> None:
    """The owner fenced itself: stop its writers, stage the volume again on the same node,
    publish, and write on through the new device."""
    assert t.writer is not None
    t.writer.stop()
    node = t.clients[t.owner]
    unpublish_unstage(node, t.volume_id, t.work / "staging", t.device)
    try:
        takeover = take_over(node, t.volume_id, t.work / "staging-2")
    except TimeoutError as exc:
        raise Unrecoverable(f"not staged again after space was freed: {exc}") from exc
    t.log.mark_takeover(takeover.staged_at, {t.writer.writer})
    t.device = t.work / "pod-2" / "dev"
    publish(node, t.volume_id, t.work / "staging-2", t.device)
    t.restaged = True
    t.writer = fio.BlockWriter(t.device, t.log, fio.new_writer_id(), WRITE_BLOCKS,
                               seed=t.rng.getrandbits(32))
    t.writer.start()


INJECT: dict[str, Callable[[Trial], None]] = {
    "replica-stop": _replica_stop, "partition": _partition, "etcd-outage": _etcd_outage,
    "enospc": _enospc,
}


def prepare_pools(spec: devcluster.ClusterSpec, mode: str) -> list[Path]:
    """For ``enospc``: a small tmpfs over every node's pool directory (empty between
    trials); returns the mounts to remove with ``release_pools``."""
    if mode != "enospc":
        return []
    mounted = []
    for node in spec.nodes:
        pool = Path(node.pool.dir)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={_TMPFS_BYTES}", "tandem-enospc",
                        str(pool)], check=True, capture_output=True)
        mounted.append(pool)
    return mounted


def release_pools(mounted: list[Path]) -> list[str]:
    errors = []
    for pool in mounted:
        result = subprocess.run(["umount", "-l", str(pool)], capture_output=True, text=True)
        if result.returncode != 0:
            errors.append(f"umount {pool}: {result.stderr.strip()}")
    return errors


def _thread_stacks(pid: int | str) -> str:
    """Each thread's state and kernel stack (where a stuck I/O waits)."""
    out = []
    for task in sorted(Path(f"/proc/{pid}/task").glob("*")):
        try:
            state = next((ln for ln in (task / "status").read_text().splitlines()
                          if ln.startswith("State:")), "State: ?")
            wchan = (task / "wchan").read_text().strip()
            stack = (task / "stack").read_text().strip()
        except OSError as exc:
            out.append(f"task {task.name}: {exc}")
            continue
        out.append(f"task {task.name} {state} wchan={wchan}\n{stack}")
    return "\n".join(out)


def _kernel_evidence(t: Trial) -> None:
    """Where the stuck writer's I/O waits, below the target: this process's writer threads,
    the volume's nbdfuse and the loop device (kept beside the trial)."""
    state = Path(t.spec.node(t.owner).state_dir)
    parts = [f"== writer process {os.getpid()}\n{_thread_stacks('self')}"]
    pidfile = state / "attach" / t.volume_id / "nbdfuse.pid"
    try:
        pid = int(pidfile.read_text().split()[0])
        parts.append(f"== nbdfuse {pid}\n{_thread_stacks(pid)}")
    except (OSError, ValueError, IndexError) as exc:
        parts.append(f"== nbdfuse: {exc}")
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    parts.append("== loop devices\n" + "\n".join(
        ln for ln in loops.splitlines() if t.volume_id in ln))
    for line in loops.splitlines():
        if t.volume_id in line:
            name = line.split(":", 1)[0].removeprefix("/dev/")
            with contextlib.suppress(OSError):
                inflight = Path(f"/sys/block/{name}/inflight").read_text().split()
                parts.append(f"{name} inflight reads/writes: {' '.join(inflight)}")
    with contextlib.suppress(OSError):
        (t.work / "kernel.txt").write_text("\n".join(parts) + "\n")


def _dump_target(t: Trial) -> str:
    """Ask the owner's target for its state (SIGUSR1, csi_driver/node/target_dump.py) and keep
    its log beside the trial: evidence for a hang, before the next cluster wipes it."""
    state = Path(t.spec.node(t.owner).state_dir)
    try:
        (entry, *_) = sorted((state / "local-writers").glob(f"{t.volume_id}.*.writer"),
                             reverse=True)
        os.kill(int(json.loads(entry.read_text())["pid"]), signal.SIGUSR1)
        time.sleep(1.0)
        shutil.copy(state / "targets" / f"{t.volume_id}.log", t.work / "target.log")
    except (OSError, ValueError, KeyError) as exc:
        return f"no target state: {exc}"
    return f"target state in {t.work / 'target.log'}"


def run_fault(t: Trial, mode: str, fault_after_s: float) -> tuple[list[str], int | None]:
    """Stage, write, inject ``mode``, heal, check: (violations, acknowledged writes lost).
    Raises Unrecoverable when the healed volume takes no write or cannot be read back."""
    node = t.clients[t.owner]
    stage(node, t.volume_id, t.work / "staging")
    publish(node, t.volume_id, t.work / "staging", t.device)
    t.writer = fio.BlockWriter(t.device, t.log, fio.new_writer_id(), WRITE_BLOCKS,
                               seed=t.rng.getrandbits(32))
    t.writer.start()
    try:
        time.sleep(fault_after_s)
        INJECT[mode](t)
        time.sleep(0.5)  # a little more writing on the healed volume
    finally:
        if t.writer is not None and not t.writer.stop():
            _kernel_evidence(t)
            where = _dump_target(t)
            raise RuntimeError(f"writer threads still stuck in I/O after 60 s ({where})")
    if fio.write_one(t.device, t.log, fio.new_writer_id(), 0, 1) is None:
        raise Unrecoverable("the volume takes no write after the fault healed")
    size = fio.VOLUME_BYTES
    try:
        problems = settle(t.spec, t.volume_id, lambda: fio.read_device(t.device, size))
        image = fio.read_device(t.device, size)
    except OSError as exc:
        raise Unrecoverable(f"the healed volume cannot be read back: {exc}") from exc
    outcome = check(t.log, fio.BlockReader(image), size // BLOCK_SIZE)
    return [str(v) for v in outcome.violations] + problems, outcome.lost_acks


def run_fault_trial(spec: devcluster.ClusterSpec, trial: int, mode: str,
                    rng: random.Random, work: Path) -> TrialResult:
    """One fault trial; never raises: failures are in the result's ``errors``."""
    owner = rng.choice([n.id for n in spec.nodes])
    result = TrialResult(trial, mode, owner, owner)
    work.mkdir(parents=True, exist_ok=True)
    clients = {n.id: CsiClient(n.csi_endpoint) for n in spec.nodes}
    ctl = CsiClient(spec.controller.csi_endpoint)
    mounted: list[Path] = []
    t: Trial | None = None
    try:
        mounted = prepare_pools(spec, mode)
        result.volume_id, placed = create_block_volume(ctl, f"fault-{uuid.uuid4().hex[:12]}")
        t = Trial(spec, result.volume_id, owner, tuple(placed), rng, work, clients,
                  WriterLog(), work / "pod" / "dev")
        result.kill_after_s = rng.uniform(0.5, 2.0)
        result.violations, result.lost_acks = run_fault(t, mode, result.kill_after_s)
        result.heal_s = t.heal_s
    except Unrecoverable as exc:
        result.unrecoverable = True
        result.errors.append(describe(exc))
    except Exception as exc:  # the bench's own trouble: a failed trial, not a lost volume
        result.errors.append(describe(exc))
    finally:
        if t is not None:
            result.fault = t.fault
            result.acked_before_kill = len(t.log.acked())
            best_effort(result, "unstage", unpublish_unstage, clients[owner],
                        result.volume_id, t.work / ("staging-2" if t.restaged else "staging"),
                        t.device)
        cleanup_volume(result, ctl)
        result.errors += release_pools(mounted)
        for client in (*clients.values(), ctl):
            client.close()
    return result
