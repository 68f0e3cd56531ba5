"""The node plugin, one per node: the CSI Node service and its staging (ownership, target
processes, attach, mount), the agent API, membership and readiness, and the front kubelet
talks to in Kubernetes. The data it serves moves through ``replication``."""
