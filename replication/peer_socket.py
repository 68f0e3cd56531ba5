"""The socket settings every replication connection uses, at both ends (the owner's
``replica_connection`` and the ``replica_server``), so that they cannot drift apart.

Must not: open, read or write sockets; import csi_driver, grpc or etcd.
"""

from __future__ import annotations

import socket
from typing import Any

HIGH_WATER = 8 << 20  # bytes queued in the transport before drain() waits / reading pauses


def configure_socket(sock: Any, *, user_timeout_ms: int = 3000) -> None:
    """The options of every replication socket: no Nagle delay, and a dead peer noticed in
    about 3 s (keepalive when idle, TCP_USER_TIMEOUT with unacknowledged data) rather than
    after 15 minutes of retransmits. ``sock`` may be a transport's pseudo-socket."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, user_timeout_ms)
