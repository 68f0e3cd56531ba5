"""Local multi-node dev cluster: etcd, controller and N node processes on one machine.

The public API the ``tandem cluster`` CLI and the integration tests use. Each node runs
in its own network namespace behind a bridge (when root), so killing, cutting the link
of, or partitioning one node behaves like losing a real machine. See docs/dev-cluster.md.
This package owns no CSI or replication logic; it only starts and breaks the real
processes.
"""

from csi_driver.devcluster.cluster import (
    ClusterStatus,
    NodeStatus,
    ProcessStatus,
    down,
    status,
    up,
)
from csi_driver.devcluster.faults import KillMode, heal_node, kill_node, partition_node, revive_node
from csi_driver.devcluster.spec import (
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
    "down",
    "heal_node",
    "kill_node",
    "load_spec",
    "partition_node",
    "revive_node",
    "status",
    "up",
]
