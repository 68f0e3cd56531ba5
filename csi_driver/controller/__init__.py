"""The controller plugin: the CSI Controller service, volume domain logic, placement, the
reconciler and the node-down responder with its Kubernetes edge (one per cluster)."""
