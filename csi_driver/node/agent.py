"""The node agent API (proto/agent.proto): the node's pool, driven by the controller.

``AgentServicer`` runs in the node process and is the only way the control plane changes a
node's pool; pool calls block (files, LVM commands), so they run in a worker thread.
``AgentClients`` is the controller's side: one cached channel per node address, a deadline on
every call, and gRPC errors turned back into domain errors.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc
from google.protobuf.message import Message

from csi_driver import errors
from csi_driver._gen import agent_pb2, agent_pb2_grpc
from csi_driver.agent_auth import METADATA_KEY, AgentSigner
from csi_driver.replica_decisions import may_delete
from csi_driver.rpc import Ctx, rpc_method
from csi_driver.state.store import Store
from replication.pool.base import Pool, ReplicaInfo

log = logging.getLogger(__name__)


def _info(info: ReplicaInfo) -> agent_pb2.ReplicaInfo:
    return agent_pb2.ReplicaInfo(
        volume_id=info.volume_id,
        size_bytes=info.size_bytes,
        path=info.path,
        allocated_bytes=info.allocated_bytes,
    )


class AgentServicer(agent_pb2_grpc.AgentServicer):
    """Executes replica lifecycle requests against the local pool."""

    def __init__(
        self, node_id: str, pool: Pool, on_change: Callable[[], None],
        before_delete: Callable[[str], None], store: Store | None = None,
    ) -> None:
        """``store``: where DeleteReplica checks that the record no longer needs it."""
        self._store = store
        self._node_id = node_id
        self._pool = pool
        self._on_change = on_change  # republish capacity in etcd
        self._before_delete = before_delete  # the replica server drops its open file

    @rpc_method
    async def CreateReplica(
        self, request: agent_pb2.CreateReplicaRequest, context: Ctx
    ) -> agent_pb2.ReplicaInfo:
        info = await asyncio.to_thread(self._pool.create, request.volume_id, request.size_bytes)
        self._on_change()
        return _info(info)

    @rpc_method
    async def DeleteReplica(
        self, request: agent_pb2.DeleteReplicaRequest, context: Ctx
    ) -> agent_pb2.DeleteReplicaResponse:
        await self._check_deletable(request.volume_id)
        self._before_delete(request.volume_id)
        await asyncio.to_thread(self._pool.delete, request.volume_id)
        self._on_change()
        return agent_pb2.DeleteReplicaResponse()

    async def _check_deletable(self, volume_id: str) -> None:
        """Refuse to delete a replica the volume record still needs (I1b): only a volume
        being deleted, or one that no longer names this node while another in-sync replica
        is alive, may lose it here."""
        if self._store is None:
            return
        found = await self._store.get_volume(volume_id)
        live = {v.value.node_id for v in await self._store.list_nodes()}
        if not may_delete(found.value if found else None, self._node_id, live):
            raise errors.FailedPreconditionError(
                f"replica of {volume_id} on {self._node_id} is still needed by its volume "
                "record (delete the volume instead)")

    @rpc_method
    async def ResizeReplica(
        self, request: agent_pb2.ResizeReplicaRequest, context: Ctx
    ) -> agent_pb2.ReplicaInfo:
        info = await asyncio.to_thread(self._pool.resize, request.volume_id, request.size_bytes)
        self._on_change()
        return _info(info)

    @rpc_method
    async def DescribeReplica(
        self, request: agent_pb2.DescribeReplicaRequest, context: Ctx
    ) -> agent_pb2.ReplicaInfo:
        info = await asyncio.to_thread(self._pool.get, request.volume_id)
        if info is None:
            raise errors.NotFoundError(f"no replica of {request.volume_id} on {self._node_id}")
        return _info(info)

    @rpc_method
    async def ListReplicas(
        self, request: agent_pb2.ListReplicasRequest, context: Ctx
    ) -> agent_pb2.ListReplicasResponse:
        infos = await asyncio.to_thread(self._pool.list)
        return agent_pb2.ListReplicasResponse(replicas=[_info(i) for i in infos])

    @rpc_method
    async def PoolStatus(
        self, request: agent_pb2.PoolStatusRequest, context: Ctx
    ) -> agent_pb2.PoolStatusResponse:
        capacity = await asyncio.to_thread(self._pool.capacity)
        count = len(await asyncio.to_thread(self._pool.list))
        return agent_pb2.PoolStatusResponse(
            node_id=self._node_id,
            pool_kind=self._pool.kind,
            total_bytes=capacity.total_bytes,
            free_bytes=capacity.free_bytes,
            replica_count=count,
        )


# Fail fast instead of queueing behind a reconnect back-off to a node that came back.
_CHANNEL_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 200),
                    ("grpc.max_reconnect_backoff_ms", 2_000))

_CODE_TO_ERROR: dict[grpc.StatusCode, type[errors.TandemError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: errors.NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExistsError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhaustedError,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPreconditionError,
    grpc.StatusCode.ABORTED: errors.OperationPendingError,
}


class AgentClients:
    """The controller's connections to node agents, one channel per address."""

    def __init__(self, timeout_s: float, signer: AgentSigner) -> None:
        self._timeout_s = timeout_s
        self._signer = signer  # every call carries a token only the controller can make
        self._stubs: dict[str, agent_pb2_grpc.AgentStub] = {}
        self._channels: list[grpc.aio.Channel] = []

    def _stub(self, address: str) -> agent_pb2_grpc.AgentStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
            self._channels.append(channel)
            stub = self._stubs[address] = agent_pb2_grpc.AgentStub(channel)
        return stub

    async def _call(self, address: str, method: str, request: Message) -> object:
        rpc = getattr(self._stub(address), method)
        for attempt in range(2):
            try:
                token = self._signer.token(method, address, request)  # fresh per attempt
                return await rpc(request, timeout=self._timeout_s,
                                 metadata=((METADATA_KEY, token),))
            except grpc.aio.AioRpcError as exc:
                # Every agent call is idempotent: one retry covers a connection that died
                # with its node (link down) and is only noticed on first use after a revive.
                if exc.code() is grpc.StatusCode.UNAVAILABLE and attempt == 0:
                    await asyncio.sleep(0.2)
                    continue
                error_type = _CODE_TO_ERROR.get(exc.code(), errors.UnavailableError)
                raise error_type(f"agent {address} {method}: {exc.details()}") from exc
        raise AssertionError("unreachable")

    async def create_replica(self, address: str, volume_id: str, size: int) -> None:
        request = agent_pb2.CreateReplicaRequest(volume_id=volume_id, size_bytes=size)
        await self._call(address, "CreateReplica", request)

    async def delete_replica(self, address: str, volume_id: str) -> None:
        request = agent_pb2.DeleteReplicaRequest(volume_id=volume_id)
        await self._call(address, "DeleteReplica", request)

    async def resize_replica(self, address: str, volume_id: str, size: int) -> None:
        request = agent_pb2.ResizeReplicaRequest(volume_id=volume_id, size_bytes=size)
        await self._call(address, "ResizeReplica", request)

    async def list_replicas(self, address: str) -> list[agent_pb2.ReplicaInfo]:
        response = await self._call(address, "ListReplicas", agent_pb2.ListReplicasRequest())
        assert isinstance(response, agent_pb2.ListReplicasResponse)
        return list(response.replicas)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close(grace=None)
