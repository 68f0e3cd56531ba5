"""EtcdTransport: how EtcdStore reaches etcd: channels, endpoint failover, deadlines.

Owns the ``grpc.aio`` channels (opened lazily, so a store can be built outside the event
loop, but one transport must only be used from one loop) and the rule for failing over:
a call that meets UNAVAILABLE is tried on the next endpoint; when all fail, or on
DEADLINE_EXCEEDED, it surfaces as StoreUnavailableError (``etcd_ops.map_error``). Also
the long-lived streams that cannot go through one retried call (lease keep-alive) and
Maintenance.Status. Must not: know keys, records or the Store contract.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc
import grpc.aio

from csi_driver._gen import etcd_pb2, etcd_pb2_grpc
from csi_driver.state.etcd_ops import CHANNEL_OPTIONS, endpoint_target, map_error

R = TypeVar("R")

KeepAliveCall = grpc.aio.StreamStreamCall[
    etcd_pb2.LeaseKeepAliveRequest, etcd_pb2.LeaseKeepAliveResponse
]


@dataclass(frozen=True)
class EtcdStatus:
    """Maintenance.Status of the member a store is talking to."""

    version: str
    db_size: int
    leader: int
    raft_index: int
    raft_term: int
    member_id: int
    revision: int


@dataclass(frozen=True)
class Stubs:
    """The etcd services on one endpoint's channel."""

    kv: etcd_pb2_grpc.KVAsyncStub
    watch: etcd_pb2_grpc.WatchAsyncStub
    lease: etcd_pb2_grpc.LeaseAsyncStub
    maintenance: etcd_pb2_grpc.MaintenanceAsyncStub


class EtcdTransport:
    """The endpoints of one etcd cluster, the one that last answered first."""

    def __init__(self, endpoints: Sequence[str], timeout_s: float) -> None:
        self._targets = [endpoint_target(e) for e in endpoints]
        if not self._targets:
            raise ValueError("at least one etcd endpoint is required")
        self.timeout_s = timeout_s
        self._channels: dict[int, tuple[grpc.aio.Channel, Stubs]] = {}
        self._current = 0  # index of the endpoint that last answered

    def _stubs(self, index: int) -> Stubs:
        if index not in self._channels:
            channel = grpc.aio.insecure_channel(self._targets[index], options=CHANNEL_OPTIONS)
            stubs = Stubs(
                kv=etcd_pb2_grpc.KVStub(channel),
                watch=etcd_pb2_grpc.WatchStub(channel),
                lease=etcd_pb2_grpc.LeaseStub(channel),
                maintenance=etcd_pb2_grpc.MaintenanceStub(channel),
            )
            self._channels[index] = (channel, stubs)
        return self._channels[index][1]

    async def rpc(self, what: str, call: Callable[[Stubs], Awaitable[R]]) -> R:
        """Run ``call`` against the current endpoint, failing over on UNAVAILABLE.

        A write that hit UNAVAILABLE mid-flight may have been applied before it is
        retried elsewhere. Volume writes are CAS, so such a retry reports a conflict
        or already-exists carrying the applied state; node puts are idempotent; a
        retried lease grant can leave an unused lease behind, which simply expires.
        """
        last: grpc.aio.AioRpcError | None = None
        count = len(self._targets)
        for attempt in range(count):
            index = (self._current + attempt) % count
            try:
                result = await call(self._stubs(index))
            except grpc.aio.AioRpcError as exc:
                if exc.code() is not grpc.StatusCode.UNAVAILABLE:
                    raise map_error(exc, what) from exc
                last = exc
                continue
            self._current = index
            return result
        assert last is not None
        raise map_error(last, f"{what} (all {count} endpoints)") from last

    async def status(self) -> EtcdStatus:
        """Maintenance.Status of the current endpoint (readiness and diagnostics)."""
        resp = await self.rpc(
            "status",
            lambda s: s.maintenance.Status(etcd_pb2.StatusRequest(), timeout=self.timeout_s),
        )
        return EtcdStatus(
            version=resp.version, db_size=resp.dbSize, leader=resp.leader,
            raft_index=resp.raftIndex, raft_term=resp.raftTerm,
            member_id=resp.header.member_id, revision=resp.header.revision,
        )

    def open_keepalive_stream(self) -> KeepAliveCall:
        """A LeaseKeepAlive stream on the current endpoint (no deadline; for LeaseKeeper)."""
        return self._stubs(self._current).lease.LeaseKeepAlive(None)

    def fail_over(self) -> None:
        """Make the next endpoint current (a long-lived stream on this one broke)."""
        self._current = (self._current + 1) % len(self._targets)

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel, _ in channels.values():
            await channel.close(None)
