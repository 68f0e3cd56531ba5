"""Taking a volume over, in the order it happens (I2, I6): the one place that says it.

A stage on node N makes N the volume's owner, whether the volume was idle, released by a
graceful unstage elsewhere, or held by an owner that died or was cut off. Each step below is
done by the code named, in this order; none starts before the one above succeeded, and a
failure undoes what came before it:

1. **Claim** (N's node process, ``Ownership.acquire``): in one etcd transaction, bump the
   epoch by CAS on the volume record and create ``owners/<volume>`` bound to a fresh lease.
   Refused while another node's claim is live; that claim lapses with its target's lease when
   the old owner dies or is cut off, and its target stopped acknowledging before it could
   lapse (``ownership.decide_takeover``).
2. **Hand over** (``TargetProcesses.start``): a target process for the volume receives that
   lease and when it was granted.
3. **Keep the claim** (the target, ``EtcdAuthority``): it renews the lease and stops
   acknowledging before the lease can lapse (the clock starts at the grant's send).
4. **Fence** (the target, ``replication.fencing.open_volume``): every reachable replica
   refuses lower epochs from now on; at least one member of the recorded ISR must be fenced
   (the source of truth), or the volume is not served; ISR members that could not be fenced
   leave the ISR by CAS before anything is served.
5. **Converge** (the target, in the background): ISR members that may differ from the read
   source (writes in flight when the old owner died) are compared and copied (I4).
6. **Serve** (the target): the NBD export; READY tells the node, which attaches and mounts.

``become_owner`` is steps 3 to 5, called by the target process; steps 1 and 2 are the
node's ``staging.stage``. If 3 to 5 fail, the claim is given back at once, so a stage
elsewhere (or our own retry) is not refused as "still served" by a target that never served.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from csi_driver.node.isr_authority import EtcdAuthority
from csi_driver.node.ownership import OwnerLease
from csi_driver.state.etcd import EtcdStore
from csi_driver.state.model import VolumeRecord, min_in_sync_of
from replication.fencing import open_volume
from replication.replica_client import ReplicaClient
from replication.target import ReplicaEndpoint, ReplicatedBackend

# Giving the claim back after a failed open: bounded, the lease lapses anyway.
ABANDON_TIMEOUT_S = 3.0

Connect = Callable[[ReplicaEndpoint], Awaitable[ReplicaClient]]


class TakeoverRefusedError(Exception):
    """The volume cannot be served from here (the message says why)."""


@dataclass(frozen=True)
class Owned:
    record: VolumeRecord
    authority: EtcdAuthority
    backend: ReplicatedBackend


async def become_owner(
    store: EtcdStore, volume_id: str, node_id: str, lease: OwnerLease, state_dir: Path,
    connect: Connect, hold_s: float,
) -> Owned:
    """Steps 3 to 5 for the target process. Raises TakeoverRefusedError when the volume is
    not ours to serve, or what fencing raised (NoInSyncReplicaError, ...)."""
    found = await store.get_volume(volume_id)
    if found is None:
        raise TakeoverRefusedError(f"volume {volume_id} does not exist")
    record = found.value
    if record.owner != node_id:
        raise TakeoverRefusedError(f"volume {volume_id} is owned by {record.owner}, not us")
    authority = EtcdAuthority(store, volume_id, node_id, record.epoch, lease.lease_id,
                              lease.ttl_s, lease.granted_monotonic)
    authority.start()  # 3. keep the claim
    try:
        try:
            min_in_sync = min_in_sync_of(record)
        except ValueError as exc:
            raise TakeoverRefusedError(str(exc)) from exc
        backend = await open_volume(  # 4. fence, and 5. converge in the background
            volume_id, record.epoch, record.size_bytes, await replica_endpoints(store, record),
            record.isr, node_id, authority, state_dir, connect, min_in_sync=min_in_sync,
            hold_s=hold_s,
        )
    except BaseException:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(ABANDON_TIMEOUT_S):
                await authority.release()
        raise
    backend.expected_replicas = len(record.replicas)
    return Owned(record, authority, backend)


async def replica_endpoints(store: EtcdStore, record: VolumeRecord) -> list[ReplicaEndpoint]:
    """Where each of the volume's replicas is served now, from the live node records."""
    live = {v.value.node_id: v.value for v in await store.list_nodes()}
    endpoints = []
    for node_id in record.replica_nodes():
        node = live.get(node_id)
        if node is None:
            continue  # its lease expired: unreachable, dropped from the ISR at open
        host, _, port = node.replica_address.rpartition(":")
        endpoints.append(ReplicaEndpoint(node_id, host, int(port)))
    return endpoints
