"""Local multi-node dev cluster: etcd, controller and N node processes on one machine.

The public API the ``tandem cluster`` CLI and the integration tests use. Each node runs
in its own network namespace behind a bridge (when root), so killing, cutting the link
of, or partitioning one node behaves like losing a real machine. See docs/dev-cluster.md.
This package owns no CSI or replication logic; it only starts and breaks the real
processes.
"""

from devtools.devcluster.cluster import (
    ClusterStatus,
    NodeStatus,
    ProcessStatus,
    cluster_secret_path,
    down,
    status,
    up,
)
from devtools.devcluster.faults import (
    KillMode,
    StoppedEtcd,
    heal_node,
    kill_node,
    partition_node,
    pause_node,
    restart_node_process,
    revive_node,
    start_etcd,
    stop_etcd,
)
from devtools.devcluster.spec import (
    ClusterError,
    ClusterSpec,
    ControllerSpec,
    NodeSpec,
    PoolSpec,
    load_spec,
)

__all__ = [
    "ClusterError",
    "ClusterSpec",
    "ClusterStatus",
    "ControllerSpec",
    "KillMode",
    "NodeSpec",
    "NodeStatus",
    "PoolSpec",
    "ProcessStatus",
    "StoppedEtcd",
    "cluster_secret_path",
    "down",
    "heal_node",
    "kill_node",
    "load_spec",
    "partition_node",
    "pause_node",
    "restart_node_process",
    "revive_node",
    "start_etcd",
    "status",
    "stop_etcd",
    "up",
]
