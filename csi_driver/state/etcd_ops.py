"""etcd wire helpers: endpoint parsing, key ranges, txn op builders, decoding, errors.

Pure functions over the generated etcd messages, kept apart from EtcdStore so
the store reads as the Store contract and nothing else.
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

import grpc
import grpc.aio

from csi_driver._gen import etcd_pb2
from csi_driver.state.errors import LeaseExpiredError, StoreError, StoreUnavailableError
from csi_driver.state.model import NodeRecord, Versioned, VolumeRecord

Rec = TypeVar("Rec", NodeRecord, VolumeRecord)
Req = TypeVar("Req")

CMP = etcd_pb2.Compare

CHANNEL_OPTIONS = [
    # Reconnect quickly after an etcd restart: the default backoff grows to 120 s,
    # during which every call would fail fast with UNAVAILABLE. Not min_reconnect_backoff:
    # gRPC core also uses it as the connect timeout (subchannel min_connect_timeout), and
    # at 100 ms a loaded machine failed first calls with "timed out before SETTINGS".
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # Detect half-open connections (partitions) under long-lived watch streams;
    # etcd rejects pings more frequent than every 5 s.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    # A full listing or a watch replay after a long disconnect can exceed gRPC's
    # 4 MiB default (roughly 8000 volume records).
    ("grpc.max_receive_message_length", 256 << 20),
]


def endpoint_target(endpoint: str) -> str:
    """``http://host:port`` or ``host:port`` -> the gRPC target ``host:port``."""
    if endpoint.startswith("https://"):
        raise ValueError(f"TLS endpoints are not supported: {endpoint}")
    target = endpoint.removeprefix("http://").rstrip("/")
    if not target or "/" in target:
        raise ValueError(f"bad etcd endpoint {endpoint!r}")
    return target


def prefix_end(prefix: bytes) -> bytes:
    """The exclusive range end that selects every key starting with ``prefix``."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return b"\0"  # etcd: "\0" as range_end means "to the end of the keyspace"
    return stripped[:-1] + bytes([stripped[-1] + 1])


def map_error(exc: grpc.aio.AioRpcError, what: str) -> StoreError:
    """Translate a failed etcd call into the store's error hierarchy."""
    code, details = exc.code(), exc.details() or ""
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return StoreUnavailableError(f"{what}: etcd {code.name}: {details}")
    # etcd answers NOT_FOUND "etcdserver: requested lease not found" both for lease
    # calls and for a Put attached to a dead lease.
    if code is grpc.StatusCode.NOT_FOUND and "lease not found" in details:
        return LeaseExpiredError(f"{what}: {details}")
    return StoreError(f"{what}: etcd {code.name}: {details}")


async def stream_write(call: grpc.aio.StreamStreamCall[Req, Any], request: Req) -> None:
    """Write to a bidi stream; if the RPC already ended, raise the status it ended with.

    grpc.aio refuses writes to a finished call with asyncio.InvalidStateError,
    hiding the real status (say UNAVAILABLE after etcd went away); read() on a
    finished call re-raises that status as AioRpcError, which callers map.
    """
    try:
        await call.write(request)
    except asyncio.InvalidStateError:
        await call.read()
        raise StoreUnavailableError("the stream was closed by etcd") from None


def compare_create(key: bytes, create_revision: int) -> etcd_pb2.Compare:
    """``create_revision(key) == n``; n == 0 means "key does not exist"."""
    return etcd_pb2.Compare(
        result=CMP.EQUAL, target=CMP.CREATE, key=key, create_revision=create_revision
    )


def compare_mod(key: bytes, mod_revision: int) -> etcd_pb2.Compare:
    return etcd_pb2.Compare(result=CMP.EQUAL, target=CMP.MOD, key=key, mod_revision=mod_revision)


def compare_value(key: bytes, value: bytes) -> etcd_pb2.Compare:
    return etcd_pb2.Compare(result=CMP.EQUAL, target=CMP.VALUE, key=key, value=value)


def put_op(key: bytes, value: bytes, prev_kv: bool = False, lease: int = 0) -> etcd_pb2.RequestOp:
    return etcd_pb2.RequestOp(
        request_put=etcd_pb2.PutRequest(key=key, value=value, prev_kv=prev_kv, lease=lease)
    )


def get_op(key: bytes) -> etcd_pb2.RequestOp:
    return etcd_pb2.RequestOp(request_range=etcd_pb2.RangeRequest(key=key))


def delete_op(key: bytes) -> etcd_pb2.RequestOp:
    return etcd_pb2.RequestOp(request_delete_range=etcd_pb2.DeleteRangeRequest(key=key))


def txn_op(txn: etcd_pb2.TxnRequest) -> etcd_pb2.RequestOp:
    return etcd_pb2.RequestOp(request_txn=txn)


def first_kv(resp: etcd_pb2.ResponseOp) -> etcd_pb2.KeyValue | None:
    """The first key of a range op's result inside a Txn response, if any."""
    kvs = resp.response_range.kvs
    return kvs[0] if kvs else None


def decode(cls: type[Rec], kv: etcd_pb2.KeyValue) -> Versioned[Rec]:
    """A stored record with its revisions; StoreError if the value is malformed."""
    try:
        rec = cls.from_json(kv.value)
    except ValueError as exc:
        raise StoreError(f"corrupt {cls.__name__} at {kv.key!r}: {exc}") from exc
    return Versioned(rec, kv.mod_revision, kv.create_revision, kv.lease)
