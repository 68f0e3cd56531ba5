"""The node's answer to ``replication.access.ReplicaAccess``: who may touch a volume's
replicas, and which epochs are real, read from the volume's record in etcd.

A replica server asks before the first operation of a connection on a volume and before
every FENCE. The rule is pure (``access_refusal``, table-tested); the class is its thin
etcd edge. Must not: cache an epoch (a FENCE must see the epoch etcd holds now).
"""

from __future__ import annotations

from csi_driver.state.model import VolumeRecord
from csi_driver.state.store import Store


def access_refusal(record: VolumeRecord | None, volume_id: str, peer_node: str,
                   fence_epoch: int | None) -> str | None:
    """None if ``peer_node`` may act on the volume's replicas (and raise their fence to
    ``fence_epoch``); otherwise why not."""
    if record is None:
        return f"volume {volume_id} has no record"
    if peer_node not in record.replica_nodes() and peer_node != record.owner:
        return f"node {peer_node} is neither a replica nor the owner of {volume_id}"
    if fence_epoch is not None and fence_epoch != record.epoch:
        return (f"epoch {fence_epoch} is not {volume_id}'s current epoch {record.epoch}: "
                "only an epoch etcd issued may fence")
    return None


class StoreReplicaAccess:
    """``ReplicaAccess`` over the state store (one linearizable read per check)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def check(self, volume_id: str, peer_node: str, fence_epoch: int | None) -> str | None:
        found = await self._store.get_volume(volume_id)
        return access_refusal(found.value if found else None, volume_id, peer_node, fence_epoch)
