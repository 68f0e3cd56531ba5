"""EtcdStore: the Store contract implemented over etcd's v3 gRPC API.

Each method is the Store guarantee it documents, written as etcd requests: reads are
linearizable Ranges, volume writes are Txns guarded by compares (etcd_ops builds them),
node and claim keys are bound to leases. How a call reaches etcd (channels, deadlines,
endpoint failover) is ``etcd_transport``'s; the watch stream is ``etcd_watch``'s.
Key layout: docs/state-schema.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from csi_driver._gen import etcd_pb2
from csi_driver.state.errors import (
    AlreadyExistsError,
    ConflictError,
    InvariantError,
    LeaseExpiredError,
    StoreError,
)
from csi_driver.state.etcd_ops import (
    compare_create,
    compare_mod,
    compare_value,
    decode,
    delete_op,
    endpoint_target,
    first_kv,
    get_op,
    prefix_end,
    put_op,
    stream_write,
    txn_op,
)
from csi_driver.state.etcd_transport import EtcdStatus, EtcdTransport, KeepAliveCall, Stubs
from csi_driver.state.etcd_watch import watch_stream
from csi_driver.state.lease import LeaseKeeper
from csi_driver.state.model import (
    NodeRecord,
    OwnerClaim,
    Versioned,
    VolumeRecord,
    transition_problem,
)
from csi_driver.state.progress import ProgressMixin
from csi_driver.state.store import WATCH_KINDS, Store, Watch

__all__ = ["EtcdStatus", "EtcdStore", "LeaseKeeper", "endpoint_target", "prefix_end"]

R = TypeVar("R")


def _conflict(
    volume_id: str, expected: int, current: Versioned[VolumeRecord] | None
) -> ConflictError:
    return ConflictError(f"volume {volume_id} changed (expected mod_revision {expected})", current)


class EtcdStore(ProgressMixin, Store):
    """Store over etcd v3. Keys: ``{prefix}{nodes,volumes,names,owners}/<id>``."""

    def __init__(
        self, endpoints: Sequence[str], prefix: str = "/tandem/", timeout_s: float = 5.0
    ) -> None:
        self._transport = EtcdTransport(endpoints, timeout_s)
        self._prefix = prefix if prefix.endswith("/") else prefix + "/"
        self._timeout_s = timeout_s

    @property
    def prefix(self) -> str:
        return self._prefix

    def key(self, kind: str, ident: str) -> bytes:
        """The etcd key of one record, e.g. key("volumes", "vol-1")."""
        return f"{self._prefix}{kind}/{ident}".encode()

    # -- requests ------------------------------------------------------------------------

    async def _rpc(self, what: str, call: Callable[[Stubs], Awaitable[R]]) -> R:
        return await self._transport.rpc(what, call)

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
        async def once(stubs: Stubs) -> etcd_pb2.LeaseKeepAliveResponse:
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

    def watch_prefix(self, kind: str, start_revision: int | None = None) -> Watch:
        if kind not in WATCH_KINDS:
            raise ValueError(f"unknown watch kind {kind!r}; expected one of {WATCH_KINDS}")
        start = f"{self._prefix}{kind}/".encode()
        return Watch(watch_stream(self._transport, start, start_revision, f"watch {kind}"))

    # -- misc ----------------------------------------------------------------------------

    async def status(self) -> EtcdStatus:
        """Maintenance.Status of the current endpoint (readiness and diagnostics)."""
        return await self._transport.status()

    def open_keepalive_stream(self) -> KeepAliveCall:
        """A LeaseKeepAlive stream on the current endpoint (no deadline; for LeaseKeeper)."""
        return self._transport.open_keepalive_stream()

    def fail_over(self) -> None:
        """Make the next endpoint current (a long-lived stream on this one broke)."""
        self._transport.fail_over()

    async def close(self) -> None:
        await self._transport.close()
