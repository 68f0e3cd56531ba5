"""Benchmark: tandem's data path against a local file and qemu-nbd, with fio, in one run.

Owns one measurement: the same three fio jobs (4k randwrite QD32, 4k randread QD32, 1M
sequential write QD8; one fio run each, after one unmeasured sequential prefill per target
so reads hit data, not holes) against six targets, in one invocation of this script so they
share a machine state:

  local       a file in DIR, io_uring (or --local-engine), O_DIRECT
  qemu-nbd    ``qemu-nbd -f raw`` on a file (default writeback cache), fio's nbd engine
  tandem-r1   a 1-replica volume staged (block mode) on its replica's node, as kubelet
              would; fio's nbd engine on that target's export (its replica is local)
  tandem-r3   a 3-replica volume on 3 namespaced nodes, staged on node-1 the same way
              (one replica local, written directly; two across the bridge)
  tandem-r3-dev   the 3-replica volume staged in block mode on node-1 (target in node-1's
              namespace, nbdfuse + direct-I/O loop), fio libaio O_DIRECT on the published
              device: end to end
  fuse-loop-qemu  the same nbdfuse + loop attach over qemu-nbd: the baseline for the above
  tandem-r3-tls   tandem-r3 again on a second cluster whose replication runs over TLS
              (``--only tls``; tandem-r3-tls / tandem-r3 is the cost of encryption)

Prints IOPS, MB/s and p99 completion latency per target and job, with ratios to qemu-nbd
(rows through the nbd engine) or to fuse-loop-qemu (rows through a device); writes JSON.
Absolute numbers swing up to 40 % between runs here: compare the ratios, and not from one
run: ``--repeat N`` (default 3) measures N interleaved rounds (the baselines, then tandem,
then again) and reports each ratio as median [min - max] over the rounds, so a machine that
drifts while one target runs shows up as spread instead of a wrong ratio.

Must not: be imported by product code, or leave a cluster, server, mount or loop device.

    .venv/bin/python bench/bench_io.py --dir /tmp/tandem-bench-io [--runtime 15] [--repeat 3]
        [--only baselines,tandem,tls] [--json out.json]
"""

from __future__ import annotations

import os

# As in the CLI: gRPC's fork handlers can crash the children forked here (fio, losetup,
# nbdfuse) while its threads are busy. Must be set before grpc is imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import argparse
import asyncio
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_nbd_local import serving

from csi_driver._gen import csi_pb2
from csi_driver.client import CsiClient, block_capability
from csi_driver.config import TOPOLOGY_KEY
from csi_driver.node.attach import FuseLoopAttacher

# Run from a source checkout: devtools (the dev cluster) is not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devtools import devcluster

MiB = 1 << 20
JOBS = (  # name, rw, bs, iodepth
    ("randwrite-4k", "randwrite", "4k", 32),
    ("randread-4k", "randread", "4k", 32),
    ("seqwrite-1M", "write", "1M", 8),
)
BASELINE = {"local": "qemu-nbd", "qemu-nbd": "qemu-nbd", "tandem-r1": "qemu-nbd",
            "tandem-r3": "qemu-nbd", "tandem-r3-tls": "qemu-nbd",
            "tandem-r3-dev": "fuse-loop-qemu", "fuse-loop-qemu": "fuse-loop-qemu"}


@dataclass(frozen=True)
class Target:
    """How fio reaches one target (engine-specific options) and whose CPU to sample."""

    name: str
    options: dict[str, str]
    server_pids: tuple[int, ...] = ()  # the NBD server (qemu-nbd, tandem's target)
    replica_pids: tuple[int, ...] = ()  # tandem's node processes (replica servers)


def job_file(target: Target, size: int, name: str, rw: str, bs: str, depth: int,
             runtime: int | None) -> str:
    lines = [f"[{name}]", *(f"{k}={v}" for k, v in target.options.items()), f"size={size}",
             f"rw={rw}", f"bs={bs}", f"iodepth={depth}", "percentile_list=50:99:99.9",
             "randrepeat=0"]
    if runtime is not None:
        lines += ["time_based=1", f"runtime={runtime}"]
    return "\n".join(lines) + "\n"


def cpu_seconds(pids: tuple[int, ...]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def fio(jobs: Path, timeout: float) -> dict[str, Any]:
    proc = subprocess.run(
        ["fio", "--output-format=json", str(jobs)], capture_output=True, text=True,
        timeout=timeout, cwd=jobs.parent, check=False, env={**os.environ, "LC_ALL": "C"},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"fio {jobs.name} failed:\n{proc.stdout[-2000:]}{proc.stderr}")
    out = proc.stdout
    job: dict[str, Any] = json.loads(out[out.index("{"):])["jobs"][0]  # nbd engine chats first
    return job


def run_fio(target: Target, work: Path, size: int, runtime: int) -> dict[str, dict[str, float]]:
    """Prefill (unmeasured, so reads hit data), then each job; {job: figures}."""
    prefill = work / f"{target.name}-prefill.fio"
    prefill.write_text(job_file(target, size, "prefill", "write", "1M", 8, None))
    fio(prefill, 600)
    results: dict[str, dict[str, float]] = {}
    for name, rw, bs, depth in JOBS:
        jobs = work / f"{target.name}-{name}.fio"
        jobs.write_text(job_file(target, size, name, rw, bs, depth, runtime))
        cpu0 = (cpu_seconds(target.server_pids), cpu_seconds(target.replica_pids))
        started = time.monotonic()
        job = fio(jobs, runtime * 4 + 120)
        elapsed = time.monotonic() - started
        side = job["read"] if rw.endswith("read") else job["write"]
        p99 = side["clat_ns"].get("percentile", {}).get("99.000000", 0)
        results[name] = {
            "iops": side["iops"], "mb_s": side["bw_bytes"] / 1e6, "p99_us": p99 / 1000,
            "server_cpu": (cpu_seconds(target.server_pids) - cpu0[0]) / elapsed,
            "replica_cpu": (cpu_seconds(target.replica_pids) - cpu0[1]) / elapsed,
        }
    return results


def nbd_target(name: str, sock: Path, pid: int, replica_pids: tuple[int, ...] = ()) -> Target:
    return Target(name, {"ioengine": "nbd", "uri": f"nbd+unix:///?socket={sock}"}, (pid,),
                  replica_pids)


def device_target(name: str, device: str, server_pids: tuple[int, ...] = (),
                  replica_pids: tuple[int, ...] = ()) -> Target:
    return Target(name, {"ioengine": "libaio", "direct": "1", "filename": device},
                  server_pids, replica_pids)


def qemu_nbd(image: Path, sock: Path) -> contextlib.AbstractContextManager[int]:
    """qemu-nbd on image (default cache = writeback); --persistent: fio reconnects per job."""
    argv = ["qemu-nbd", "-f", "raw", "--persistent", "--shared=8", "--socket", str(sock),
            str(image)]
    return serving(argv, sock)


@contextlib.contextmanager
def fuse_loop(sock: Path, work: Path) -> Iterator[str]:
    """The node's attach path (nbdfuse + direct-I/O loop) over any NBD socket."""
    attacher = FuseLoopAttacher()
    attachment = asyncio.run(attacher.attach(str(sock), "bench-fuse-loop", work))
    try:
        yield attachment.device
    finally:
        asyncio.run(attacher.detach(attachment))


@contextlib.contextmanager
def staged_block(spec: devcluster.ClusterSpec, volume_id: str, node: str,
                 work: Path) -> Iterator[str]:
    """Stage + publish in block mode through the node's CSI service; yields the device."""
    cap = block_capability()
    staging, target = work / "staging", work / "pod" / "dev"
    staging.mkdir(parents=True, exist_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    with CsiClient(spec.node(node).csi_endpoint) as csi:
        csi.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=volume_id, staging_target_path=str(staging), volume_capability=cap,
        ), timeout=120)
        try:
            csi.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
                volume_id=volume_id, staging_target_path=str(staging), target_path=str(target),
                volume_capability=cap,
            ), timeout=60)
            try:
                yield str(target)
            finally:
                csi.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
                    volume_id=volume_id, target_path=str(target)), timeout=60)
        finally:
            csi.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
                volume_id=volume_id, staging_target_path=str(staging)), timeout=120)


def create_volume(spec: devcluster.ClusterSpec, name: str, size: int,
                  replicas: int) -> tuple[str, list[str]]:
    with CsiClient(spec.controller.csi_endpoint) as ctl:
        volume = ctl.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
            name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=size),
            volume_capabilities=[block_capability()], parameters={"replicas": str(replicas)},
        ), timeout=60).volume
    return volume.volume_id, [t.segments[TOPOLOGY_KEY] for t in volume.accessible_topology]


Results = dict[str, dict[str, dict[str, float]]]


def measure_baselines(args: argparse.Namespace, work: Path, results: Results) -> None:
    size = args.size * MiB
    local, image = work / "local.img", work / "qemu.img"
    for path in (local, image):
        with open(path, "wb") as f:
            f.truncate(size)
    say("local file")
    results["local"] = run_fio(Target("local", {"ioengine": args.local_engine, "direct": "1",
                                                "filename": str(local)}), work, size, args.runtime)
    sock = work / "qemu.sock"
    with qemu_nbd(image, sock) as pid:
        say("qemu-nbd (fio nbd engine)")
        results["qemu-nbd"] = run_fio(nbd_target("qemu-nbd", sock, pid), work, size, args.runtime)
        say("nbdfuse + loop over qemu-nbd (fio libaio on the device)")
        with fuse_loop(sock, work / "attach") as device:
            results["fuse-loop-qemu"] = run_fio(device_target("fuse-loop-qemu", device, (pid,)),
                                                work, size, args.runtime)
    local.unlink()
    image.unlink()


def measure_tandem(args: argparse.Namespace, work: Path, results: Results) -> None:
    size, cluster = args.size * MiB, work / "cluster"
    devcluster.down(cluster)  # a cluster an interrupted run left behind
    try:
        spec = devcluster.up(cluster, 3, 3 * size + 256 * MiB, lease_ttl_s=5.0)
        r1, [r1_node] = create_volume(spec, "bench-r1", size, 1)
        r3, _ = create_volume(spec, "bench-r3", size, 3)
        nodes = tuple(n.pid for n in spec.nodes)
        for name, volume_id, node in (("tandem-r1", r1, r1_node), ("tandem-r3", r3, "node-1")):
            # Staged as kubelet would, on a node holding a replica; fio's nbd engine opens
            # its own connections to that target's export next to the node's attachment.
            say(f"{name} (staged on {node}, fio nbd engine on the target's export)")
            with staged_block(spec, volume_id, node, cluster / f"work-{name}"):
                sock, pid = staged_target(spec, volume_id, node)
                results[name] = run_fio(nbd_target(name, sock, pid, nodes), work, size,
                                        args.runtime)
        say("tandem-r3-dev (staged block on node-1, fio libaio on the published device)")
        with staged_block(spec, r3, "node-1", cluster / "work") as device:
            _, pid = staged_target(spec, r3, "node-1")
            target = device_target("tandem-r3-dev", device, (pid,), nodes)
            results["tandem-r3-dev"] = run_fio(target, work, size, args.runtime)
    finally:
        devcluster.down(cluster)


def measure_tandem_tls(args: argparse.Namespace, work: Path, results: Results) -> None:
    size, cluster = args.size * MiB, work / "cluster-tls"
    devcluster.down(cluster)
    try:
        spec = devcluster.up(cluster, 3, 3 * size + 256 * MiB, lease_ttl_s=5.0, tls=True)
        r3, _ = create_volume(spec, "bench-r3-tls", size, 3)
        say("tandem-r3-tls (replication over TLS; staged on node-1, fio nbd engine)")
        with staged_block(spec, r3, "node-1", cluster / "work"):
            sock, pid = staged_target(spec, r3, "node-1")
            target = nbd_target("tandem-r3-tls", sock, pid, tuple(n.pid for n in spec.nodes))
            results["tandem-r3-tls"] = run_fio(target, work, size, args.runtime)
    finally:
        devcluster.down(cluster)


def staged_target(spec: devcluster.ClusterSpec, volume_id: str, node: str) -> tuple[Path, int]:
    """The NBD socket and pid of the target ``node`` runs for the staged ``volume_id``."""
    state = Path(spec.node(node).state_dir)
    socks = [state / "targets" / f"{volume_id}.nbd.sock",
             *Path(tempfile.gettempdir()).glob(f"tandem-*/{volume_id}.sock")]
    sock = next((s for s in socks if s.is_socket()), None)
    # The target registered as the direct writer of the node's replica (local_writers).
    entries = sorted((state / "local-writers").glob(f"{volume_id}.*.writer"),
                     key=lambda e: int(e.name.rsplit(".", 2)[1]))
    if sock is None or not entries:
        raise RuntimeError(f"no running target for {volume_id} on {node} "
                           f"(socket {sock}, writers {entries})")
    return sock, int(json.loads(entries[-1].read_text())["pid"])


TLS_COST = "r3 tls/plain"  # a row of its own in the spread table


def say(text: str) -> None:
    print(f"-- {text}", file=sys.stderr, flush=True)


def ratios(results: Results) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for target, jobs in results.items():
        base = results.get(BASELINE[target], {})
        out[target] = {job: jobs[job]["iops"] / base[job]["iops"]
                       for job, _rw, _bs, _d in JOBS if job in jobs and base.get(job)}
    return out


def spread(rounds: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, list[float]]]:
    """Per target and job: [median, min, max] of the ratio over the rounds that have it."""
    out: dict[str, dict[str, list[float]]] = {}
    for target in {t for r in rounds for t in r}:
        for job in {j for r in rounds for j in r.get(target, {})}:
            values = sorted(r[target][job] for r in rounds if job in r.get(target, {}))
            out.setdefault(target, {})[job] = [statistics.median(values), values[0],
                                               values[-1]]
    return out


def tls_cost(results: Results) -> dict[str, dict[str, float]]:
    """tandem-r3-tls against tandem-r3 of the same round: what encryption costs."""
    tls, plain = results.get("tandem-r3-tls"), results.get("tandem-r3")
    if not tls or not plain:
        return {}
    return {TLS_COST: {job: tls[job]["iops"] / plain[job]["iops"]
                       for job, *_ in JOBS if job in tls and plain.get(job)}}


def render_spread(rounds: list[dict[str, dict[str, float]]]) -> str:
    lines = [f"ratios over {len(rounds)} interleaved rounds (each: the baselines, then "
             "tandem): median [min - max]",
             f"{'target':<15} " + " ".join(f"{job:>24}" for job, *_ in JOBS)]
    table = spread(rounds)
    for target in [t for t in (*BASELINE, TLS_COST) if t in table]:
        cells = []
        for job, *_ in JOBS:
            m = table[target].get(job)
            cells.append(f"{m[0]:.2f} [{m[1]:.2f} - {m[2]:.2f}]" if m else "-")
        lines.append(f"{target:<15} " + " ".join(f"{c:>24}" for c in cells))
    return "\n".join(lines)


def render(results: Results, args: argparse.Namespace) -> str:
    rel = ratios(results)
    lines = [f"fio, {args.runtime} s per job, {args.size} MiB per target. ratio = IOPS / the "
             "baseline's (qemu-nbd for NBD rows, fuse-loop-qemu for device rows); CPU in "
             "cores: srv = NBD server (qemu-nbd or tandem's target), rep = the 3 node "
             "processes (replica servers)",
             f"{'target':<15} {'job':<13} {'IOPS':>9} {'MB/s':>8} {'p99 us':>9} "
             f"{'ratio':>6} {'srv CPU':>7} {'rep CPU':>7}"]
    for target, jobs in results.items():
        for job, _rw, _bs, _depth in JOBS:
            r = jobs[job]
            srv = f"{r['server_cpu']:.2f}" if r["server_cpu"] else "-"
            rep = f"{r['replica_cpu']:.2f}" if r["replica_cpu"] else "-"
            ratio = rel[target].get(job)
            ratio_text = f"{ratio:.2f}" if ratio is not None else "-"
            lines.append(f"{target:<15} {job:<13} {r['iops']:>9,.0f} {r['mb_s']:>8,.0f} "
                         f"{r['p99_us']:>9,.0f} {ratio_text:>6} {srv:>7} {rep:>7}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--dir", required=True, help="work dir (files, the dev cluster)")
    parser.add_argument("--runtime", type=int, default=15, help="seconds per fio job")
    parser.add_argument("--size", type=int, default=512, help="MiB per target")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--local-engine", default="io_uring", choices=["io_uring", "libaio"])
    parser.add_argument("--only", default="", help="comma-separated: baselines,tandem,tls")
    parser.add_argument("--repeat", type=int, default=3,
                        help="interleaved rounds (baselines then tandem, again and again); "
                        "ratios are reported as median [min - max] over them")
    args = parser.parse_args()
    for tool in ("fio", "qemu-nbd", "nbdfuse", "losetup"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed")
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces, loop devices, FUSE)")
    work = Path(args.dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    parts: dict[str, Callable[[argparse.Namespace, Path, Results], None]] = {
        "baselines": measure_baselines, "tandem": measure_tandem, "tls": measure_tandem_tls}
    rounds: list[Results] = []
    for i in range(args.repeat):
        # One round = each part once, in order: a (baseline, tandem) pair measured minutes
        # apart at most, so machine drift lands in the spread, not in one ratio.
        say(f"round {i + 1} of {args.repeat}")
        results: Results = {}
        for name, part in parts.items():
            if not args.only or name in args.only.split(","):
                part(args, work, results)
        rounds.append({t: results[t] for t in BASELINE if t in results})
    per_round = [ratios(r) | tls_cost(r) for r in rounds]
    print(render(rounds[-1], args))
    print()
    print(render_spread(per_round))
    if args.json:
        payload: dict[str, Any] = {"runtime_s": args.runtime, "size_mib": args.size,
                                   "rounds": rounds, "ratios": per_round,
                                   "spread": spread(per_round), "baseline": BASELINE}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
