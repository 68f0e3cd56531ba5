"""Benchmark of the CSI controller: CreateVolume and DeleteVolume under concurrent callers.

Owns one measurement: on a fresh local dev cluster (etcd, the controller and N node
processes, file pools), create V volumes (16 MiB, 3 replicas each, distinct names) from C
concurrent callers, then delete them all the same way. Each caller is a thread with its
own gRPC channel to the controller socket, as several external-provisioner workers would
be. Records every call's latency and error code, the controller's peak RSS (sampled from
/proc while the calls run) and prints percentiles and throughput; ``--json`` writes it all.
The create/delete round runs ``--repeat`` times (default 3) on the one cluster, and each
figure is reported as the median with its min-max over the rounds, never a best run:
absolute numbers swing up to 40 % between runs here.

Must not: be imported by the driver or the tests, or leave a cluster running (the cluster
is always torn down, also on errors and Ctrl-C).

    .venv/bin/python bench/bench_controller.py --dir /tmp/tandem-bench-controller \
        [--volumes 200] [--concurrency 8] [--nodes 3] [--repeat 3] [--json out.json]
"""

from __future__ import annotations

import os
import sys

# As in the CLI: gRPC's fork handlers can crash the children devcluster forks (ip, mount)
# while client threads are busy. Must be set before grpc is imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import argparse
import json
import math
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from csi_driver._gen import csi_pb2
from csi_driver.client import CsiClient, mount_capability

# Run from a source checkout: devtools (the dev cluster) is not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devtools import devcluster

MIB = 1 << 20
VOLUME_SIZE = 16 * MIB
REPLICAS = 3
CALL_TIMEOUT_S = 120.0
RSS_SAMPLE_INTERVAL_S = 0.05


@dataclass
class Phase:
    """Outcome of one RPC phase: per-call latencies of successes, errors by code."""

    name: str
    latencies_s: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        ok = sorted(self.latencies_s)
        return {
            "calls": len(ok) + sum(self.errors.values()),
            "ok": len(ok),
            "errors": dict(self.errors),
            "wall_s": round(self.wall_s, 3),
            "throughput_per_s": round(len(ok) / self.wall_s, 2) if self.wall_s else 0.0,
            "latency_ms": {
                "p50": _ms(percentile(ok, 50)), "p90": _ms(percentile(ok, 90)),
                "p99": _ms(percentile(ok, 99)), "max": _ms(ok[-1] if ok else None),
                "mean": _ms(sum(ok) / len(ok) if ok else None),
            },
        }


def percentile(sorted_values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile of already sorted values (None when there are none)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


class RssSampler:
    """Samples VmRSS of one process in a background thread and keeps the peak."""

    def __init__(self, pid: int) -> None:
        self._path = Path(f"/proc/{pid}/status")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self.first_kib: int | None = None
        self.peak_kib = 0
        self.last_kib: int | None = None
        self.samples = 0

    def read_kib(self) -> int | None:
        try:
            for line in self._path.read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            return None
        return None

    def _run(self) -> None:
        while not self._stop.is_set():
            kib = self.read_kib()
            if kib is not None:
                self.first_kib = kib if self.first_kib is None else self.first_kib
                self.peak_kib = max(self.peak_kib, kib)
                self.last_kib = kib
                self.samples += 1
            self._stop.wait(RSS_SAMPLE_INTERVAL_S)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, Any]:
        def mib(kib: int | None) -> float | None:
            return None if kib is None else round(kib / 1024, 1)

        return {"samples": self.samples, "start_mib": mib(self.first_kib),
                "peak_mib": mib(self.peak_kib or None), "end_mib": mib(self.last_kib)}


Call = Callable[[CsiClient, str], str | None]


def run_phase(name: str, endpoint: str, items: Sequence[str], concurrency: int,
              call: Call) -> tuple[Phase, list[str]]:
    """Run call(client, item) for every item from ``concurrency`` threads.

    Each thread owns one CsiClient (one channel). Returns the phase and the non-None
    results of the successful calls (created volume ids).
    """
    phase, results, lock = Phase(name), [], threading.Lock()
    work: queue.SimpleQueue[str] = queue.SimpleQueue()
    for item in items:
        work.put(item)

    def worker() -> None:
        with CsiClient(endpoint, timeout_s=CALL_TIMEOUT_S) as client:
            while True:
                try:
                    item = work.get_nowait()
                except queue.Empty:
                    return
                started = time.perf_counter()
                try:
                    result = call(client, item)
                except grpc.RpcError as e:
                    code = e.code() if isinstance(e, grpc.Call) else None
                    with lock:
                        phase.errors[code.name if code else type(e).__name__] += 1
                    continue
                except Exception as e:  # a bench records, it does not stop at, failures
                    with lock:
                        phase.errors[type(e).__name__] += 1
                    continue
                elapsed = time.perf_counter() - started
                with lock:
                    phase.latencies_s.append(elapsed)
                    if result is not None:
                        results.append(result)

    threads = [threading.Thread(target=worker, name=f"{name}-{i}") for i in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    phase.wall_s = time.perf_counter() - started
    return phase, results


def create_volume(replicas: int) -> Call:
    def call(client: CsiClient, name: str) -> str | None:
        response = client.controller.CreateVolume(
            csi_pb2.CreateVolumeRequest(
                name=name,
                capacity_range=csi_pb2.CapacityRange(required_bytes=VOLUME_SIZE),
                volume_capabilities=[mount_capability("ext4")],
                parameters={"replicas": str(replicas)},
            ),
            timeout=client.timeout_s,
        )
        return str(response.volume.volume_id)

    return call


def delete_volume(client: CsiClient, volume_id: str) -> str | None:
    client.controller.DeleteVolume(
        csi_pb2.DeleteVolumeRequest(volume_id=volume_id), timeout=client.timeout_s
    )
    return None


def listed_volume_ids(endpoint: str) -> set[str]:
    """Every volume id ListVolumes reports, following next_token."""
    ids: set[str] = set()
    with CsiClient(endpoint, timeout_s=CALL_TIMEOUT_S) as client:
        token = ""
        while True:
            response = client.controller.ListVolumes(
                csi_pb2.ListVolumesRequest(max_entries=100, starting_token=token),
                timeout=client.timeout_s,
            )
            ids.update(e.volume.volume_id for e in response.entries)
            token = response.next_token
            if not token:
                return ids


def pool_size_for(volumes: int) -> int:
    # A node holds at most one replica of a volume. File pools are sparse and accounted
    # on logical sizes, so twice the worst case costs no disk and leaves placement room.
    return max(1 << 30, 2 * volumes * VOLUME_SIZE)


def one_round(endpoint: str, volumes: int, concurrency: int, replicas: int) -> dict[str, Any]:
    """Create ``volumes`` volumes, list them, delete them: the figures of one round."""
    names = [f"bench-{uuid.uuid4().hex[:8]}-{i:05d}" for i in range(volumes)]
    created, ids = run_phase("CreateVolume", endpoint, names, concurrency,
                             create_volume(replicas))
    listed = listed_volume_ids(endpoint)
    deleted, _ = run_phase("DeleteVolume", endpoint, ids, concurrency, delete_volume)
    remaining = listed_volume_ids(endpoint) & set(ids)
    return {"create": created.summary(), "delete": deleted.summary(),
            "listed_after_create": len(listed & set(ids)),
            "remaining_after_delete": len(remaining)}


# Per round, what is compared across rounds: (label, phase, path in the phase summary).
SPREAD = (("CreateVolume p50 ms", "create", ("latency_ms", "p50")),
          ("CreateVolume p99 ms", "create", ("latency_ms", "p99")),
          ("CreateVolume /s", "create", ("throughput_per_s",)),
          ("DeleteVolume p50 ms", "delete", ("latency_ms", "p50")),
          ("DeleteVolume p99 ms", "delete", ("latency_ms", "p99")))


def spread(rounds: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Median and min-max of each SPREAD figure over the rounds (never a best run)."""
    out: dict[str, dict[str, float]] = {}
    for label, phase, path in SPREAD:
        values = []
        for r in rounds:
            value: Any = r[phase]
            for key in path:
                value = value[key]
            if value is not None:
                values.append(float(value))
        if values:
            values.sort()
            mid = len(values) // 2
            median = values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
            out[label] = {"median": round(median, 1), "min": values[0], "max": values[-1]}
    return out


def run(directory: Path, volumes: int, concurrency: int, nodes: int,
        repeat: int = 3) -> dict[str, Any]:
    replicas = min(REPLICAS, nodes)
    started = time.monotonic()
    # up() tears down what it started when it fails; calling down() for that case too
    # would also stop a cluster someone else runs in the same directory.
    spec = devcluster.up(directory, nodes, pool_size_for(volumes))
    up_s = time.monotonic() - started
    try:
        endpoint = spec.controller.csi_endpoint
        with RssSampler(spec.controller.pid) as rss:
            rounds = [one_round(endpoint, volumes, concurrency, replicas)
                      for _ in range(repeat)]
        return {
            "config": {"volumes": volumes, "concurrency": concurrency, "nodes": nodes,
                       "replicas": replicas, "volume_size_bytes": VOLUME_SIZE,
                       "pool_size_bytes": pool_size_for(volumes), "repeat": repeat,
                       "netns": spec.bridge is not None},
            "cluster_up_s": round(up_s, 2),
            "rounds": rounds,
            "spread": spread(rounds),
            "controller_rss": rss.summary(),
        }
    finally:
        devcluster.down(directory)


def report(result: dict[str, Any]) -> list[str]:
    cfg = result["config"]
    lines = [
        f"{cfg['volumes']} volumes x {cfg['volume_size_bytes'] // MIB} MiB, "
        f"{cfg['replicas']} replicas, {cfg['nodes']} nodes, {cfg['concurrency']} callers, "
        f"{cfg['repeat']} rounds (cluster up in {result['cluster_up_s']} s)",
    ]
    for i, r in enumerate(result["rounds"], 1):
        for key in ("create", "delete"):
            s = r[key]
            lat = s["latency_ms"]
            name = "CreateVolume" if key == "create" else "DeleteVolume"
            lines.append(
                f"  round {i} {name}: {s['ok']}/{s['calls']} ok in {s['wall_s']} s = "
                f"{s['throughput_per_s']}/s; latency ms p50 {lat['p50']} p90 {lat['p90']} "
                f"p99 {lat['p99']} max {lat['max']}; errors {s['errors'] or 'none'}"
            )
        lines.append(
            f"  round {i} ListVolumes after create: {r['listed_after_create']} of ours; "
            f"after delete: {r['remaining_after_delete']} left"
        )
    for label, v in result["spread"].items():
        lines.append(f"  {label}: median {v['median']} [{v['min']}-{v['max']}]")
    rss = result["controller_rss"]
    lines.append(
        f"  controller RSS: peak {rss['peak_mib']} MiB (start {rss['start_mib']}, "
        f"end {rss['end_mib']}, {rss['samples']} samples)"
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--dir", required=True, type=Path, help="dev cluster directory")
    parser.add_argument("--volumes", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds on one cluster; figures are medians [min-max] over them")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if min(args.volumes, args.concurrency, args.nodes, args.repeat) < 1:
        parser.error("--volumes, --concurrency, --nodes and --repeat must be at least 1")
    result = run(args.dir, args.volumes, args.concurrency, args.nodes, args.repeat)
    print("\n".join(report(result)))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
