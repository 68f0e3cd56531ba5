"""The local dev cluster against the real etcd, controller and node processes.

Root-gated: each node runs in its own network namespace. As root, a machine that cannot
create namespaces, veths, bridges or nft tables makes these tests fail, not skip.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools import devcluster as dc
from devtools.devcluster import netns, procs
from devtools.devcluster.mounts import loop_devices, mounts
from replication.proc_identity import start_ticks

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
]

POOL = 1 << 30

_CONNECT = """
import errno, socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
    print("ok")
except ConnectionRefusedError:
    print("refused")
except TimeoutError:
    print("timeout")
except OSError as e:
    print(errno.errorcode.get(e.errno or 0, "oserror"))
"""


def connect_from(ns: str | None, address: str, timeout: float = 1.0) -> str:
    """TCP connect from inside ns (root namespace if None): ok / refused / timeout / errno."""
    host, port = address.rsplit(":", 1)
    prefix = netns.nsenter_prefix(ns) if ns else []
    argv = [*prefix, sys.executable, "-c", _CONNECT, host, port, str(timeout)]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()


def etcd_address(spec: dc.ClusterSpec) -> str:
    return spec.etcd_endpoints[0].removeprefix("http://")


def tdm_links() -> set[str]:
    out = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, check=True)
    return {link["ifname"] for link in json.loads(out.stdout) if link["ifname"].startswith("tdm")}


def tdm_netns() -> set[str]:
    if not os.path.isdir(netns.NETNS_DIR):
        return set()
    return {name for name in os.listdir(netns.NETNS_DIR) if name.startswith("tdm")}


def pid_alive(pid: int) -> bool:
    return start_ticks(pid) is not None


@pytest.fixture
def cluster_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "c"
    try:
        yield directory
    finally:
        dc.down(directory)


@pytest.fixture
def cluster(cluster_dir: Path) -> dc.ClusterSpec:
    return dc.up(cluster_dir, 3, POOL, lease_ttl_s=2.0)


def test_up_writes_cluster_json_and_runs_each_node_in_its_namespace(
    cluster: dc.ClusterSpec, cluster_dir: Path,
) -> None:
    raw = json.loads((cluster_dir / "cluster.json").read_text())
    assert raw["dir"] == str(cluster_dir.resolve())
    assert raw["etcd_prefix"] == "/tandem/"
    assert raw["lease_ttl_s"] == 2.0
    assert dc.load_spec(cluster_dir) == cluster
    k = int(cluster.bridge.removeprefix("tdm")) if cluster.bridge else -1
    subnet = ipaddress.ip_network(f"10.213.{k}.0/24")
    assert etcd_address(cluster).startswith(f"10.213.{k}.1:")
    assert procs.etcd_healthy(cluster.etcd_host_endpoint)
    assert [n.id for n in cluster.nodes] == ["node-1", "node-2", "node-3"]
    for i, node in enumerate(cluster.nodes, start=1):
        assert node.netns == f"tdm{k}-n{i}"
        assert node.agent_address == f"10.213.{k}.{10 + i}:7001"
        assert node.replica_address == f"10.213.{k}.{10 + i}:7002"
        assert ipaddress.ip_address(node.agent_address.split(":")[0]) in subnet
        pool_dir = str(cluster_dir.resolve() / "pools" / node.id)
        assert node.pool == dc.PoolSpec("file", pool_dir, POOL)
        assert node.pid in netns.netns_pids(node.netns)
        assert Path(node.csi_endpoint.removeprefix("unix://")).is_socket()
        assert procs.csi_ready(node.csi_endpoint)
        # Etcd and peers only over the bridge: the namespace's loopback is its own.
        assert connect_from(node.netns, etcd_address(cluster)) == "ok"
        host_port = cluster.etcd_host_endpoint.removeprefix("http://").split(":")[1]
        assert connect_from(node.netns, f"127.0.0.1:{host_port}") == "refused"
    assert connect_from(cluster.nodes[0].netns, cluster.nodes[1].agent_address) == "ok"
    assert connect_from(None, cluster.nodes[2].agent_address) == "ok"  # the controller's view
    assert procs.csi_ready(cluster.controller.csi_endpoint)
    st = dc.status(cluster_dir)
    assert st.exists and st.ready and st.etcd_healthy and st.bridge_exists
    assert {p.name: p.state for p in st.processes} == {
        "etcd": "running", "controller": "running",
        "node-1": "running", "node-2": "running", "node-3": "running",
    }
    assert all(n.netns_exists and n.link_up and not n.partitioned for n in st.nodes)


def test_kill_sigkill_peers_see_refusal_then_revive(
    cluster: dc.ClusterSpec, cluster_dir: Path,
) -> None:
    victim = cluster.nodes[1]
    assert victim.netns is not None
    dc.kill_node(cluster_dir, victim.id, "sigkill")
    assert netns.netns_pids(victim.netns) == []
    assert not pid_alive(victim.pid)
    # Link still up, nobody listening: the peer gets an immediate RST.
    assert connect_from(cluster.nodes[0].netns, victim.agent_address) == "refused"
    node_st = {n.id: n for n in dc.status(cluster_dir).nodes}[victim.id]
    assert node_st.process.state == "exited(-9)"
    assert node_st.link_up is True

    dc.revive_node(cluster_dir, victim.id)
    revived = dc.load_spec(cluster_dir).node(victim.id)
    assert revived.pid != victim.pid
    assert revived.argv == victim.argv
    assert revived.pid in netns.netns_pids(victim.netns)
    assert procs.csi_ready(victim.csi_endpoint)
    assert connect_from(cluster.nodes[0].netns, victim.agent_address) == "ok"
    assert {n.id: n.process.state for n in dc.status(cluster_dir).nodes}[victim.id] == "running"


def test_kill_link_down_peers_see_nothing_then_revive(
    cluster: dc.ClusterSpec, cluster_dir: Path,
) -> None:
    victim = cluster.nodes[2]
    assert victim.netns is not None
    dc.kill_node(cluster_dir, victim.id, "link-down")
    assert netns.netns_pids(victim.netns) == []
    assert not pid_alive(victim.pid)
    assert connect_from(cluster.nodes[0].netns, victim.agent_address) != "refused"
    assert connect_from(None, victim.agent_address) != "refused"
    node_st = {n.id: n for n in dc.status(cluster_dir).nodes}[victim.id]
    assert node_st.link_up is False
    assert node_st.process.running is False

    dc.revive_node(cluster_dir, victim.id)
    node_st = {n.id: n for n in dc.status(cluster_dir).nodes}[victim.id]
    assert node_st.link_up is True
    assert node_st.process.state == "running"
    assert connect_from(cluster.nodes[0].netns, victim.agent_address) == "ok"


def test_revive_refuses_a_running_node(cluster: dc.ClusterSpec, cluster_dir: Path) -> None:
    with pytest.raises(dc.ClusterError, match="still running"):
        dc.revive_node(cluster_dir, "node-1")
    with pytest.raises(dc.ClusterError, match="no node"):
        dc.kill_node(cluster_dir, "node-9", "sigkill")


def test_partition_and_heal_keep_processes_alive(
    cluster: dc.ClusterSpec, cluster_dir: Path,
) -> None:
    n1, n2, _ = cluster.nodes
    etcd = etcd_address(cluster)
    dc.partition_node(cluster_dir, n1.id)
    assert connect_from(n1.netns, etcd, timeout=0.5) == "timeout"
    assert connect_from(n1.netns, n2.agent_address, timeout=0.5) == "timeout"
    assert connect_from(n2.netns, n1.agent_address, timeout=0.5) == "timeout"
    assert connect_from(n2.netns, etcd) == "ok"
    assert pid_alive(n1.pid)
    assert {n.id: n.partitioned for n in dc.status(cluster_dir).nodes}[n1.id] is True

    dc.partition_node(cluster_dir, n1.id, from_etcd=True, from_peers=False)
    assert connect_from(n1.netns, etcd, timeout=0.5) == "timeout"
    assert connect_from(n1.netns, n2.agent_address) == "ok"

    dc.partition_node(cluster_dir, n1.id, from_etcd=False, from_peers=True)
    assert connect_from(n1.netns, etcd) == "ok"
    assert connect_from(n1.netns, n2.agent_address, timeout=0.5) == "timeout"

    dc.heal_node(cluster_dir, n1.id)
    dc.heal_node(cluster_dir, n1.id)
    assert connect_from(n1.netns, etcd) == "ok"
    assert connect_from(n1.netns, n2.agent_address) == "ok"
    assert pid_alive(n1.pid)
    assert not any(n.partitioned for n in dc.status(cluster_dir).nodes)


def _leave_storage_behind(directory: Path) -> str:
    """What a killed node leaves: a mount and a loop device under the cluster dir."""
    backing = directory / "pools" / "node-1" / "leftover.img"
    with open(backing, "wb") as f:
        f.truncate(16 << 20)
    out = subprocess.run(
        ["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, check=True,
    )
    target = directory / "state" / "node-1" / "leftover-mount"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(target)], check=True)
    return out.stdout.strip()


def test_down_removes_everything_and_is_idempotent(
    cluster: dc.ClusterSpec, cluster_dir: Path,
) -> None:
    directory = cluster_dir.resolve()
    loop = _leave_storage_behind(directory)
    assert loop in loop_devices(directory)
    pids = [cluster.controller.pid, *(n.pid for n in cluster.nodes)]
    etcd_pid = dc.status(cluster_dir).processes[0].pid

    dc.down(cluster_dir)

    assert not any(pid_alive(pid) for pid in [*pids, etcd_pid])
    assert not any(n.netns and netns.netns_exists(n.netns) for n in cluster.nodes)
    assert cluster.bridge and not netns.link_exists(cluster.bridge)
    assert not any(netns.link_exists(f"{cluster.bridge}n{i}h") for i in (1, 2, 3))
    assert loop_devices(directory) == []
    assert not [m for m in mounts() if m.target.startswith(str(directory) + "/")]
    assert not (directory / "cluster.json").exists()
    assert dc.status(cluster_dir).exists is False
    assert (directory / "logs" / "node-1.log").exists()  # logs survive for post-mortems
    dc.down(cluster_dir)
    dc.down(cluster_dir / "never-created")


def test_up_fails_half_way_when_nodes_exit_and_cleans_up(cluster_dir: Path) -> None:
    links, spaces = tdm_links(), tdm_netns()
    with pytest.raises(dc.ClusterError) as err:
        dc.up(cluster_dir, 2, -1)  # the node rejects the pool size and exits
    message = str(err.value)
    assert "node-" in message and "exited" in message and ".log" in message
    assert tdm_links() == links and tdm_netns() == spaces
    assert dc.status(cluster_dir).exists is False
    assert not (cluster_dir / "cluster.json").exists()
    leftover = subprocess.run(["pgrep", "-f", str(cluster_dir)], capture_output=True, text=True)
    assert leftover.stdout == ""


def test_up_times_out_half_way_and_cleans_up(cluster_dir: Path) -> None:
    links, spaces = tdm_links(), tdm_netns()
    with pytest.raises(dc.ClusterError, match="not ready"):
        dc.up(cluster_dir, 2, POOL, timeout_s=0.05)
    assert tdm_links() == links and tdm_netns() == spaces
    assert dc.status(cluster_dir).exists is False
    leftover = subprocess.run(["pgrep", "-f", str(cluster_dir)], capture_output=True, text=True)
    assert leftover.stdout == ""


def test_up_refuses_a_directory_with_a_cluster(
    cluster: dc.ClusterSpec, cluster_dir: Path,
) -> None:
    with pytest.raises(dc.ClusterError, match="already holds a cluster"):
        dc.up(cluster_dir, 1, POOL)
    assert dc.status(cluster_dir).ready


def test_parallel_clusters_get_distinct_subnets(tmp_path: Path) -> None:
    dirs = [tmp_path / "a", tmp_path / "b"]
    specs: dict[Path, dc.ClusterSpec] = {}
    errors: list[BaseException] = []

    def start(d: Path) -> None:
        try:
            specs[d] = dc.up(d, 1, POOL)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=start, args=(d,)) for d in dirs]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        a, b = (specs[d] for d in dirs)
        assert a.bridge != b.bridge
        assert a.nodes[0].agent_address != b.nodes[0].agent_address
    finally:
        for d in dirs:
            dc.down(d)


def test_without_netns_everything_is_on_loopback(tmp_path: Path) -> None:
    directory = tmp_path / "lo"
    try:
        spec = dc.up(directory, 2, POOL, use_netns=False)
        assert spec.bridge is None
        assert spec.etcd_endpoints == (spec.etcd_host_endpoint,)
        addresses = [a for n in spec.nodes for a in (n.agent_address, n.replica_address)]
        assert all(a.startswith("127.0.0.1:") for a in addresses)
        assert len(set(addresses)) == len(addresses)
        assert all(n.netns is None for n in spec.nodes)
        with pytest.raises(dc.ClusterError, match="namespace"):
            dc.kill_node(directory, "node-1", "link-down")
        dc.kill_node(directory, "node-1", "sigkill")
        assert not pid_alive(spec.nodes[0].pid)
        dc.revive_node(directory, "node-1")
        assert pid_alive(dc.load_spec(directory).nodes[0].pid)
    finally:
        dc.down(directory)
