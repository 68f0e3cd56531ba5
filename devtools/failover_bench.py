"""Failover benchmark: kill a volume's owner mid-write, take over, prove nothing was lost.

``tandem bench failover --dir DIR --trials N [--mode sigkill|link-down] [--json OUT]
[--lease-ttl S]``. Each trial, on a 3-node dev cluster (reused if one is up in DIR, else
started and always torn down): a fresh 64 MiB 3-replica block volume is staged and published
on one replica node; writer threads write checksummed, sequence-numbered blocks (O_DIRECT
pwrite + fsync) through the published device, logging every acknowledgement; 0.5-2 s in,
the owner node is killed; NodeStageVolume + NodePublishVolume are retried on another replica
node until they succeed; one write + fsync goes through the new device (kill -> first
acknowledged write is the figure); then the device is read back and checked
(``crashcheck.check``). The killed node is revived before the next trial. Prints each trial,
p50/p90/p99/max, acknowledged writes lost (must be 0) and violations; ``--json`` writes it
all. The CSI helpers and ``run_trial`` are also used by the fault tests (tests/fault).
"""

from __future__ import annotations

import os

from csi_driver.config import DEFAULT_LEASE_TTL_S

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import argparse
import contextlib
import json
import random
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

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
from devtools.failover_summary import print_summary, summarize
from devtools.failover_trial import (
    WRITE_BLOCKS,
    TrialResult,
    best_effort,
    cleanup_volume,
    settle,
)
from devtools.fault_modes import FAULT_MODES, run_fault_trial

ALL_MODES = ("sigkill", "link-down", *FAULT_MODES)
POOL_BYTES = 2 << 30


# -- one trial ------------------------------------------------------------------------------


def _unstable(first: bytes, second: bytes) -> list[str]:
    """Blocks that changed between two reads with no write in between (I4)."""
    step = BLOCK_SIZE
    return [f"block {i // step} changed between two reads with no write in between"
            for i in range(0, min(len(first), len(second)), step)
            if first[i:i + step] != second[i:i + step]]


def _failover(
    spec: devcluster.ClusterSpec, result: TrialResult, mode: devcluster.KillMode,
    rng: random.Random, work: Path, clients: dict[str, CsiClient],
) -> None:
    owner, survivor = clients[result.owner], clients[result.survivor]
    log, size = WriterLog(), fio.VOLUME_BYTES
    old_dev, new_dev = work / "old-pod" / "dev", work / "new-pod" / "dev"
    stage(owner, result.volume_id, work / "old-staging")
    publish(owner, result.volume_id, work / "old-staging", old_dev)
    seed = rng.getrandbits(32)
    writer = fio.BlockWriter(old_dev, log, fio.new_writer_id(), WRITE_BLOCKS, seed=seed)
    writer.start()
    try:
        result.kill_after_s = rng.uniform(0.5, 2.0)
        time.sleep(result.kill_after_s)
        killed_at = time.monotonic()
        result.acked_before_kill = len(log.acked())
        devcluster.kill_node(Path(spec.dir), result.owner, mode)
        try:
            takeover = take_over(survivor, result.volume_id, work / "new-staging")
        except TimeoutError:
            result.unrecoverable = True
            raise
        log.mark_takeover(takeover.staged_at, {writer.writer})
        result.kill_to_stage_s = takeover.staged_at - killed_at
        result.stage_attempts, result.refusals = takeover.attempts, takeover.answers
        publish(survivor, result.volume_id, work / "new-staging", new_dev)
        acked_at = fio.write_one(new_dev, log, fio.new_writer_id(), rng.randrange(WRITE_BLOCKS), 1)
        if acked_at is None:
            result.unrecoverable = True
            raise RuntimeError("the first write on the new owner failed")
        result.kill_to_first_ack_s = acked_at - killed_at
        first = fio.read_device(new_dev, size)  # before convergence may have finished
    finally:
        if not writer.stop():
            result.errors.append("old writer threads still stuck in I/O after 60 s")
    result.old_writes_failed = sum(
        1 for w in log.writes() if w.writer == writer.writer and not w.acked)
    problems = settle(spec, result.volume_id, lambda: fio.read_device(new_dev, size))
    second = fio.read_device(new_dev, size)
    outcome = check(log, fio.BlockReader(second), size // BLOCK_SIZE)
    result.lost_acks = outcome.lost_acks
    found = [str(v) for v in outcome.violations] + problems + _unstable(first, second)
    result.violations = found[:20]


def run_trial(
    spec: devcluster.ClusterSpec, trial: int, mode: devcluster.KillMode, rng: random.Random,
    work: Path,
) -> TrialResult:
    """One kill-and-take-over; never raises: failures are in the result's ``errors``."""
    ids = [n.id for n in spec.nodes]
    owner = rng.choice(ids)
    result = TrialResult(trial, mode, owner, rng.choice([n for n in ids if n != owner]))
    work.mkdir(parents=True, exist_ok=True)
    clients = {n.id: CsiClient(n.csi_endpoint) for n in spec.nodes}
    ctl = CsiClient(spec.controller.csi_endpoint)
    try:
        result.volume_id, _ = create_block_volume(ctl, f"failover-{uuid.uuid4().hex[:12]}")
        _failover(spec, result, mode, rng, work, clients)
    except Exception as exc:
        result.errors.append(describe(exc))
    finally:
        _cleanup(spec, result, work, clients, ctl)
    return result


def _cleanup(
    spec: devcluster.ClusterSpec, result: TrialResult, work: Path,
    clients: dict[str, CsiClient], ctl: CsiClient,
) -> None:
    vid = result.volume_id
    if vid:
        best_effort(result, "unstage on the new owner", unpublish_unstage,
                    clients[result.survivor], vid, work / "new-staging", work / "new-pod" / "dev")
    if result.owner not in _running_nodes(spec):
        best_effort(result, "revive", devcluster.revive_node, Path(spec.dir), result.owner)
    if vid:
        # The revived node still has the dead attachment's state: unstage clears it.
        best_effort(result, "unstage on the old owner", unpublish_unstage,
                    clients[result.owner], vid, work / "old-staging", work / "old-pod" / "dev")
    cleanup_volume(result, ctl)
    for client in (*clients.values(), ctl):
        client.close()


def _running_nodes(spec: devcluster.ClusterSpec) -> set[str]:
    status = devcluster.status(Path(spec.dir))
    return {n.id for n in status.nodes if n.process.running}


# -- entry point ----------------------------------------------------------------------------


@contextlib.contextmanager
def _cluster(directory: Path, lease_ttl_s: float | None) -> Iterator[devcluster.ClusterSpec]:
    """Reuse the cluster running in ``directory``, or start one and always tear it down."""
    st = devcluster.status(directory)
    if st.ready and all(p.running for p in st.processes):
        spec = devcluster.load_spec(directory)
        if lease_ttl_s is not None and spec.lease_ttl_s != lease_ttl_s:
            raise devcluster.ClusterError(
                f"the cluster in {directory} runs with lease TTL {spec.lease_ttl_s:g} s, "
                f"not {lease_ttl_s:g} s: run `tandem cluster down --dir {directory}` first")
        if len(spec.nodes) < 3:
            raise devcluster.ClusterError(f"the cluster in {directory} has fewer than 3 nodes")
        yield spec
        return
    if st.exists:
        devcluster.down(directory)  # a half-dead leftover: start afresh
    try:
        yield devcluster.up(directory, 3, POOL_BYTES,
                            lease_ttl_s=DEFAULT_LEASE_TTL_S if lease_ttl_s is None else lease_ttl_s)
    finally:
        devcluster.down(directory)


def run(
    directory: Path, trials: int, mode: str, lease_ttl_s: float | None,
    seed: int | None,
) -> tuple[list[TrialResult], dict[str, Any]]:
    rng = random.Random(seed)
    results: list[TrialResult] = []
    with _cluster(directory, lease_ttl_s) as spec:
        print(f"failover benchmark: {trials} trials, mode {mode}, lease TTL "
              f"{spec.lease_ttl_s:g} s, cluster {spec.dir}", flush=True)
        for trial in range(1, trials + 1):
            work = Path(spec.dir) / "bench-work" / f"trial-{trial}-{uuid.uuid4().hex[:6]}"
            result = _one_trial(spec, trial, mode, rng, work)
            results.append(result)
            print(result.line(), flush=True)
        summary = summarize(results, spec.lease_ttl_s)
    return results, summary


def _one_trial(spec: devcluster.ClusterSpec, trial: int, mode: str, rng: random.Random,
               work: Path) -> TrialResult:
    if mode == "mix":
        mode = rng.choice(ALL_MODES)
    if mode in FAULT_MODES:
        return run_fault_trial(spec, trial, mode, rng, work)
    return run_trial(spec, trial, cast(devcluster.KillMode, mode), rng, work)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tandem bench failover", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", required=True, help="dev cluster directory (reused if up)")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--mode", choices=[*ALL_MODES, "mix"], default="sigkill",
                        help="kill the owner (sigkill, link-down), or a fault healed while "
                        "the volume is in use (devtools/fault_modes.py); mix: each trial "
                        "draws one")
    parser.add_argument("--json", help="write per-trial results and the summary here")
    parser.add_argument("--lease-ttl", type=float, default=None,
                        help="lease TTL of a cluster started here "
                             "(default: the driver default, 2 s)")
    parser.add_argument("--seed", type=int, default=None, help="seed the random choices")


def run_from_args(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("tandem bench failover: needs root (namespaces, loop devices)", file=sys.stderr)
        return 2
    try:
        results, summary = run(Path(args.dir).resolve(), args.trials, args.mode,
                               args.lease_ttl, args.seed)
    except devcluster.ClusterError as exc:
        print(f"tandem bench failover: {exc}", file=sys.stderr)
        return 1
    print_summary(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"summary": summary, "trials": [asdict(r) | {"ok": r.ok} for r in results]},
            indent=2) + "\n")
    return 0 if summary["failed_trials"] == [] else 1


if __name__ == "__main__":
    sys.exit(main())
