"""Fault injection on a running dev cluster: kill, revive, pause, partition and heal a
node; stop and start etcd.

Owns the failure recipes of environment.md "Simulating failures":
- ``sigkill``: SIGKILL every pid in the node's namespace; peers see RST at once.
- ``link-down``: both veth ends down *first*, then SIGKILL; peers see nothing until a
  timeout (TCP_USER_TIMEOUT, heartbeats, lease expiry).
- partition: nft drop rules inside the node's namespace (table ``inet tandem_partition``)
  while its processes stay alive.
It must not create or delete clusters (cluster.py) nor know how nft/ip are driven (netns.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time
from functools import partial
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from devtools.devcluster import netns, procs
from devtools.devcluster.cluster import node_index
from devtools.devcluster.spec import (
    ClusterError,
    ClusterSpec,
    Ledger,
    NodeSpec,
    ProcRecord,
    load_ledger,
    load_spec,
    locked,
    write_spec,
)

KillMode = Literal["sigkill", "link-down"]


def _load(directory: Path, node_id: str) -> tuple[ClusterSpec, NodeSpec, Ledger, ProcRecord]:
    spec = load_spec(directory)
    node = spec.node(node_id)
    ledger = load_ledger(directory)
    if ledger is None or node_id not in ledger.procs:
        raise ClusterError(f"{directory}: cluster state has no record of {node_id}")
    return spec, node, ledger, ledger.procs[node_id]


def _veth(ledger: Ledger, node: NodeSpec) -> tuple[str, str]:
    if node.netns is None or ledger.subnet_index is None:
        raise ClusterError(f"{node.id} has no network namespace (cluster started without netns)")
    return netns.Names(ledger.subnet_index).veth(node_index(node.id)), node.netns


def kill_node(directory: Path, node_id: str, mode: KillMode) -> None:
    """Kill a node: every process in its namespace (or its process group without netns)."""
    if mode not in ("sigkill", "link-down"):
        raise ValueError(f"unknown kill mode {mode!r}")
    directory = Path(directory).resolve()
    with locked(directory):
        _, node, ledger, rec = _load(directory, node_id)
        if mode == "link-down":
            netns.set_node_link(*_veth(ledger, node), up=False)
        pids = set(netns.netns_pids(node.netns)) if node.netns else set()
        if procs.is_running(rec):
            pids |= {rec.pid} | procs.group_pids(rec.pid)
        left = procs.kill_pids(pids)
    if left:
        raise ClusterError(f"{node_id}: pids {left} survived SIGKILL")


def revive_node(directory: Path, node_id: str, *, timeout_s: float = 60.0) -> None:
    """Link up again and restart the node with the same arguments and pool; wait ready."""
    directory = Path(directory).resolve()
    deadline = time.monotonic() + timeout_s
    with locked(directory):
        spec, node, ledger, rec = _load(directory, node_id)
        busy = procs.is_running(rec) or (node.netns and netns.netns_pids(node.netns))
        if busy:
            raise ClusterError(f"{node_id} is still running; kill_node() it first")
        if node.netns:
            netns.set_node_link(*_veth(ledger, node), up=True)
        _start_node_process(spec, node, ledger, "revive_node", deadline)


def restart_node_process(
    directory: Path, node_id: str, *, graceful: bool = True, timeout_s: float = 60.0,
) -> None:
    """Restart only the node plugin process, as a rollout (graceful: SIGTERM) or a crash
    (SIGKILL) of its container would: the targets and attachments it started keep running in
    the node's namespace, and the new process must take them back."""
    directory = Path(directory).resolve()
    deadline = time.monotonic() + timeout_s
    with locked(directory):
        spec, node, ledger, rec = _load(directory, node_id)
        if graceful:
            left = [r.pid for r in procs.stop([rec])]
        else:
            left = procs.kill_pids([rec.pid]) if procs.is_running(rec) else []
        if left:
            raise ClusterError(f"{node_id}: node process {left} did not stop")
        _start_node_process(spec, node, ledger, "restart_node_process", deadline)


def _start_node_process(
    spec: ClusterSpec, node: NodeSpec, ledger: Ledger, why: str, deadline: float,
) -> None:
    prefix = netns.nsenter_prefix(node.netns) if node.netns else []
    with open(node.log, "a") as log:
        log.write(f"=== {why} {node.id} at {time.strftime('%Y-%m-%dT%H:%M:%S')} ===\n")
    new = procs.spawn(
        node.id, node.argv, Path(node.log), netns=node.netns, prefix=prefix, append_log=True,
    )
    ledger.record_proc(new)
    nodes = tuple(dataclasses.replace(n, pid=new.pid) if n.id == node.id else n
                  for n in spec.nodes)
    write_spec(dataclasses.replace(spec, nodes=nodes))
    procs.wait_ready({node.id: partial(procs.csi_ready, node.csi_endpoint)}, [new], deadline)


def partition_node(
    directory: Path, node_id: str, *, from_etcd: bool = True, from_peers: bool = True,
) -> None:
    """Drop the node's traffic to etcd and/or its peer nodes; processes stay alive.

    Replaces any earlier partition of this node. Traffic between the node and the
    controller (root namespace, not etcd's port) is left alone.
    """
    directory = Path(directory).resolve()
    with locked(directory):
        spec, node, ledger, _ = _load(directory, node_id)
        _, ns = _veth(ledger, node)
        if not (from_etcd or from_peers):
            netns.remove_partition(ns)
            return
        peers = [_host(n.agent_address) for n in spec.nodes if n.id != node_id]
        tcp: list[tuple[str, int]] = []
        if from_etcd:
            for endpoint in spec.etcd_endpoints:
                url = urlsplit(endpoint)
                tcp.append((url.hostname or "", url.port or 2379))
        ruleset = netns.partition_ruleset(peers if from_peers else [], tcp)
        netns.apply_partition(ns, ruleset)


def heal_node(directory: Path, node_id: str) -> None:
    """Remove the node's partition rules (idempotent)."""
    directory = Path(directory).resolve()
    with locked(directory):
        _, node, ledger, _ = _load(directory, node_id)
        netns.remove_partition(_veth(ledger, node)[1])


def _host(address: str) -> str:
    return address.rsplit(":", 1)[0]


def pause_node(directory: Path, node_id: str, *, resume: bool = False) -> None:
    """SIGSTOP (or SIGCONT) every process of the node: alive to the kernel, silent to peers
    (a node stalled by swapping or a hung disk)."""
    directory = Path(directory).resolve()
    with locked(directory):
        _, node, _, rec = _load(directory, node_id)
        sig = signal.SIGCONT if resume else signal.SIGSTOP
        pids = set(netns.netns_pids(node.netns)) if node.netns else set()
        if procs.is_running(rec):
            pids |= {rec.pid} | procs.group_pids(rec.pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


@dataclasses.dataclass(frozen=True)
class StoppedEtcd:
    argv: list[str]
    log: str
    stopped_at: float  # monotonic, when the stop began


def stop_etcd(directory: Path) -> StoppedEtcd:
    """SIGTERM the cluster's etcd and wait until it is gone (its data stays)."""
    directory = Path(directory).resolve()
    with locked(directory):
        ledger = load_ledger(directory)
        if ledger is None or "etcd" not in ledger.procs:
            raise ClusterError(f"{directory}: no etcd in the cluster state")
        old = ledger.procs["etcd"]
        argv = [a.decode() for a in
                Path(f"/proc/{old.pid}/cmdline").read_bytes().split(b"\0") if a]
        stopped_at = time.monotonic()
        if procs.stop([old], grace_s=10.0):
            raise ClusterError("etcd did not stop")
    return StoppedEtcd(argv, old.log, stopped_at)


def start_etcd(directory: Path, stopped: StoppedEtcd, timeout_s: float = 30.0) -> float:
    """Start etcd again with its old command line and data (recorded in the ledger, so
    ``down()`` stops the new one); return the monotonic time it is healthy."""
    directory = Path(directory).resolve()
    spec = load_spec(directory)
    with locked(directory):
        ledger = load_ledger(directory)
        if ledger is None:
            raise ClusterError(f"{directory}: no cluster state")
        new = procs.spawn("etcd", stopped.argv, Path(stopped.log), append_log=True)
        ledger.record_proc(new)
    procs.wait_ready({"etcd": partial(procs.etcd_healthy, spec.etcd_host_endpoint)}, [new],
                     time.monotonic() + timeout_s)
    return time.monotonic()
