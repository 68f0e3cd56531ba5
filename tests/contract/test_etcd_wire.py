"""Wire checks for proto/etcd.proto: every field we declared means to etcd what we think.

proto/etcd.proto is written by hand, so a wrong field number would not fail to
compile: etcd would silently ignore the field (or fill another). Each check
below uses a field in a way whose effect is only visible if the real server
decoded it under the intended number.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc.aio

from csi_driver._gen import etcd_pb2 as pb
from csi_driver._gen import etcd_pb2_grpc as pbg
from csi_driver.state.etcd_ops import prefix_end
from csi_driver.state.etcd_server import EtcdServer

Run = Callable[[Any], Any]
CMP = pb.Compare


def wire_test(server: EtcdServer, run: Run, prefix: str,
              body: Callable[..., Any]) -> None:
    async def main() -> None:
        async with grpc.aio.insecure_channel(server.endpoint.removeprefix("http://")) as ch:
            await body(pbg.KVStub(ch), pbg.WatchStub(ch), pbg.LeaseStub(ch),
                       pbg.MaintenanceStub(ch), prefix.encode())

    run(main())


def test_range_and_put_fields(etcd_server: EtcdServer, run: Run, prefix: str) -> None:
    async def body(kv: Any, _w: Any, lease_stub: Any, _m: Any, p: bytes) -> None:
        revs = []
        for i, val in enumerate([b"c", b"a", b"b"]):
            put = await kv.Put(pb.PutRequest(key=p + b"k%d" % i, value=val))
            revs.append(put.header.revision)
        rng = pb.RangeRequest(key=p, range_end=prefix_end(p))
        full = await kv.Range(rng)
        assert [x.value for x in full.kvs] == [b"c", b"a", b"b"] and full.count == 3
        kv0 = full.kvs[0]
        assert kv0.key == p + b"k0" and kv0.version == 1 and kv0.lease == 0
        assert kv0.create_revision == kv0.mod_revision == revs[0]

        limited = await kv.Range(pb.RangeRequest(key=p, range_end=prefix_end(p), limit=1))
        assert len(limited.kvs) == 1 and limited.more and limited.count == 3
        desc = await kv.Range(pb.RangeRequest(
            key=p, range_end=prefix_end(p), sort_order=pb.RangeRequest.DESCEND,
            sort_target=pb.RangeRequest.VALUE))
        assert [x.value for x in desc.kvs] == [b"c", b"b", b"a"]
        keys = await kv.Range(pb.RangeRequest(key=p, range_end=prefix_end(p), keys_only=True))
        assert [x.value for x in keys.kvs] == [b"", b"", b""] and keys.kvs[0].key == p + b"k0"
        count = await kv.Range(pb.RangeRequest(key=p, range_end=prefix_end(p), count_only=True))
        assert count.count == 3 and not count.kvs
        ser = await kv.Range(pb.RangeRequest(key=p + b"k1", serializable=True))
        assert ser.kvs[0].value == b"a"
        window = await kv.Range(pb.RangeRequest(
            key=p, range_end=prefix_end(p), min_mod_revision=revs[1], max_mod_revision=revs[1]))
        assert [x.key for x in window.kvs] == [p + b"k1"]
        created = await kv.Range(pb.RangeRequest(
            key=p, range_end=prefix_end(p), min_create_revision=revs[2],
            max_create_revision=revs[2]))
        assert [x.key for x in created.kvs] == [p + b"k2"]

        put = await kv.Put(pb.PutRequest(key=p + b"k0", value=b"c2", prev_kv=True))
        assert put.prev_kv.value == b"c" and put.prev_kv.mod_revision == revs[0]
        old = await kv.Range(pb.RangeRequest(key=p + b"k0", revision=revs[0]))
        assert old.kvs[0].value == b"c"

        lease = (await lease_stub.LeaseGrant(pb.LeaseGrantRequest(TTL=30))).ID
        await kv.Put(pb.PutRequest(key=p + b"k0", lease=lease, ignore_value=True))
        now = (await kv.Range(pb.RangeRequest(key=p + b"k0"))).kvs[0]
        assert now.value == b"c2" and now.lease == lease and now.version == 3
        await kv.Put(pb.PutRequest(key=p + b"k0", value=b"c3", ignore_lease=True))
        now = (await kv.Range(pb.RangeRequest(key=p + b"k0"))).kvs[0]
        assert now.value == b"c3" and now.lease == lease

        deleted = await kv.DeleteRange(pb.DeleteRangeRequest(
            key=p + b"k1", range_end=p + b"k3", prev_kv=True))
        assert deleted.deleted == 2 and [x.value for x in deleted.prev_kvs] == [b"a", b"b"]
        await lease_stub.LeaseRevoke(pb.LeaseRevokeRequest(ID=lease))

    wire_test(etcd_server, run, prefix, body)


def test_txn_compare_targets(etcd_server: EtcdServer, run: Run, prefix: str) -> None:
    async def body(kv: Any, _w: Any, lease_stub: Any, _m: Any, p: bytes) -> None:
        lease = (await lease_stub.LeaseGrant(pb.LeaseGrantRequest(TTL=30))).ID
        put = await kv.Put(pb.PutRequest(key=p + b"x", value=b"v", lease=lease))
        rev = put.header.revision

        async def holds(cmp: pb.Compare) -> bool:
            resp = await kv.Txn(pb.TxnRequest(
                compare=[cmp],
                success=[pb.RequestOp(request_range=pb.RangeRequest(key=p + b"x"))],
                failure=[pb.RequestOp(request_put=pb.PutRequest(key=p + b"f", value=b"1"))]))
            op = resp.responses[0]
            assert op.WhichOneof("response") == ("response_range" if resp.succeeded
                                                 else "response_put")
            return bool(resp.succeeded)

        k = p + b"x"
        assert await holds(pb.Compare(result=CMP.EQUAL, target=CMP.VERSION, key=k, version=1))
        assert not await holds(pb.Compare(result=CMP.EQUAL, target=CMP.VERSION, key=k, version=2))
        assert await holds(pb.Compare(result=CMP.EQUAL, target=CMP.CREATE, key=k,
                                      create_revision=rev))
        assert await holds(pb.Compare(result=CMP.EQUAL, target=CMP.MOD, key=k, mod_revision=rev))
        assert await holds(pb.Compare(result=CMP.LESS, target=CMP.MOD, key=k,
                                      mod_revision=rev + 1))
        assert await holds(pb.Compare(result=CMP.GREATER, target=CMP.MOD, key=k,
                                      mod_revision=rev - 1))
        assert await holds(pb.Compare(result=CMP.EQUAL, target=CMP.VALUE, key=k, value=b"v"))
        assert await holds(pb.Compare(result=CMP.NOT_EQUAL, target=CMP.VALUE, key=k,
                                      value=b"w"))
        assert await holds(pb.Compare(result=CMP.EQUAL, target=CMP.LEASE, key=k, lease=lease))
        # range_end: "every key in [a, z) has version < 5"; then one that fails.
        assert await holds(pb.Compare(result=CMP.LESS, target=CMP.VERSION, key=p,
                                      range_end=prefix_end(p), version=5))
        assert not await holds(pb.Compare(result=CMP.GREATER, target=CMP.VERSION, key=p,
                                          range_end=prefix_end(p), version=5))
        nested = await kv.Txn(pb.TxnRequest(success=[pb.RequestOp(request_txn=pb.TxnRequest(
            success=[pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=k))]))]))
        assert nested.responses[0].response_txn.responses[0].response_delete_range.deleted == 1
        await lease_stub.LeaseRevoke(pb.LeaseRevokeRequest(ID=lease))

    wire_test(etcd_server, run, prefix, body)


def test_watch_fields(etcd_server: EtcdServer, run: Run, prefix: str) -> None:
    async def body(kv: Any, watch: Any, _l: Any, _m: Any, p: bytes) -> None:
        call = watch.Watch(None)
        await call.write(pb.WatchRequest(create_request=pb.WatchCreateRequest(
            key=p, range_end=prefix_end(p), filters=[pb.WatchCreateRequest.NOPUT],
            prev_kv=True, watch_id=77, fragment=True, progress_notify=True)))
        created = await asyncio.wait_for(call.read(), 5)
        assert created.created and created.watch_id == 77 and not created.canceled
        await call.write(pb.WatchRequest(create_request=pb.WatchCreateRequest(
            key=p, watch_id=77)))
        dup = await asyncio.wait_for(call.read(), 5)
        assert dup.created and dup.canceled and "duplicate" in dup.cancel_reason
        await kv.Put(pb.PutRequest(key=p + b"a", value=b"1"))
        deleted = await kv.DeleteRange(pb.DeleteRangeRequest(key=p + b"a"))
        resp = await asyncio.wait_for(call.read(), 5)  # the PUT is filtered out
        assert resp.watch_id == 77 and len(resp.events) == 1 and not resp.fragment
        ev = resp.events[0]
        assert ev.type == pb.Event.DELETE and ev.kv.key == p + b"a"
        assert ev.kv.mod_revision == deleted.header.revision and ev.prev_kv.value == b"1"

        await call.write(pb.WatchRequest(progress_request=pb.WatchProgressRequest()))
        progress = await asyncio.wait_for(call.read(), 5)
        assert not progress.events and progress.header.revision >= deleted.header.revision
        await call.write(pb.WatchRequest(cancel_request=pb.WatchCancelRequest(watch_id=77)))
        cancel = await asyncio.wait_for(call.read(), 5)
        assert cancel.canceled and cancel.watch_id == 77
        call.cancel()

        # History from a revision on is replayed; from before a compaction it is not.
        rev = (await kv.Put(pb.PutRequest(key=p + b"b", value=b"2"))).header.revision
        await kv.Put(pb.PutRequest(key=p + b"b", value=b"3"))
        call = watch.Watch(None)
        await call.write(pb.WatchRequest(create_request=pb.WatchCreateRequest(
            key=p, range_end=prefix_end(p), start_revision=rev)))
        assert (await asyncio.wait_for(call.read(), 5)).created
        replay = await asyncio.wait_for(call.read(), 5)
        assert [e.kv.value for e in replay.events] == [b"2", b"3"]
        assert replay.events[0].type == pb.Event.PUT
        call.cancel()

        compacted = await kv.Compact(pb.CompactionRequest(revision=rev + 1, physical=True))
        assert compacted.header.revision >= rev + 1
        call = watch.Watch(None)
        await call.write(pb.WatchRequest(create_request=pb.WatchCreateRequest(
            key=p, range_end=prefix_end(p), start_revision=rev)))
        assert (await asyncio.wait_for(call.read(), 5)).created
        gone = await asyncio.wait_for(call.read(), 5)
        assert gone.canceled and gone.compact_revision == rev + 1 and not gone.events
        call.cancel()

    wire_test(etcd_server, run, prefix, body)


def test_lease_and_status_fields(etcd_server: EtcdServer, run: Run, prefix: str) -> None:
    async def body(kv: Any, _w: Any, lease_stub: Any, maint: Any, p: bytes) -> None:
        grant = await lease_stub.LeaseGrant(pb.LeaseGrantRequest(TTL=40, ID=0x7A11))
        assert grant.ID == 0x7A11 and grant.TTL == 40 and not grant.error
        await kv.Put(pb.PutRequest(key=p + b"l", value=b"1", lease=grant.ID))
        ttl = await lease_stub.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=grant.ID, keys=True))
        assert ttl.ID == grant.ID and ttl.grantedTTL == 40 and 38 <= ttl.TTL <= 40
        assert list(ttl.keys) == [p + b"l"]
        call = lease_stub.LeaseKeepAlive(None)
        await call.write(pb.LeaseKeepAliveRequest(ID=grant.ID))
        alive = await asyncio.wait_for(call.read(), 5)
        assert alive.ID == grant.ID and alive.TTL == 40 and alive.header.revision > 0
        call.cancel()
        revoked = await lease_stub.LeaseRevoke(pb.LeaseRevokeRequest(ID=grant.ID))
        assert revoked.header.revision > 0
        gone = await lease_stub.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=grant.ID))
        assert gone.TTL == -1

        status = await maint.Status(pb.StatusRequest())
        assert status.version.startswith("3.") and status.dbSize > 0
        assert status.dbSizeInUse > 0 and status.dbSize >= status.dbSizeInUse
        assert status.leader == status.header.member_id != 0
        assert status.raftTerm >= 1 and status.raftIndex >= status.raftAppliedIndex > 0
        assert status.header.raft_term == status.raftTerm and status.header.cluster_id != 0
        assert not status.isLearner and not status.errors

    wire_test(etcd_server, run, prefix, body)


def test_watch_fragments_large_responses(etcd_server: EtcdServer, run: Run, prefix: str) -> None:
    async def body(kv: Any, watch: Any, _l: Any, _m: Any, p: bytes) -> None:
        big = b"x" * (1 << 20)  # two of these exceed etcd's 1.5 MiB message limit
        rev = (await kv.Put(pb.PutRequest(key=p + b"1", value=big))).header.revision
        await kv.Put(pb.PutRequest(key=p + b"2", value=big))
        call = watch.Watch(None)
        await call.write(pb.WatchRequest(create_request=pb.WatchCreateRequest(
            key=p, range_end=prefix_end(p), start_revision=rev, fragment=True)))
        assert (await asyncio.wait_for(call.read(), 5)).created
        parts = [await asyncio.wait_for(call.read(), 5)]
        while parts[-1].fragment:
            parts.append(await asyncio.wait_for(call.read(), 5))
        assert len(parts) > 1 and parts[0].fragment
        assert [e.kv.key for part in parts for e in part.events] == [p + b"1", p + b"2"]
        call.cancel()
        await kv.DeleteRange(pb.DeleteRangeRequest(key=p, range_end=prefix_end(p)))

    wire_test(etcd_server, run, prefix, body)


def test_watch_progress_notify(tmp_path: Path, run: Run, prefix: str) -> None:
    server = EtcdServer(tmp_path / "etcd", extra_args=[
        "--experimental-watch-progress-notify-interval", "200ms"])
    try:
        server.start()

        async def body(kv: Any, watch: Any, _l: Any, _m: Any, p: bytes) -> None:
            rev = (await kv.Put(pb.PutRequest(key=b"/elsewhere", value=b"1"))).header.revision
            call = watch.Watch(None)
            await call.write(pb.WatchRequest(create_request=pb.WatchCreateRequest(
                key=p, range_end=prefix_end(p), progress_notify=True)))
            assert (await asyncio.wait_for(call.read(), 5)).created
            # Nothing changes under p: only a progress notification can arrive.
            note = await asyncio.wait_for(call.read(), 5)
            assert not note.events and note.header.revision >= rev
            call.cancel()

        wire_test(server, run, prefix, body)
    finally:
        server.stop()


def test_status_reports_the_member(open_etcd_store: Any, run: Run) -> None:
    async def body() -> None:
        async with open_etcd_store() as store:
            status = await store.status()
            assert status.version.startswith("3.") and status.leader == status.member_id
            assert status.revision == await store.current_revision()

    run(body())
