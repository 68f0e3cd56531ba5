"""The node plugin's readiness: is this node fit to take volumes (issue 12 #4)?

Ready means: its node lease in etcd was renewed within the lease TTL (so etcd is reachable
and the node counts as alive to the controller and to takeovers), and its pool answered
its last capacity check. ``readiness`` is the pure rule; ``HealthServer`` answers
``GET /readyz`` (200 "ready", or 503 and why) for the kubelet's readinessProbe.

Liveness is not here: the CSI livenessprobe sidecar asks CSI Probe, which stays true while
the process serves: an etcd outage must make the node not ready, never restart it (a
restart would only take its staged volumes' targets down with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

_MAX_REQUEST = 4096


def readiness(now: float, last_renewed: float | None, ttl_s: float,
              pool_error: str | None) -> str | None:
    """None when ready, otherwise why not (monotonic times)."""
    if last_renewed is None:
        return "not registered in etcd yet"
    if now - last_renewed >= ttl_s:
        return f"node lease not renewed for {now - last_renewed:.1f} s (etcd unreachable?)"
    if pool_error is not None:
        return f"pool unusable: {pool_error}"
    return None


class HealthServer:
    """A minimal HTTP/1.1 endpoint: GET /readyz -> 200 or 503; anything else 404."""

    def __init__(self, check: Callable[[], str | None]) -> None:
        self._check = check
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port, reuse_address=True)

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            writer.close()
            return
        parts = head[:_MAX_REQUEST].split(b" ", 2)
        if len(parts) == 3 and parts[0] == b"GET" and parts[1] == b"/readyz":
            reason = self._check()
            status, body = ("200 OK", "ready") if reason is None else (
                "503 Service Unavailable", reason)
        else:
            status, body = "404 Not Found", "only GET /readyz"
        data = body.encode() + b"\n"
        writer.write(f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: "
                     f"{len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()
