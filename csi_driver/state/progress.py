"""Rebuild progress records: ``progress/<volume>/<node>``, written by the owner's target.

Kept apart from the volume record on purpose: progress changes every second while the
volume record is the CAS-guarded authority (ISR, epoch); mixing them would make every ISR
change on the write path race with progress updates. Operators read both (``tandem volume
show``). Mixed into ``EtcdStore``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from csi_driver._gen import etcd_pb2
from csi_driver.state.etcd_ops import prefix_end
from replication.authority import ResyncProgress

R = TypeVar("R")
_FIELDS = ("kind", "done_bytes", "total_bytes", "rate_bytes_s", "volume_bytes")


class ProgressMixin:
    _timeout_s: float

    def key(self, kind: str, ident: str) -> bytes:
        raise NotImplementedError

    async def _rpc(self, what: str, call: Callable[[Any], Awaitable[R]]) -> R:
        raise NotImplementedError

    async def put_progress(
        self, volume_id: str, node_id: str, progress: ResyncProgress | None
    ) -> None:
        """Publish (or clear, with None) one replica's resync progress."""
        key = self.key("progress", f"{volume_id}/{node_id}")
        if progress is None:
            delete = etcd_pb2.DeleteRangeRequest(key=key)
            await self._rpc("clear progress",
                            lambda s: s.kv.DeleteRange(delete, timeout=self._timeout_s))
            return
        value = json.dumps({f: getattr(progress, f) for f in _FIELDS}).encode()
        put = etcd_pb2.PutRequest(key=key, value=value)
        await self._rpc("put progress", lambda s: s.kv.Put(put, timeout=self._timeout_s))

    async def get_progress(self, volume_id: str) -> dict[str, ResyncProgress]:
        """Every replica's published progress for ``volume_id``."""
        start = self.key("progress", f"{volume_id}/")
        req = etcd_pb2.RangeRequest(key=start, range_end=prefix_end(start))
        resp = await self._rpc("get progress",
                               lambda s: s.kv.Range(req, timeout=self._timeout_s))
        out = {}
        for kv in resp.kvs:
            node = kv.key[len(start):].decode()
            try:
                data = json.loads(kv.value)
                out[node] = ResyncProgress(**{f: data[f] for f in _FIELDS})
            except (ValueError, KeyError, TypeError):
                continue  # a malformed record is not worth failing a status command
        return out
