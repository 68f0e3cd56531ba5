"""Failover benchmark: kill a volume's owner mid-write, take over, prove nothing was lost.

``tandem bench failover --dir DIR --trials N [--mode sigkill|link-down] [--json OUT]
[--lease-ttl S]``. Each trial, on a 3-node dev cluster (reused if one is up in DIR,
otherwise started and always torn down): a fresh 64 MiB 3-replica block volume is staged
and published on one replica node; writer threads write checksummed, sequence-numbered
blocks with O_DIRECT pwrite + fsync through the published device, logging every
acknowledgement; 0.5-2 s in, the owner node is killed; NodeStageVolume + NodePublishVolume
are retried on another replica node until they succeed; one write + fsync goes through the
new device (kill -> first acknowledged write is the figure); then the whole device is read
back and checked (``crashcheck.check``). The killed node is revived before the next trial.
Prints each trial and p50/p90/p99/max, the acknowledged writes lost (must be 0) and the
violations; ``--json`` writes it all. Also used by the fault tests (tests/fault).
"""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import argparse
import contextlib
import json
import math
import random
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from csi_driver import devcluster
from csi_driver._gen import csi_pb2
from csi_driver.client import CsiClient, block_capability
from csi_driver.config import TOPOLOGY_KEY
from csi_driver.crashcheck import BLOCK_SIZE, CheckResult, WriterLog, check
from csi_driver.failover_io import BlockReader, BlockWriter, new_writer_id, read_device, write_one

MIB = 1 << 20
VOLUME_BYTES = 64 * MIB
WRITE_BLOCKS = 4096  # the writers' region (16 MiB): small enough that blocks get overwritten
POOL_BYTES = 2 << 30
TAKEOVER_TIMEOUT_S = 90.0
RETRY_PAUSE_S = 0.05
# Answers a CO retries: the owner still holds its claim (RWO), ownership is moving, or the
# data path is not ready yet. Anything else fails the takeover at once.
RETRYABLE = frozenset({
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED,
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
})


class TakeoverTimeoutError(Exception):
    """The volume could not be staged on the new node before the deadline."""


# -- CSI helpers (also used by the fault tests) ---------------------------------------------


def create_block_volume(
    ctl: CsiClient, name: str, *, size: int = VOLUME_BYTES, replicas: int = 3,
    nodes: Sequence[str] = (),
) -> tuple[str, list[str]]:
    """CreateVolume (raw block) -> (id, replica nodes). ``nodes``: place on these first
    (requisite binds only the first replica, preferred orders the rest)."""
    request = csi_pb2.CreateVolumeRequest(
        name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=size),
        volume_capabilities=[block_capability()], parameters={"replicas": str(replicas)},
    )
    if nodes:
        wanted = [csi_pb2.Topology(segments={TOPOLOGY_KEY: n}) for n in nodes]
        request.accessibility_requirements.CopyFrom(
            csi_pb2.TopologyRequirement(requisite=wanted, preferred=wanted))
    volume = ctl.controller.CreateVolume(request, timeout=120).volume
    return volume.volume_id, [t.segments[TOPOLOGY_KEY] for t in volume.accessible_topology]


def stage(node: CsiClient, volume_id: str, staging: Path, timeout_s: float = 120) -> None:
    node.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id=volume_id, staging_target_path=str(staging),
        volume_capability=block_capability()), timeout=timeout_s)


def publish(node: CsiClient, volume_id: str, staging: Path, target: Path) -> None:
    node.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=volume_id, staging_target_path=str(staging), target_path=str(target),
        volume_capability=block_capability()), timeout=60)


def unpublish_unstage(node: CsiClient, volume_id: str, staging: Path, target: Path) -> None:
    node.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=volume_id, target_path=str(target)), timeout=60)
    node.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id=volume_id, staging_target_path=str(staging)), timeout=60)


def delete_volume(ctl: CsiClient, volume_id: str, attempts: int = 10) -> list[str]:
    """DeleteVolume, retried as a CO retries it; returns the refusals seen before success."""
    refusals: list[str] = []
    for attempt in range(attempts):
        try:
            ctl.controller.DeleteVolume(
                csi_pb2.DeleteVolumeRequest(volume_id=volume_id), timeout=60)
            return refusals
        except grpc.RpcError as exc:
            refusals.append(f"{exc.code().name}: {exc.details()}")
            if exc.code() not in RETRYABLE or attempt == attempts - 1:
                raise
            time.sleep(0.5)
    return refusals


@dataclass
class Takeover:
    staged_at: float  # monotonic time NodeStageVolume succeeded on the new node
    attempts: int
    answers: list[str] = field(default_factory=list)  # each distinct refusal, in order


def take_over(
    node: CsiClient, volume_id: str, staging: Path, timeout_s: float = TAKEOVER_TIMEOUT_S,
) -> Takeover:
    """Retry NodeStageVolume as a CO would, until it succeeds (or the deadline)."""
    deadline = time.monotonic() + timeout_s
    answers: list[str] = []
    attempt = 0
    while time.monotonic() < deadline:
        attempt += 1
        try:
            stage(node, volume_id, staging, timeout_s=max(1.0, deadline - time.monotonic()))
        except grpc.RpcError as exc:
            answer = f"{exc.code().name}: {exc.details()}"
            if not answers or answers[-1] != answer:
                answers.append(answer)
            if exc.code() not in RETRYABLE:
                raise
            time.sleep(RETRY_PAUSE_S)
            continue
        return Takeover(time.monotonic(), attempt, answers)
    raise TakeoverTimeoutError(
        f"volume {volume_id} not staged within {timeout_s:.0f} s; answers: {answers[-3:]}")


def read_and_check(device: Path, log: WriterLog, size: int = VOLUME_BYTES) -> CheckResult:
    """Read the whole device back (O_DIRECT) and check it against the writer log."""
    reader = BlockReader(read_device(device, size))
    return check(log, reader, size // BLOCK_SIZE)


# -- one trial ------------------------------------------------------------------------------


@dataclass
class TrialResult:
    trial: int
    mode: str
    owner: str
    survivor: str
    volume_id: str = ""
    kill_after_s: float = 0.0
    kill_to_stage_s: float | None = None
    kill_to_first_ack_s: float | None = None
    stage_attempts: int = 0
    refusals: list[str] = field(default_factory=list)
    acked_before_kill: int = 0
    old_writes_failed: int = 0
    lost_acks: int | None = None
    violations: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # retried refusals outside the takeover

    @property
    def ok(self) -> bool:
        return not self.errors and not self.violations and self.lost_acks == 0

    def line(self) -> str:
        def fmt(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f}s"
        text = (f"trial {self.trial:3d} {self.mode:9} {self.owner}->{self.survivor} "
                f"kill@{self.kill_after_s:.2f}s stage {fmt(self.kill_to_stage_s)} "
                f"first-ack {fmt(self.kill_to_first_ack_s)} tries {self.stage_attempts:3d} "
                f"acked {self.acked_before_kill:5d} lost {self.lost_acks} "
                f"violations {len(self.violations)}")
        return text + ("" if not self.errors else f"  ERROR {self.errors[0]}")


def describe(exc: BaseException) -> str:
    """One line for an error (gRPC errors: code and details, not the debug string)."""
    if isinstance(exc, grpc.RpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


def _best_effort(result: TrialResult, what: str, func: Any, *args: Any) -> None:
    try:
        func(*args)
    except Exception as exc:  # cleanup must go on; the trial records what failed
        result.errors.append(f"{what}: {describe(exc)}")


def _failover(
    spec: devcluster.ClusterSpec, result: TrialResult, rng: random.Random, work: Path,
    log: WriterLog, clients: dict[str, CsiClient],
) -> None:
    owner, survivor = clients[result.owner], clients[result.survivor]
    old_dev, new_dev = work / "old-pod" / "dev", work / "new-pod" / "dev"
    stage(owner, result.volume_id, work / "old-staging")
    publish(owner, result.volume_id, work / "old-staging", old_dev)
    writer = BlockWriter(old_dev, log, new_writer_id(), WRITE_BLOCKS, seed=rng.getrandbits(32))
    writer.start()
    try:
        result.kill_after_s = rng.uniform(0.5, 2.0)
        time.sleep(result.kill_after_s)
        killed_at = time.monotonic()
        result.acked_before_kill = len(log.acked())
        devcluster.kill_node(Path(spec.dir), result.owner, result.mode)  # type: ignore[arg-type]
        takeover = take_over(survivor, result.volume_id, work / "new-staging")
        log.mark_takeover(takeover.staged_at, {writer.writer})
        result.kill_to_stage_s = takeover.staged_at - killed_at
        result.stage_attempts, result.refusals = takeover.attempts, takeover.answers
        publish(survivor, result.volume_id, work / "new-staging", new_dev)
        acked_at = write_one(new_dev, log, new_writer_id(), rng.randrange(WRITE_BLOCKS), 1)
        if acked_at is None:
            raise RuntimeError("the first write on the new owner failed")
        result.kill_to_first_ack_s = acked_at - killed_at
    finally:
        if not writer.stop():
            result.errors.append("old writer threads still stuck in I/O after 60 s")
    result.old_writes_failed = sum(
        1 for w in log.writes() if w.writer == writer.writer and not w.acked)
    outcome = read_and_check(new_dev, log)
    result.lost_acks = outcome.lost_acks
    result.violations = [str(v) for v in outcome.violations[:20]]


def run_trial(
    spec: devcluster.ClusterSpec, trial: int, mode: str, rng: random.Random, work: Path,
) -> TrialResult:
    ids = [n.id for n in spec.nodes]
    owner = rng.choice(ids)
    result = TrialResult(trial, mode, owner, rng.choice([n for n in ids if n != owner]))
    work.mkdir(parents=True, exist_ok=True)
    clients = {n.id: CsiClient(n.csi_endpoint) for n in spec.nodes}
    ctl = CsiClient(spec.controller.csi_endpoint)
    log = WriterLog()
    killed = False
    try:
        result.volume_id, _ = create_block_volume(ctl, f"failover-{uuid.uuid4().hex[:12]}")
        killed = True  # from here on, the owner may be dead: always revive it
        _failover(spec, result, rng, work, log, clients)
    except Exception as exc:
        result.errors.append(describe(exc))
    finally:
        _cleanup(spec, result, work, clients, ctl, killed)
    return result


def _cleanup(
    spec: devcluster.ClusterSpec, result: TrialResult, work: Path,
    clients: dict[str, CsiClient], ctl: CsiClient, killed: bool,
) -> None:
    vid = result.volume_id
    if vid:
        _best_effort(result, "unstage on the new owner", unpublish_unstage,
                     clients[result.survivor], vid, work / "new-staging", work / "new-pod" / "dev")
    if killed and result.owner not in _running_nodes(spec):
        _best_effort(result, "revive", devcluster.revive_node, Path(spec.dir), result.owner)
    if vid:
        # The revived node still has the dead attachment's state: unstage clears it.
        _best_effort(result, "unstage on the old owner", unpublish_unstage,
                     clients[result.owner], vid, work / "old-staging", work / "old-pod" / "dev")
        try:
            result.notes += [f"DeleteVolume retried after {r}" for r in delete_volume(ctl, vid)]
        except Exception as exc:
            result.errors.append(f"delete: {describe(exc)}")
    for client in (*clients.values(), ctl):
        client.close()


def _running_nodes(spec: devcluster.ClusterSpec) -> set[str]:
    status = devcluster.status(Path(spec.dir))
    return {n.id for n in status.nodes if n.process.running}


# -- figures --------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summarize(results: Sequence[TrialResult], lease_ttl_s: float) -> dict[str, Any]:
    times = [r.kill_to_first_ack_s for r in results if r.kill_to_first_ack_s is not None]
    return {
        "trials": len(results),
        "mode": results[0].mode if results else None,
        "lease_ttl_s": lease_ttl_s,
        "succeeded": sum(1 for r in results if r.ok),
        "kill_to_first_ack_s": {
            "p50": percentile(times, 50), "p90": percentile(times, 90),
            "p99": percentile(times, 99), "max": max(times) if times else None,
        },
        "acked_writes_lost": sum(r.lost_acks or 0 for r in results),
        "violations": sum(len(r.violations) for r in results),
        "failed_trials": [r.trial for r in results if not r.ok],
    }


def _print_summary(summary: dict[str, Any]) -> None:
    t = summary["kill_to_first_ack_s"]

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}s"
    print(f"\n{summary['trials']} trials ({summary['mode']}, lease TTL "
          f"{summary['lease_ttl_s']:g} s), {summary['succeeded']} clean")
    print(f"kill -> first acknowledged write: p50 {fmt(t['p50'])} p90 {fmt(t['p90'])} "
          f"p99 {fmt(t['p99'])} max {fmt(t['max'])}")
    print(f"acknowledged writes lost: {summary['acked_writes_lost']}   "
          f"violations: {summary['violations']}")


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
                            lease_ttl_s=5.0 if lease_ttl_s is None else lease_ttl_s)
    finally:
        devcluster.down(directory)


def run(
    directory: Path, trials: int, mode: str, lease_ttl_s: float | None, seed: int | None,
) -> tuple[list[TrialResult], dict[str, Any]]:
    rng = random.Random(seed)
    results: list[TrialResult] = []
    with _cluster(directory, lease_ttl_s) as spec:
        print(f"failover benchmark: {trials} trials, mode {mode}, lease TTL "
              f"{spec.lease_ttl_s:g} s, cluster {spec.dir}", flush=True)
        for trial in range(1, trials + 1):
            work = Path(spec.dir) / "bench-work" / f"trial-{trial}-{uuid.uuid4().hex[:6]}"
            result = run_trial(spec, trial, mode, rng, work)
            results.append(result)
            print(result.line(), flush=True)
        summary = summarize(results, spec.lease_ttl_s)
    return results, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tandem bench failover", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", required=True, help="dev cluster directory (reused if up)")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--mode", choices=["sigkill", "link-down"], default="sigkill")
    parser.add_argument("--json", help="write per-trial results and the summary here")
    parser.add_argument("--lease-ttl", type=float, default=None,
                        help="lease TTL of a cluster started here (default: devcluster's 5 s)")
    parser.add_argument("--seed", type=int, default=None, help="seed the random choices")


def run_from_args(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("tandem bench failover: needs root (namespaces, loop devices)", file=sys.stderr)
        return 2
    directory = Path(args.dir).resolve()
    results, summary = run(directory, args.trials, args.mode, args.lease_ttl, args.seed)
    _print_summary(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"summary": summary, "trials": [asdict(r) | {"ok": r.ok} for r in results]},
            indent=2) + "\n")
    return 0 if summary["failed_trials"] == [] else 1


if __name__ == "__main__":
    sys.exit(main())
