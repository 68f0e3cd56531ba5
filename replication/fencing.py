"""Opening a volume as its new owner: connect to every replica, fence it, decide the ISR.

Implements the takeover rules of I6: every reachable replica is fenced with the new epoch
before the first write; at least one member of the recorded ISR must be fenced (it is the
source of truth), otherwise the volume is not served; ISR members that could not be fenced
are removed from the ISR by CAS before serving. When the fenced ISR members were left
"dirty" (writes in flight when the previous owner died), the others are converged to the
read source in the background (I4).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from replication.authority import Authority, AuthorityUnavailableError, FencedError
from replication.errors import ReplicaUnavailableError
from replication.hold import DEFAULT_HOLD_S
from replication.messages import Status
from replication.payloads import StatInfo
from replication.replica_client import ReplicaClient
from replication.target import NoInSyncReplicaError, ReplicaEndpoint, ReplicatedBackend

log = logging.getLogger(__name__)

Connect = Callable[[ReplicaEndpoint], Awaitable[ReplicaClient]]


async def connect_and_fence(
    endpoint: ReplicaEndpoint, volume_id: str, epoch: int, connect: Connect
) -> ReplicaClient:
    client = await connect(endpoint)
    try:
        response = await client.fence(volume_id, epoch)
    except BaseException:
        client.close()
        raise
    if response.status is not Status.OK:
        client.close()
        raise ReplicaUnavailableError(
            f"fence at epoch {epoch} refused: {response.status.name} "
            f"(replica fenced at {response.epoch})"
        )
    return client


async def _is_dirty(client: ReplicaClient, volume_id: str, epoch: int) -> bool:
    response = await client.stat(volume_id, epoch)
    if response.status is not Status.OK:
        return True
    return StatInfo.decode(response.payload).dirty


async def open_volume(
    volume_id: str, epoch: int, size: int, endpoints: Sequence[ReplicaEndpoint],
    isr: Sequence[str], local_node: str | None, authority: Authority, state_dir: Path,
    connect: Connect, min_in_sync: int = 1, hold_s: float = DEFAULT_HOLD_S,
) -> ReplicatedBackend:
    results = await asyncio.gather(
        *(connect_and_fence(e, volume_id, epoch, connect) for e in endpoints),
        return_exceptions=True,
    )
    clients: dict[str, ReplicaClient] = {}
    for endpoint, result in zip(endpoints, results, strict=True):
        if isinstance(result, ReplicaClient):
            clients[endpoint.node_id] = result
        else:
            log.warning("volume=%s epoch=%d replica=%s not fenced: %s",
                        volume_id, epoch, endpoint.node_id, result)
    fenced_isr = [n for n in isr if n in clients]
    try:
        if not fenced_isr:
            raise NoInSyncReplicaError(
                f"volume {volume_id}: none of the in-sync replicas {list(isr)} could be "
                "fenced; refusing to serve possibly stale data"
            )
        unreachable = frozenset(isr) - set(fenced_isr)
        if unreachable:
            await authority.remove_from_isr(unreachable, "not reachable at takeover")
        dirty = await asyncio.gather(*(_is_dirty(clients[n], volume_id, epoch)
                                       for n in fenced_isr))
    except (NoInSyncReplicaError, FencedError, AuthorityUnavailableError, OSError,
            ReplicaUnavailableError):
        for client in clients.values():
            client.close()
        raise
    out_of_sync = [e.node_id for e in endpoints if e.node_id not in fenced_isr]
    backend = ReplicatedBackend(volume_id, epoch, size, clients, fenced_isr, local_node,
                                authority, state_dir, out_of_sync, min_in_sync, hold_s)
    if len(fenced_isr) > 1 and any(dirty):
        backend.converge()
    return backend
