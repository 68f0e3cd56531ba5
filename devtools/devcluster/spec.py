"""On-disk records of a dev cluster: the public ``cluster.json`` and the private ledger.

Owns the two JSON files in a cluster directory and their (atomic) reading and writing:

- ``cluster.json`` -- the stable contract other tools read (endpoints, addresses, pids),
  mirrored by the frozen ``ClusterSpec`` dataclasses. Written once the cluster is ready.
- ``cluster-state.json`` -- the ledger: every resource ``up()`` created (bridge,
  namespaces, veths, processes), appended *as they are created*, so ``down()`` can undo
  a half-finished ``up()``.

Also owns the per-directory lock that serialises mutating operations on one cluster.
It must not create or destroy any resource itself.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from replication.atomic_file import write_atomic

SPEC_FILE = "cluster.json"
LEDGER_FILE = "cluster-state.json"
LOCK_FILE = "cluster.lock"
DEFAULT_ETCD_PREFIX = "/tandem/"


class ClusterError(Exception):
    """A dev-cluster operation failed; the message says what and where to look."""


@dataclass(frozen=True)
class PoolSpec:
    kind: str
    dir: str
    size_bytes: int


@dataclass(frozen=True)
class ControllerSpec:
    csi_endpoint: str
    pid: int
    log: str


@dataclass(frozen=True)
class NodeSpec:
    id: str
    csi_endpoint: str
    agent_address: str
    replica_address: str
    netns: str | None
    pool: PoolSpec
    state_dir: str
    pid: int
    log: str
    # The node's own command line (without the nsenter prefix), reused by revive_node().
    argv: tuple[str, ...]
    health_address: str = ""  # GET /readyz (HOST:PORT)


@dataclass(frozen=True)
class ClusterSpec:
    dir: str
    etcd_endpoints: tuple[str, ...]
    etcd_host_endpoint: str
    etcd_prefix: str
    bridge: str | None
    controller: ControllerSpec
    nodes: tuple[NodeSpec, ...]
    lease_ttl_s: float
    replication_tls: bool = False  # replication over TLS (credentials/tls.*)

    def node(self, node_id: str) -> NodeSpec:
        for node in self.nodes:
            if node.id == node_id:
                return node
        known = ", ".join(n.id for n in self.nodes)
        raise ClusterError(f"no node {node_id!r} in cluster {self.dir} (nodes: {known})")


def spec_to_json(spec: ClusterSpec) -> dict[str, Any]:
    raw = asdict(spec)
    raw["etcd_endpoints"] = list(spec.etcd_endpoints)
    for node in raw["nodes"]:
        node["argv"] = list(node["argv"])
    return raw


def spec_from_json(raw: dict[str, Any]) -> ClusterSpec:
    nodes = tuple(
        NodeSpec(
            id=n["id"],
            csi_endpoint=n["csi_endpoint"],
            agent_address=n["agent_address"],
            replica_address=n["replica_address"],
            netns=n["netns"],
            pool=PoolSpec(**n["pool"]),
            state_dir=n["state_dir"],
            pid=int(n["pid"]),
            log=n["log"],
            argv=tuple(n["argv"]),
            health_address=n.get("health_address", ""),
        )
        for n in raw["nodes"]
    )
    return ClusterSpec(
        dir=raw["dir"],
        etcd_endpoints=tuple(raw["etcd_endpoints"]),
        etcd_host_endpoint=raw["etcd_host_endpoint"],
        etcd_prefix=raw["etcd_prefix"],
        bridge=raw["bridge"],
        controller=ControllerSpec(**raw["controller"]),
        nodes=nodes,
        lease_ttl_s=float(raw["lease_ttl_s"]),
        replication_tls=bool(raw.get("replication_tls", False)),
    )


def load_spec(directory: Path) -> ClusterSpec:
    """Read ``DIR/cluster.json``; ClusterError if the cluster is not (fully) up."""
    path = Path(directory) / SPEC_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ClusterError(f"no cluster in {directory}: {path} does not exist") from None
    return spec_from_json(raw)


def write_spec(spec: ClusterSpec) -> None:
    write_json_atomic(Path(spec.dir) / SPEC_FILE, spec_to_json(spec))


@dataclass(frozen=True)
class ProcRecord:
    """One process up() started. start_ticks tells a live pid from a reused one."""

    name: str
    pid: int
    start_ticks: int
    log: str
    netns: str | None = None


@dataclass
class Ledger:
    """Resources created so far, in creation order; mutated then saved after each step."""

    directory: Path
    subnet_index: int | None = None
    bridge: str | None = None
    netns: list[str] = field(default_factory=list)
    veths: list[str] = field(default_factory=list)
    procs: dict[str, ProcRecord] = field(default_factory=dict)

    def save(self) -> None:
        raw = {
            "subnet_index": self.subnet_index,
            "bridge": self.bridge,
            "netns": self.netns,
            "veths": self.veths,
            "procs": {name: asdict(rec) for name, rec in self.procs.items()},
        }
        write_json_atomic(self.directory / LEDGER_FILE, raw)

    def record_proc(self, rec: ProcRecord) -> None:
        self.procs[rec.name] = rec
        self.save()


def load_ledger(directory: Path) -> Ledger | None:
    path = directory / LEDGER_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    return Ledger(
        directory=directory,
        subnet_index=raw["subnet_index"],
        bridge=raw["bridge"],
        netns=list(raw["netns"]),
        veths=list(raw["veths"]),
        procs={name: ProcRecord(**rec) for name, rec in raw["procs"].items()},
    )


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    # Readers (other CLI invocations, tests) must never see a half-written file.
    write_atomic(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode(),
                 mode=0o644)


@contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Serialise mutating operations on one cluster directory (not re-entrant)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK_FILE, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
