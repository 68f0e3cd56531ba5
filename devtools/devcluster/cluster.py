"""Dev-cluster lifecycle: ``up()``, ``status()`` and ``down()`` of a local multi-node cluster.

Owns the order of things: network first, then etcd (healthy), then the controller and one
node process per node (each in its own network namespace when root), then readiness
(CSI Identity Probe on every socket), then ``cluster.json``. Every resource is written to
the ledger as it is created, so ``down()`` undoes any prefix of ``up()``, including one
that died half-way. It must not know how a resource is made (netns.py, procs.py,
mounts.py do) nor inject faults (faults.py).
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from csi_driver.config import DEFAULT_LEASE_TTL_S
from csi_driver.credentials import write_credentials
from devtools.devcluster import mounts, netns, procs
from devtools.devcluster.spec import (
    DEFAULT_ETCD_PREFIX,
    LEDGER_FILE,
    SPEC_FILE,
    ClusterError,
    ClusterSpec,
    ControllerSpec,
    Ledger,
    NodeSpec,
    PoolSpec,
    ProcRecord,
    load_ledger,
    load_spec,
    locked,
    write_spec,
)

AGENT_PORT = 7001
REPLICA_PORT = 7002
HEALTH_PORT = 9810
STOP_GRACE_S = 10.0
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107
_FRESH_SUBDIRS = ("etcd", "sockets", "pools", "state", "credentials")


def cluster_secret_path(directory: Path) -> Path:
    """The dev cluster's replication secret (made anew by every up(), mode 0600)."""
    return Path(directory) / "credentials" / "cluster-secret"


def tls_paths(directory: Path) -> tuple[Path, Path]:
    """The replication TLS certificate and key (made by up(); used when tls=True)."""
    creds = Path(directory) / "credentials"
    return creds / "tls.crt", creds / "tls.key"


def agent_key_paths(directory: Path) -> tuple[Path, Path]:
    """The controller's agent signing key and the nodes' public key (made by up())."""
    creds = Path(directory) / "credentials"
    return creds / "agent.key", creds / "agent.pub"



@dataclass(frozen=True)
class _Etcd:
    endpoints: tuple[str, ...]
    host_endpoint: str


def up(
    directory: Path, nodes: int, pool_size_bytes: int, *, lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
    use_netns: bool | None = None, timeout_s: float = 60.0,
    replace_dead_after_s: float = 300.0, tls: bool = False,
) -> ClusterSpec:
    """Start a fresh cluster in directory and return once every process is ready
    (``tls``: replication over TLS).

    Anything an earlier cluster left in DIR/{etcd,sockets,pools,state} is deleted. On any
    failure everything created so far is torn down and the error re-raised.
    """
    directory = Path(directory).resolve()
    if nodes < 1:
        raise ClusterError(f"a cluster needs at least one node, got {nodes}")
    with_netns = netns.can_use_netns() if use_netns is None else use_netns
    if with_netns and not netns.can_use_netns():
        raise ClusterError("network namespaces need root; pass use_netns=False")
    deadline = time.monotonic() + timeout_s
    with locked(directory):
        if (directory / LEDGER_FILE).exists():
            raise ClusterError(f"{directory} already holds a cluster; run down() first")
        _fresh_layout(directory, nodes)
        ledger = Ledger(directory=directory)
        ledger.save()
        try:
            return _bring_up(ledger, nodes, pool_size_bytes, lease_ttl_s, with_netns, deadline,
                             replace_dead_after_s, tls)
        except BaseException as e:
            for err in _teardown(directory):
                e.add_note(f"cleanup after failed up(): {err}")
            raise


def _fresh_layout(directory: Path, nodes: int) -> None:
    # Mounts left by an unclean earlier run would make rmtree fail or reach into them.
    leftovers = mounts.cleanup_storage(directory)
    if leftovers:
        raise ClusterError(f"cannot reuse {directory}: {'; '.join(leftovers)}")
    (directory / SPEC_FILE).unlink(missing_ok=True)
    for sub in _FRESH_SUBDIRS:
        if (directory / sub).exists():
            shutil.rmtree(directory / sub)
    for sub in ("etcd", "logs", "sockets"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    write_credentials(directory / "credentials")
    for i in range(1, nodes + 1):
        (directory / "pools" / f"node-{i}").mkdir(parents=True)
        (directory / "state" / f"node-{i}").mkdir(parents=True)
    longest = directory / "sockets" / f"node-{nodes}.sock"
    if len(str(longest)) > _MAX_SOCKET_PATH:
        raise ClusterError(f"socket path {longest} is too long for a unix socket")


def _bring_up(
    ledger: Ledger, nodes: int, pool_size_bytes: int, lease_ttl_s: float,
    with_netns: bool, deadline: float, replace_dead_after_s: float = 300.0, tls: bool = False,
) -> ClusterSpec:
    names = _create_network(ledger, nodes) if with_netns else None
    etcd = _start_etcd(ledger, names, deadline)
    directory = ledger.directory
    ctl_endpoint = f"unix://{directory / 'sockets' / 'controller.sock'}"
    ctl_argv = [
        sys.executable, "-m", "csi_driver.cli", "controller", "--csi-endpoint", ctl_endpoint,
        "--etcd-endpoints", ",".join(etcd.endpoints),
        "--replace-dead-after", str(replace_dead_after_s),
        "--agent-key-file", str(agent_key_paths(directory)[0]),
        # Never the default: on a machine that is itself a pod, the default would find that
        # cluster's API and act on its nodes.
        "--node-down-responder", "off",
    ]
    ctl = procs.spawn("controller", ctl_argv, directory / "logs" / "controller.log")
    ledger.record_proc(ctl)
    node_specs = [
        _start_node(ledger, names, i, etcd, pool_size_bytes, lease_ttl_s, tls)
        for i in range(1, nodes + 1)
    ]
    checks = {"controller": partial(procs.csi_ready, ctl_endpoint)}
    checks.update({node.id: partial(procs.csi_ready, node.csi_endpoint) for node in node_specs})
    procs.wait_ready(checks, list(ledger.procs.values()), deadline)
    spec = ClusterSpec(
        dir=str(directory), etcd_endpoints=etcd.endpoints, etcd_host_endpoint=etcd.host_endpoint,
        etcd_prefix=DEFAULT_ETCD_PREFIX, bridge=names.bridge if names else None,
        controller=ControllerSpec(csi_endpoint=ctl_endpoint, pid=ctl.pid, log=ctl.log),
        nodes=tuple(node_specs), lease_ttl_s=lease_ttl_s, replication_tls=tls,
    )
    write_spec(spec)
    return spec


def _create_network(ledger: Ledger, nodes: int) -> netns.Names:
    names = netns.create_bridge()
    ledger.subnet_index, ledger.bridge = names.k, names.bridge
    ledger.save()
    netns.configure_bridge(names)
    for i in range(1, nodes + 1):
        # The index k is ours (we created tdm<k>), so these names are ours too: record
        # them before creating so a crash in between still gets them cleaned up.
        ledger.netns.append(names.netns(i))
        ledger.veths.append(names.veth(i))
        ledger.save()
        netns.create_netns(names.netns(i))
        netns.create_veth(names, i)
    return names


def _distinct_ports(host: str, count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = procs.free_port(host)
        if port not in ports:
            ports.append(port)
    return ports


def _start_etcd(ledger: Ledger, names: netns.Names | None, deadline: float) -> _Etcd:
    directory = ledger.directory
    peer_port, local_port = _distinct_ports("127.0.0.1", 2)
    if names:
        bridge_port = procs.free_port(names.host_ip)
        client = f"http://{names.host_ip}:{bridge_port}"
        local = f"http://127.0.0.1:{local_port}"
        listen = f"{client},{local}"
    else:
        client = local = listen = f"http://127.0.0.1:{local_port}"
    peer = f"http://127.0.0.1:{peer_port}"
    argv = [
        "/usr/bin/etcd", "--name", "default", "--data-dir", str(directory / "etcd"),
        "--listen-client-urls", listen, "--advertise-client-urls", client,
        "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
        "--initial-cluster", f"default={peer}",
        "--heartbeat-interval", "10", "--election-timeout", "50",
    ]
    rec = procs.spawn("etcd", argv, directory / "logs" / "etcd.log")
    ledger.record_proc(rec)
    procs.wait_ready({"etcd": partial(procs.etcd_healthy, local)}, [rec], deadline)
    return _Etcd(endpoints=(client,), host_endpoint=local)


def _start_node(
    ledger: Ledger, names: netns.Names | None, i: int, etcd: _Etcd, pool_size_bytes: int,
    lease_ttl_s: float, tls: bool = False,
) -> NodeSpec:
    directory, node_id = ledger.directory, f"node-{i}"
    if names:
        host, agent_port, replica_port = names.node_ip(i), AGENT_PORT, REPLICA_PORT
        health_port = HEALTH_PORT
    else:
        host = "127.0.0.1"
        agent_port, replica_port, health_port = _distinct_ports(host, 3)
    endpoint = f"unix://{directory / 'sockets' / f'{node_id}.sock'}"
    pool = PoolSpec(kind="file", dir=str(directory / "pools" / node_id), size_bytes=pool_size_bytes)
    state_dir = str(directory / "state" / node_id)
    cert, key = tls_paths(directory)
    argv: tuple[str, ...] = (
        sys.executable, "-m", "csi_driver.cli", "node", "--node-id", node_id,
        "--csi-endpoint", endpoint, "--agent-listen", f"{host}:{agent_port}",
        "--replica-listen", f"{host}:{replica_port}",
        "--etcd-endpoints", ",".join(etcd.endpoints), "--pool", pool.kind,
        "--pool-dir", pool.dir, "--pool-size", str(pool.size_bytes),
        "--state-dir", state_dir, "--lease-ttl", str(lease_ttl_s),
        "--cluster-secret-file", str(cluster_secret_path(directory)),
        "--agent-public-key-file", str(agent_key_paths(directory)[1]),
        "--health-listen", f"{host}:{health_port}",
        *(("--tls-cert-file", str(cert), "--tls-key-file", str(key)) if tls else ()),
    )
    ns = names.netns(i) if names else None
    prefix = netns.nsenter_prefix(ns) if ns else []
    log = directory / "logs" / f"{node_id}.log"
    rec = procs.spawn(node_id, argv, log, netns=ns, prefix=prefix)
    ledger.record_proc(rec)
    return NodeSpec(
        id=node_id, csi_endpoint=endpoint, agent_address=f"{host}:{agent_port}",
        replica_address=f"{host}:{replica_port}", netns=ns, pool=pool, state_dir=state_dir,
        pid=rec.pid, log=str(log), argv=argv, health_address=f"{host}:{health_port}",
    )


def down(directory: Path) -> None:
    """Stop and remove everything up() created in directory; safe to repeat."""
    directory = Path(directory).resolve()
    if not directory.is_dir():
        return
    with locked(directory):
        errors = _teardown(directory)
    if errors:
        raise ClusterError(f"down({directory}) left things behind: " + "; ".join(errors))


def _teardown(directory: Path) -> list[str]:
    ledger = load_ledger(directory)
    errors: list[str] = []
    if ledger is not None:
        errors += _stop_processes(ledger)
    errors += mounts.cleanup_storage(directory)
    if ledger is not None:
        errors += _delete_network(ledger)
    if not errors:
        # Spec first: a directory with a ledger but no cluster.json is "being torn down".
        (directory / SPEC_FILE).unlink(missing_ok=True)
        (directory / LEDGER_FILE).unlink(missing_ok=True)
    return errors


def _stop_processes(ledger: Ledger) -> list[str]:
    # Nodes and controller before etcd: on SIGTERM they may still want to talk to it.
    workers = [rec for name, rec in ledger.procs.items() if name != "etcd"]
    left: list[str] = [f"{rec.name} pid {rec.pid}" for rec in procs.stop(workers, STOP_GRACE_S)]
    for ns in ledger.netns:
        try:
            stragglers = netns.netns_pids(ns)
        except netns.CommandError as e:
            left.append(str(e))
            continue
        left += [f"pid {pid} in {ns}" for pid in procs.kill_pids(stragglers)]
    etcd = ledger.procs.get("etcd")
    if etcd is not None:
        left += [f"etcd pid {rec.pid}" for rec in procs.stop([etcd], STOP_GRACE_S)]
    return [f"still running: {item}" for item in left]


def _delete_network(ledger: Ledger) -> list[str]:
    errors: list[str] = []
    steps: list[tuple[Callable[[str], None], str]]
    steps = [(netns.remove_partition, ns) for ns in ledger.netns]
    # Veths before namespaces: deleting a veth removes both ends synchronously, while a
    # dying namespace takes its end away later, in the background.
    steps += [(netns.delete_link, veth) for veth in ledger.veths]
    steps += [(netns.delete_netns, ns) for ns in ledger.netns]
    if ledger.bridge:
        steps.append((netns.delete_link, ledger.bridge))
    for step, name in steps:
        try:
            step(name)
        except netns.CommandError as e:
            errors.append(str(e))
    return errors


@dataclass(frozen=True)
class ProcessStatus:
    name: str
    pid: int
    running: bool
    # Known only to the Python process that spawned it; None after a CLI `up` exited.
    returncode: int | None

    @property
    def state(self) -> str:
        if self.running:
            return "running"
        return f"exited({'?' if self.returncode is None else self.returncode})"


@dataclass(frozen=True)
class NodeStatus:
    id: str
    process: ProcessStatus
    netns: str | None
    netns_exists: bool
    link_up: bool | None
    partitioned: bool


@dataclass(frozen=True)
class ClusterStatus:
    dir: str
    exists: bool  # up() was started here and down() has not finished
    ready: bool  # cluster.json is present: up() completed
    bridge: str | None
    bridge_exists: bool
    etcd_healthy: bool
    processes: tuple[ProcessStatus, ...]
    nodes: tuple[NodeStatus, ...]

    def lines(self) -> list[str]:
        """Human-readable summary for the CLI."""
        if not self.exists:
            return [f"no cluster in {self.dir}"]
        out = [
            f"cluster {self.dir}: {'ready' if self.ready else 'not ready'}",
            f"etcd healthy: {self.etcd_healthy}",
        ]
        if self.bridge:
            out.append(f"bridge {self.bridge}: {'present' if self.bridge_exists else 'missing'}")
        out += [f"{p.name}: pid {p.pid} {p.state}" for p in self.processes]
        for n in self.nodes:
            if n.netns is None:
                continue
            link = {None: "missing", True: "up", False: "down"}[n.link_up]
            ns_state = "present" if n.netns_exists else "missing"
            part = ", partitioned" if n.partitioned else ""
            out.append(f"{n.id}: netns {n.netns} {ns_state}, link {link}{part}")
        return out


def status(directory: Path) -> ClusterStatus:
    """What is running and connected right now (read-only, takes no lock)."""
    directory = Path(directory).resolve()
    ledger = load_ledger(directory)
    spec = _try_load_spec(directory)
    if ledger is None:
        return ClusterStatus(str(directory), False, False, None, False, False, (), ())
    processes = {
        name: ProcessStatus(name, rec.pid, procs.is_running(rec), procs.returncode(rec))
        for name, rec in ledger.procs.items()
    }
    nodes = tuple(
        _node_status(ledger, name, rec, processes[name])
        for name, rec in ledger.procs.items() if name.startswith("node-")
    )
    return ClusterStatus(
        dir=str(directory), exists=True, ready=spec is not None, bridge=ledger.bridge,
        bridge_exists=bool(ledger.bridge) and netns.link_exists(ledger.bridge or ""),
        etcd_healthy=spec is not None and procs.etcd_healthy(spec.etcd_host_endpoint),
        processes=tuple(processes.values()), nodes=nodes,
    )


def _node_status(ledger: Ledger, node_id: str, rec: ProcRecord, proc: ProcessStatus) -> NodeStatus:
    if rec.netns is None or ledger.subnet_index is None:
        return NodeStatus(node_id, proc, None, False, None, False)
    veth = netns.Names(ledger.subnet_index).veth(node_index(node_id))
    return NodeStatus(
        id=node_id, process=proc, netns=rec.netns, netns_exists=netns.netns_exists(rec.netns),
        link_up=netns.node_link_up(veth, rec.netns), partitioned=netns.has_partition(rec.netns),
    )


def node_index(node_id: str) -> int:
    """node-3 -> 3: the index names the node's namespace, veth and address."""
    return int(node_id.removeprefix("node-"))


def _try_load_spec(directory: Path) -> ClusterSpec | None:
    try:
        return load_spec(directory)
    except ClusterError:
        return None
