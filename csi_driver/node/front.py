"""The CSI node plugin kubelet talks to: a stateless front for the node's data plane.

In Kubernetes the node's data plane (``tandem node``: replica server, agent, the volumes'
target processes and their block devices) runs in a DaemonSet of its own that is upgraded
only by drain, because its processes carry every staged volume's I/O and die with their
container. What kubelet needs on its plugin socket is the CSI Node service, and what a
rollout restarts is this front: ``tandem node-front`` answers Identity itself (kubelet's
registrar and liveness probe must not depend on the data plane) and forwards every Node call,
unparsed, to the data plane's own CSI socket on the host, with the caller's deadline; the
answer, status code and message come back unchanged. It keeps no state, so it can restart at
any time: a call that arrives while it is down is retried by kubelet, and one that arrives
while the data plane is down is answered UNAVAILABLE (kubelet retries that too).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from csi_driver._gen import csi_pb2, csi_pb2_grpc
from csi_driver.identity import IdentityServicer

log = logging.getLogger(__name__)

NODE_SERVICE = "csi.v1.Node"
# Never wait longer than this for the data plane when the caller set no deadline.
DEFAULT_TIMEOUT_S = 120.0

Forward = Callable[[bytes, grpc.aio.ServicerContext[bytes, bytes]], Awaitable[bytes]]


def node_methods() -> list[str]:
    """The Node service's method names, from the generated descriptor (all unary)."""
    service = csi_pb2.DESCRIPTOR.services_by_name["Node"]
    return [m.name for m in service.methods]


class NodeFront:
    """Forwards the Node service to ``backend`` (a ``unix://`` target)."""

    def __init__(self, backend: str) -> None:
        self._backend = backend
        self._channel = grpc.aio.insecure_channel(backend)

    def handler(self) -> grpc.GenericRpcHandler[bytes, bytes]:
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(self._forwarder(name))
            for name in node_methods()
        }
        return grpc.method_handlers_generic_handler(NODE_SERVICE, handlers)

    def _forwarder(self, name: str) -> Forward:
        # No (de)serializers: the bytes pass through unparsed, whatever the CSI version.
        call = self._channel.unary_unary(f"/{NODE_SERVICE}/{name}", None, None)

        async def forward(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
                          ) -> bytes:
            remaining = context.time_remaining()
            timeout = DEFAULT_TIMEOUT_S if remaining is None else max(remaining, 0.0)
            try:
                reply: bytes = await call(request, timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code(), exc.details() or ""
                if code is grpc.StatusCode.UNAVAILABLE:
                    details = f"tandem data plane at {self._backend} unavailable: {details}"
                log.info("method=%s forwarded status=%s", name, code.name)
                await context.abort(code, details)
            return reply

        return forward

    async def close(self) -> None:
        await self._channel.close(None)


async def run(csi_socket: Path, backend: str) -> None:
    """Serve until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(csi_socket, backend, stop)


async def serve(csi_socket: Path, backend: str, stop: asyncio.Event) -> None:
    """Serve the front on ``csi_socket`` until ``stop`` is set."""
    front = NodeFront(backend)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((front.handler(),))
    csi_pb2_grpc.add_IdentityServicer_to_server(IdentityServicer(False, lambda: True), server)
    csi_socket.parent.mkdir(parents=True, exist_ok=True)
    csi_socket.unlink(missing_ok=True)
    server.add_insecure_port(f"unix://{csi_socket}")
    await server.start()
    os.chmod(csi_socket, 0o600)
    log.info("node front serving csi=%s backend=%s", csi_socket, backend)
    try:
        await stop.wait()
    finally:
        await server.stop(grace=5)
        await front.close()
