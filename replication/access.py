"""Who may do what on a replica server, beyond holding the cluster secret.

Authentication (``peer_auth``) proves a peer is one of the cluster's nodes and binds its
node id to the connection. That is not enough: a node may only touch the volumes it is a
replica of, and a replica may only be fenced to an epoch the state store really issued
(otherwise one FENCE to 2^64-1 would make a volume unwritable forever). The replica server
asks a ``ReplicaAccess`` before the first operation on each volume of a connection, and
before every FENCE. The node implements it over etcd (``csi_driver``); this package only
states the contract, so it imports neither etcd nor csi_driver.

Also here: the limits that keep strangers cheap (``ConnectionLimits``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class ReplicaAccess(Protocol):
    async def check(self, volume_id: str, peer_node: str, fence_epoch: int | None) -> str | None:
        """None if ``peer_node`` may operate on ``volume_id`` (and, for a FENCE, if
        ``fence_epoch`` is the volume's current epoch); otherwise why not. Raising counts
        as a refusal (the state store may be unreachable: refuse, the peer retries)."""
        ...


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """Bounds on what connections may cost a replica server.

    A peer that has not finished the handshake costs a few KiB (the codec reads nothing
    bigger before it) and is cut off after ``handshake_timeout_s``; at most
    ``max_unauthenticated_per_host`` of them per source address and
    ``max_unauthenticated`` in all may be open. Authenticated connections (one per owner
    target and replica) are bounded by ``max_connections``.
    """

    handshake_timeout_s: float = 5.0
    max_unauthenticated_per_host: int = 16
    max_unauthenticated: int = 128
    max_connections: int = 4096

    def __post_init__(self) -> None:
        if self.handshake_timeout_s <= 0 or min(
            self.max_unauthenticated_per_host, self.max_unauthenticated, self.max_connections
        ) < 1:
            raise ValueError("connection limits must be positive")
