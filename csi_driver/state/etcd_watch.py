"""The etcd side of ``Store.watch_prefix``: one Watch stream per watch.

Opens the stream with a create request (the only step with a deadline: the stream itself
lives as long as the watch), reports the watch established when etcd answers "created",
then turns WatchResponses into WatchEvents until the watch is closed. Compaction,
cancellation by etcd and a lost stream become the store's errors. Must not: decode
records (events carry the stored JSON) or retry: the watcher re-lists and re-watches.
"""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio

from csi_driver._gen import etcd_pb2
from csi_driver.state.errors import CompactedError, StoreError, StoreUnavailableError
from csi_driver.state.etcd_ops import map_error, prefix_end, stream_write
from csi_driver.state.etcd_transport import EtcdTransport, Stubs
from csi_driver.state.store import WatchEvent, WatchEventType, WatchStream

WatchCall = grpc.aio.StreamStreamCall[etcd_pb2.WatchRequest, etcd_pb2.WatchResponse]


async def _open(stubs: Stubs, create: etcd_pb2.WatchCreateRequest, timeout_s: float) -> WatchCall:
    call = stubs.watch.Watch(None)  # long-lived: only the handshake has a deadline
    try:
        await stream_write(call, etcd_pb2.WatchRequest(create_request=create))
        resp = await asyncio.wait_for(call.read(), timeout_s)
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


def _events(resp: etcd_pb2.WatchResponse, prefix: bytes) -> list[WatchEvent]:
    out = []
    for ev in resp.events:
        is_put = ev.type == etcd_pb2.Event.PUT
        out.append(WatchEvent(
            type=WatchEventType.PUT if is_put else WatchEventType.DELETE,
            key=ev.kv.key[len(prefix):].decode(),
            value=ev.kv.value if is_put else None,
            mod_revision=ev.kv.mod_revision,
        ))
    return out


async def watch_stream(
    transport: EtcdTransport, prefix: bytes, start_revision: int | None, what: str
) -> WatchStream:
    """Watch every key under ``prefix``: None once etcd created the watch, then events
    (keys relative to ``prefix``). The stream is cancelled when the generator closes."""
    create = etcd_pb2.WatchCreateRequest(
        key=prefix, range_end=prefix_end(prefix), start_revision=start_revision or 0
    )
    call = await transport.rpc(what, lambda s: _open(s, create, transport.timeout_s))
    try:
        yield None  # established: etcd answered "created"
        while True:
            try:
                resp = await call.read()
            except grpc.aio.AioRpcError as exc:
                raise map_error(exc, what) from exc
            if not isinstance(resp, etcd_pb2.WatchResponse):
                raise StoreUnavailableError(f"{what}: stream closed by etcd")
            if resp.compact_revision:
                raise CompactedError(
                    f"{what}: revision {start_revision} is compacted", resp.compact_revision
                )
            if resp.canceled:
                raise StoreError(f"{what} canceled by etcd: {resp.cancel_reason}")
            for event in _events(resp, prefix):
                yield event
    finally:
        call.cancel()
