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

from collections.abc import Callable
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
    # Replies waiting in this process's transports for peers to read them, all connections
    # together; beyond it a connection with more than ``reply_floor_bytes`` waiting runs no
    # more requests until the total drops (a peer that reads keeps its floor: no starving).
    reply_budget_bytes: int = 256 << 20
    reply_floor_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if self.handshake_timeout_s <= 0 or min(
            self.max_unauthenticated_per_host, self.max_unauthenticated, self.max_connections,
            self.reply_budget_bytes, self.reply_floor_bytes,
        ) < 1:
            raise ValueError("connection limits must be positive")


class ReplyBudget:
    """The bytes of replies queued in a process's transports, as each connection last saw
    its own (sampled when it sends, when its transport drains, and every housekeeping
    tick, so a stale sample delays a waiter by a second at most, never forever).

    Pure bookkeeping: the server's connections report, ask and wait; wake-ups are handed to
    ``schedule`` so none runs inside another connection's send.
    """

    def __init__(self, limit: int, floor: int, schedule: Callable[[Callable[[], None]], object]
                 ) -> None:
        self.limit, self.floor = limit, floor
        self.queued = 0
        self._schedule = schedule
        self._waiting: list[Callable[[], None]] = []

    def update(self, old: int, new: int) -> None:
        """A connection's queued bytes went from ``old`` to ``new``."""
        self.queued += new - old
        if new < old and self._waiting and self.queued < self.limit:
            waiting, self._waiting = self._waiting, []
            for wake in waiting:
                self._schedule(wake)

    def allows(self, own_queued: int) -> bool:
        return own_queued <= self.floor or self.queued < self.limit

    def wait(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` (scheduled) once the total drops below the limit."""
        if wake not in self._waiting:
            self._waiting.append(wake)
