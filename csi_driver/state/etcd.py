"""EtcdStore: the Store contract implemented over etcd's v3 gRPC API.

Talks to etcd with ``grpc.aio`` through the stubs generated from proto/etcd.proto.
Every unary call carries a deadline; UNAVAILABLE fails over to the next endpoint
and, when all fail, surfaces as StoreUnavailableError (as does DEADLINE_EXCEEDED).
Channels are opened lazily so a store can be built outside the event loop, but
one store must only be used from one loop. Key layout: docs/state-schema.md.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc
import grpc.aio

from csi_driver._gen import etcd_pb2, etcd_pb2_grpc
from csi_driver.state.errors import (
    AlreadyExistsError,
    CompactedError,
    ConflictError,
    InvariantError,
    LeaseExpiredError,
    StoreError,
    StoreUnavailableError,
)
from csi_driver.state.etcd_ops import (
    CHANNEL_OPTIONS,
    compare_create,
    compare_mod,
    compare_value,
    decode,
    delete_op,
    endpoint_target,
    first_kv,
    get_op,
    map_error,
    prefix_end,
    put_op,
    stream_write,
    txn_op,
)
from csi_driver.state.lease import LeaseKeeper
from csi_driver.state.model import (
    NodeRecord,
    OwnerClaim,
    Versioned,
    VolumeRecord,
    transition_problem,
)
from csi_driver.state.progress import ProgressMixin
from csi_driver.state.store import WATCH_KINDS, Store, WatchEvent, WatchEventType

__all__ = ["EtcdStatus", "EtcdStore", "LeaseKeeper", "endpoint_target", "prefix_end"]

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
class _Stubs:
    kv: etcd_pb2_grpc.KVAsyncStub
    watch: etcd_pb2_grpc.WatchAsyncStub
    lease: etcd_pb2_grpc.LeaseAsyncStub
    maintenance: etcd_pb2_grpc.MaintenanceAsyncStub


def _conflict(
    volume_id: str, expected: int, current: Versioned[VolumeRecord] | None
) -> ConflictError:
    return ConflictError(f"volume {volume_id} changed (expected mod_revision {expected})", current)


class EtcdStore(ProgressMixin, Store):
    """Store over etcd v3. Keys: ``{prefix}{nodes,volumes,names,owners}/<id>``."""

    def __init__(
        self, endpoints: Sequence[str], prefix: str = "/tandem/", timeout_s: float = 5.0
    ) -> None:
        self._targets = [endpoint_target(e) for e in endpoints]
        if not self._targets:
            raise ValueError("at least one etcd endpoint is required")
        self._prefix = prefix if prefix.endswith("/") else prefix + "/"
        self._timeout_s = timeout_s
        self._channels: dict[int, tuple[grpc.aio.Channel, _Stubs]] = {}
        self._current = 0  # index of the endpoint that last answered

    @property
    def prefix(self) -> str:
        return self._prefix

    def key(self, kind: str, ident: str) -> bytes:
        """The etcd key of one record, e.g. key("volumes", "vol-1")."""
        return f"{self._prefix}{kind}/{ident}".encode()

    # -- transport -----------------------------------------------------------------------

    def _stubs(self, index: int) -> _Stubs:
        if index not in self._channels:
            channel = grpc.aio.insecure_channel(self._targets[index], options=CHANNEL_OPTIONS)
            stubs = _Stubs(
                kv=etcd_pb2_grpc.KVStub(channel),
                watch=etcd_pb2_grpc.WatchStub(channel),
                lease=etcd_pb2_grpc.LeaseStub(channel),
                maintenance=etcd_pb2_grpc.MaintenanceStub(channel),
            )
            self._channels[index] = (channel, stubs)
        return self._channels[index][1]

    async def _rpc(self, what: str, call: Callable[[_Stubs], Awaitable[R]]) -> R:
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

    async def _range(self, req: etcd_pb2.RangeRequest, what: str) -> etcd_pb2.RangeResponse:
        return await self._rpc(what, lambda s: s.kv.Range(req, timeout=self._timeout_s))

    async def _txn(self, req: etcd_pb2.TxnRequest, what: str) -> etcd_pb2.TxnResponse:
        return await self._rpc(what, lambda s: s.kv.Txn(req, timeout=self._timeout_s))

    async def _get_kv(self, key: bytes, what: str) -> etcd_pb2.KeyValue | None:
        resp = await self._range(etcd_pb2.RangeRequest(key=key), what)
        return resp.kvs[0] if resp.kvs else None

    async def _list_kvs(self, kind: str) -> Sequence[etcd_pb2.KeyValue]:
        start = f"{self._prefix}{kind}/".encode()
        req = etcd_pb2.RangeRequest(key=start, range_end=prefix_end(start))
        return (await self._range(req, f"list {kind}")).kvs

    # -- nodes ---------------------------------------------------------------------------

    async def put_node(self, rec: NodeRecord, lease_id: int) -> Versioned[NodeRecord]:
        req = etcd_pb2.PutRequest(
            key=self.key("nodes", rec.node_id), value=rec.to_json(), lease=lease_id, prev_kv=True
        )
        resp = await self._rpc(
            f"put node {rec.node_id}", lambda s: s.kv.Put(req, timeout=self._timeout_s)
        )
        rev = resp.header.revision
        created = resp.prev_kv.create_revision if resp.HasField("prev_kv") else rev
        return Versioned(rec, rev, created, lease_id)

    async def get_node(self, node_id: str) -> Versioned[NodeRecord] | None:
        kv = await self._get_kv(self.key("nodes", node_id), f"get node {node_id}")
        return decode(NodeRecord, kv) if kv is not None else None

    async def list_nodes(self) -> list[Versioned[NodeRecord]]:
        return [decode(NodeRecord, kv) for kv in await self._list_kvs("nodes")]

    # -- volumes -------------------------------------------------------------------------

    async def create_volume(self, rec: VolumeRecord) -> Versioned[VolumeRecord]:
        vkey, nkey = self.key("volumes", rec.volume_id), self.key("names", rec.name)
        problem = rec.invariant_problem()
        if problem is not None:
            raise InvariantError(f"volume {rec.volume_id}: refused: {problem}")
        req = etcd_pb2.TxnRequest(
            compare=[compare_create(vkey, 0),
                     compare_create(nkey, 0)],
            success=[put_op(vkey, rec.to_json()), put_op(nkey, rec.volume_id.encode())],
            failure=[get_op(vkey), get_op(nkey)],
        )
        resp = await self._txn(req, f"create volume {rec.volume_id}")
        if resp.succeeded:
            rev = resp.header.revision
            return Versioned(rec, rev, rev, 0)
        by_id = first_kv(resp.responses[0])
        if by_id is not None:
            raise AlreadyExistsError(f"volume {rec.volume_id} exists", decode(VolumeRecord, by_id))
        by_name = first_kv(resp.responses[1])
        holder = by_name.value.decode() if by_name is not None else ""
        existing = await self.get_volume(holder) if holder else None
        raise AlreadyExistsError(f"name {rec.name!r} is taken by volume {holder!r}", existing)

    async def get_volume(self, volume_id: str) -> Versioned[VolumeRecord] | None:
        kv = await self._get_kv(self.key("volumes", volume_id), f"get volume {volume_id}")
        return decode(VolumeRecord, kv) if kv is not None else None

    async def list_volumes(self) -> list[Versioned[VolumeRecord]]:
        # etcd returns keys in byte order, which for UTF-8 ids is id order.
        return [decode(VolumeRecord, kv) for kv in await self._list_kvs("volumes")]

    async def update_volume(
        self, rec: VolumeRecord, expected_mod_revision: int
    ) -> Versioned[VolumeRecord]:
        return await self._cas_volume(rec, expected_mod_revision, [], [])

    async def _cas_volume(
        self, rec: VolumeRecord, expected_mod_revision: int,
        compares: list[etcd_pb2.Compare], puts: list[etcd_pb2.RequestOp],
    ) -> Versioned[VolumeRecord]:
        """CAS ``rec`` (plus ``compares``/``puts`` in the same txn) after the invariants.

        The current record is read first so the transition (epoch monotonic, I1b) can be
        checked against exactly the value the CAS will replace: one more round trip on a
        path that runs only when ownership or membership changes.
        """
        current = await self.get_volume(rec.volume_id)
        if current is None or current.mod_revision != expected_mod_revision:
            raise _conflict(rec.volume_id, expected_mod_revision, current)
        if current.value.name != rec.name:
            raise ValueError(f"volume {rec.volume_id}: the name is immutable")
        problem = transition_problem(current.value, rec)
        if problem is not None:
            raise InvariantError(f"volume {rec.volume_id}: refused: {problem}")
        vkey, nkey = self.key("volumes", rec.volume_id), self.key("names", rec.name)
        req = etcd_pb2.TxnRequest(
            # The name-index compare makes "name is immutable" part of the CAS.
            compare=[compare_mod(vkey, expected_mod_revision),
                     compare_value(nkey, rec.volume_id.encode()), *compares],
            success=[put_op(vkey, rec.to_json(), prev_kv=True), *puts],
            failure=[get_op(vkey)],
        )
        resp = await self._txn(req, f"update volume {rec.volume_id}")
        if resp.succeeded:
            prev = resp.responses[0].response_put.prev_kv
            return Versioned(rec, resp.header.revision, prev.create_revision, 0)
        kv = first_kv(resp.responses[0])
        now = decode(VolumeRecord, kv) if kv is not None else None
        if now is not None and now.mod_revision == expected_mod_revision and not compares:
            if now.value.name != rec.name:
                raise ValueError(f"volume {rec.volume_id}: the name is immutable")
            raise StoreError(f"name index {nkey!r} does not point at volume {rec.volume_id}")
        raise _conflict(rec.volume_id, expected_mod_revision, now)

    async def delete_volume(self, volume_id: str, expected_mod_revision: int) -> None:
        current = await self.get_volume(volume_id)
        if current is None or current.mod_revision != expected_mod_revision:
            raise _conflict(volume_id, expected_mod_revision, current)
        vkey, nkey = self.key("volumes", volume_id), self.key("names", current.value.name)
        # The name entry is removed only if it still points here, so a broken index
        # can never block deleting the volume itself.
        drop_name = etcd_pb2.TxnRequest(
            compare=[compare_value(nkey, volume_id.encode())], success=[delete_op(nkey)]
        )
        req = etcd_pb2.TxnRequest(
            compare=[compare_mod(vkey, expected_mod_revision)],
            success=[delete_op(vkey), txn_op(drop_name)],
            failure=[get_op(vkey)],
        )
        resp = await self._txn(req, f"delete volume {volume_id}")
        if not resp.succeeded:
            kv = first_kv(resp.responses[0])
            current = decode(VolumeRecord, kv) if kv is not None else None
            raise _conflict(volume_id, expected_mod_revision, current)

    async def volume_id_for_name(self, name: str) -> str | None:
        kv = await self._get_kv(self.key("names", name), f"lookup name {name!r}")
        return kv.value.decode() if kv is not None else None

    # -- ownership claims ----------------------------------------------------------------

    async def take_ownership(
        self, rec: VolumeRecord, expected_mod_revision: int, claim: OwnerClaim,
        lease_id: int, replaces: OwnerClaim | None = None,
    ) -> Versioned[VolumeRecord]:
        key = self.key("owners", rec.volume_id)
        guard = (compare_create(key, 0) if replaces is None
                 else compare_value(key, replaces.to_json()))
        return await self._cas_volume(rec, expected_mod_revision, [guard],
                                      [put_op(key, claim.to_json(), lease=lease_id)])

    async def get_owner(self, volume_id: str) -> OwnerClaim | None:
        kv = await self._get_kv(self.key("owners", volume_id), f"get owner {volume_id}")
        return OwnerClaim.from_json(kv.value) if kv is not None else None

    async def release_owner(self, volume_id: str, claim: OwnerClaim) -> None:
        key = self.key("owners", volume_id)
        req = etcd_pb2.TxnRequest(
            compare=[compare_value(key, claim.to_json())], success=[delete_op(key)]
        )
        await self._txn(req, f"release {volume_id}")

    # -- leases --------------------------------------------------------------------------

    async def grant_lease(self, ttl_s: int) -> int:
        req = etcd_pb2.LeaseGrantRequest(TTL=ttl_s)
        resp = await self._rpc(
            "grant lease", lambda s: s.lease.LeaseGrant(req, timeout=self._timeout_s)
        )
        if resp.error:
            raise StoreError(f"grant lease: {resp.error}")
        return resp.ID

    async def keep_alive_once(self, lease_id: int) -> int:
        async def once(stubs: _Stubs) -> etcd_pb2.LeaseKeepAliveResponse:
            call = stubs.lease.LeaseKeepAlive(None, timeout=self._timeout_s)
            try:
                await stream_write(call, etcd_pb2.LeaseKeepAliveRequest(ID=lease_id))
                resp = await call.read()
            finally:
                call.cancel()
            if not isinstance(resp, etcd_pb2.LeaseKeepAliveResponse):
                raise StoreError(f"keep-alive {lease_id:x}: stream closed without an answer")
            return resp

        resp = await self._rpc(f"keep-alive {lease_id:x}", once)
        if resp.TTL <= 0:
            raise LeaseExpiredError(f"lease {lease_id:x} has expired or was revoked")
        return resp.TTL

    async def revoke_lease(self, lease_id: int) -> None:
        req = etcd_pb2.LeaseRevokeRequest(ID=lease_id)
        with contextlib.suppress(LeaseExpiredError):  # already gone: revoke is idempotent
            await self._rpc(
                f"revoke lease {lease_id:x}",
                lambda s: s.lease.LeaseRevoke(req, timeout=self._timeout_s),
            )

    # -- change feed ---------------------------------------------------------------------

    async def current_revision(self) -> int:
        req = etcd_pb2.RangeRequest(key=self._prefix.encode(), count_only=True)
        return (await self._range(req, "current revision")).header.revision

    async def _open_watch(
        self, stubs: _Stubs, create: etcd_pb2.WatchCreateRequest
    ) -> grpc.aio.StreamStreamCall[etcd_pb2.WatchRequest, etcd_pb2.WatchResponse]:
        call = stubs.watch.Watch(None)  # long-lived: only the handshake has a deadline
        try:
            await stream_write(call, etcd_pb2.WatchRequest(create_request=create))
            resp = await asyncio.wait_for(call.read(), self._timeout_s)
        except TimeoutError as exc:
            call.cancel()
            raise StoreUnavailableError("watch: no answer to the create request") from exc
        except BaseException:
            call.cancel()
            raise
        if not isinstance(resp, etcd_pb2.WatchResponse) or not resp.created or resp.canceled:
            call.cancel()
            reason = resp.cancel_reason if isinstance(resp, etcd_pb2.WatchResponse) else "EOF"
            raise StoreError(f"watch was not created: {reason}")
        return call

    async def watch_prefix(
        self, kind: str, start_revision: int | None = None
    ) -> AsyncIterator[WatchEvent]:
        if kind not in WATCH_KINDS:
            raise ValueError(f"unknown watch kind {kind!r}; expected one of {WATCH_KINDS}")
        start = f"{self._prefix}{kind}/".encode()
        create = etcd_pb2.WatchCreateRequest(
            key=start, range_end=prefix_end(start), start_revision=start_revision or 0
        )
        call = await self._rpc(f"watch {kind}", lambda s: self._open_watch(s, create))
        try:
            while True:
                try:
                    resp = await call.read()
                except grpc.aio.AioRpcError as exc:
                    raise map_error(exc, f"watch {kind}") from exc
                if not isinstance(resp, etcd_pb2.WatchResponse):
                    raise StoreUnavailableError(f"watch {kind}: stream closed by etcd")
                if resp.compact_revision:
                    raise CompactedError(
                        f"watch {kind}: revision {start_revision} is compacted",
                        resp.compact_revision,
                    )
                if resp.canceled:
                    raise StoreError(f"watch {kind} canceled by etcd: {resp.cancel_reason}")
                for ev in resp.events:
                    is_put = ev.type == etcd_pb2.Event.PUT
                    yield WatchEvent(
                        type=WatchEventType.PUT if is_put else WatchEventType.DELETE,
                        key=ev.kv.key[len(start):].decode(),
                        value=ev.kv.value if is_put else None,
                        mod_revision=ev.kv.mod_revision,
                    )
        finally:
            call.cancel()

    # -- misc ----------------------------------------------------------------------------

    async def status(self) -> EtcdStatus:
        """Maintenance.Status of the current endpoint (readiness and diagnostics)."""
        resp = await self._rpc(
            "status",
            lambda s: s.maintenance.Status(etcd_pb2.StatusRequest(), timeout=self._timeout_s),
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
