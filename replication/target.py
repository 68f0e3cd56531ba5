"""The volume target: the single writer's fan-out of block I/O to the in-sync replicas.

``ReplicatedBackend`` implements the NBD front end's ``BlockBackend``. Every write goes to
every ISR replica (frames of one event-loop tick leave in one ``writelines`` per replica)
and is acknowledged only when all of them acknowledged (I1). A replica that fails or times
out is removed from the ISR through the ``Authority`` (etcd CAS) *before* the write is
acknowledged, and what it missed is marked in its dirty bitmap (I3). A STALE_EPOCH answer or
a failed CAS means another owner took over: the target is fenced and fails every request
from then on (I2). Reads come from the local replica when it is in the ISR.

Must not: talk to etcd (the Authority does), parse NBD, or block the event loop.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from replication.authority import Authority, AuthorityUnavailableError, FencedError
from replication.backend import BackendIOError, Payload
from replication.bitmap import DirtyBitmap
from replication.errors import ReplicaUnavailableError
from replication.messages import Response, Status
from replication.replica_client import ReplicaClient

log = logging.getLogger(__name__)

MAX_INFLIGHT_BYTES = 64 << 20


@dataclass(frozen=True)
class ReplicaEndpoint:
    node_id: str
    host: str
    port: int


class NoInSyncReplicaError(BackendIOError):
    """No member of the recorded ISR could be fenced: serving would risk stale data."""

    def __init__(self, detail: str) -> None:
        super().__init__(errno.EIO, detail)


class _ByteBudget:
    """Caps bytes in flight per volume: writers wait (backpressure) instead of queueing."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._used = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self, n: int) -> None:
        n = min(n, self._limit)
        while self._used + n > self._limit:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter
        self._used += n

    def release(self, n: int) -> None:
        self._used -= min(n, self._limit)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)


Connect = Callable[[ReplicaEndpoint], Awaitable[ReplicaClient]]


class ReplicatedBackend:
    def __init__(
        self, volume_id: str, epoch: int, size: int, clients: dict[str, ReplicaClient],
        isr: Sequence[str], local_node: str | None, authority: Authority, state_dir: Path,
        out_of_sync: Sequence[str] = (),
    ) -> None:
        self.volume_id = volume_id
        self.epoch = epoch
        self._size = size
        self._clients = clients
        self._local = local_node
        self._isr = self._read_order(isr)
        self._authority = authority
        self._state_dir = state_dir
        self._bitmaps = {n: self._load_bitmap(n) for n in out_of_sync}
        self._dropping: dict[str, asyncio.Future[None]] = {}
        self._budget = _ByteBudget(MAX_INFLIGHT_BYTES)
        self.fenced: str | None = None

    @property
    def size(self) -> int:
        return self._size

    @property
    def isr(self) -> tuple[str, ...]:
        return tuple(self._isr)

    def _read_order(self, isr: Sequence[str]) -> list[str]:
        return sorted(isr, key=lambda n: n != self._local)

    def _ctx(self) -> str:
        return f"volume={self.volume_id} epoch={self.epoch}"

    # -- opening --------------------------------------------------------------------------

    @classmethod
    async def open(
        cls, volume_id: str, epoch: int, size: int, endpoints: Sequence[ReplicaEndpoint],
        isr: Sequence[str], local_node: str | None, authority: Authority, state_dir: Path,
        connect: Connect,
    ) -> ReplicatedBackend:
        """Connect to and fence every replica; drop unreachable ISR members before serving."""
        results = await asyncio.gather(
            *(cls._connect_and_fence(e, volume_id, epoch, connect) for e in endpoints),
            return_exceptions=True,
        )
        clients: dict[str, ReplicaClient] = {}
        for endpoint, result in zip(endpoints, results, strict=True):
            if isinstance(result, ReplicaClient):
                clients[endpoint.node_id] = result
            else:
                log.warning("volume=%s epoch=%d replica=%s not fenced: %s",
                            volume_id, epoch, endpoint.node_id, result)
        fenced_isr = [n for n in isr if n in clients]
        if not fenced_isr:
            for client in clients.values():
                client.close()
            raise NoInSyncReplicaError(
                f"volume {volume_id}: none of the in-sync replicas {list(isr)} could be "
                "fenced; refusing to serve possibly stale data"
            )
        unreachable = frozenset(isr) - set(fenced_isr)
        if unreachable:
            try:
                await authority.remove_from_isr(unreachable, "not reachable at takeover")
            except (FencedError, AuthorityUnavailableError):
                for client in clients.values():
                    client.close()
                raise
        out_of_sync = [e.node_id for e in endpoints if e.node_id not in fenced_isr]
        return cls(volume_id, epoch, size, clients, fenced_isr, local_node, authority,
                   state_dir, out_of_sync)

    @staticmethod
    async def _connect_and_fence(
        endpoint: ReplicaEndpoint, volume_id: str, epoch: int, connect: Connect
    ) -> ReplicaClient:
        client = await connect(endpoint)
        try:
            response = await client.fence(volume_id, epoch)
        except BaseException:
            client.close()
            raise
        if response.status is not Status.OK:
            client.close()
            raise ReplicaUnavailableError(
                f"fence at epoch {epoch} refused: {response.status.name} "
                f"(replica fenced at {response.epoch})"
            )
        return client

    # -- the write path -------------------------------------------------------------------

    def _check_serving(self) -> None:
        if self.fenced is not None:
            raise BackendIOError(errno.EIO, f"fenced: {self.fenced}")
        if not self._authority.may_acknowledge():
            self.fenced = "ownership lease not renewed in time (self-fenced)"
            log.error("%s %s", self._ctx(), self.fenced)
            raise BackendIOError(errno.EIO, self.fenced)

    async def _fan_out(
        self, send: Callable[[ReplicaClient], asyncio.Future[Response]], offset: int,
        length: int,
    ) -> None:
        self._check_serving()
        members = list(self._isr)
        futures = [send(self._clients[n]) for n in members]
        for bitmap in self._bitmaps.values():
            bitmap.mark(offset, length)
        results = await asyncio.gather(*futures, return_exceptions=True)
        failed: list[str] = []
        for node, result in zip(members, results, strict=True):
            if isinstance(result, Response):
                if result.status is Status.OK:
                    continue
                if result.status is Status.STALE_EPOCH:
                    self._fence(f"replica {node} is fenced at epoch {result.epoch}")
            failed.append(node)
        if failed:
            await self._drop(failed, offset, length)
        self._check_serving()

    async def write(self, offset: int, data: Payload, fua: bool) -> None:
        n = len(data)
        await self._budget.acquire(n)
        try:
            crc = zlib.crc32(data)
            await self._fan_out(
                lambda c: c.write(self.volume_id, self.epoch, offset, data, fua=fua,
                                  payload_crc=crc),
                offset, n,
            )
        finally:
            self._budget.release(n)

    async def trim(self, offset: int, length: int) -> None:
        await self._fan_out(lambda c: c.trim(self.volume_id, self.epoch, offset, length),
                            offset, length)

    async def write_zeroes(self, offset: int, length: int, no_hole: bool) -> None:
        await self._fan_out(
            lambda c: c.write_zeroes(self.volume_id, self.epoch, offset, length,
                                     no_hole=no_hole),
            offset, length,
        )

    async def flush(self) -> None:
        await self._fan_out(lambda c: c.flush(self.volume_id, self.epoch), 0, 0)
        self.save_bitmaps()

    async def read(self, offset: int, length: int) -> bytes:
        self._check_serving()
        for node in list(self._isr):
            try:
                response = await self._clients[node].read(
                    self.volume_id, self.epoch, offset, length
                )
            except ReplicaUnavailableError:
                await self._drop([node], 0, 0)
                continue
            if response.status is Status.OK:
                return bytes(response.payload)
            if response.status is Status.STALE_EPOCH:
                self._fence(f"replica {node} is fenced at epoch {response.epoch}")
            await self._drop([node], 0, 0)
        raise BackendIOError(errno.EIO, "no in-sync replica could serve the read")

    # -- ISR changes ----------------------------------------------------------------------

    def _fence(self, reason: str) -> None:
        if self.fenced is None:
            self.fenced = reason
            log.error("%s fenced: %s", self._ctx(), reason)
        raise BackendIOError(errno.EIO, f"fenced: {reason}")

    async def _drop(self, nodes: Sequence[str], offset: int, length: int) -> None:
        """Remove failed replicas from the ISR (once each, even under concurrent failures)."""
        pending = []
        for node in nodes:
            future = self._dropping.get(node)
            if future is None:
                future = asyncio.ensure_future(self._remove(node))
                self._dropping[node] = future
            pending.append(future)
            # Marked before the ISR change is confirmed: the region is recorded as missed
            # whether or not this write reached the replica.
            bitmap = self._bitmaps.setdefault(node, DirtyBitmap(self._size))
            bitmap.mark(offset, length)
        await asyncio.gather(*pending)
        if not self._isr:
            self._fence("no in-sync replica left")

    async def _remove(self, node: str) -> None:
        try:
            new_isr = await self._authority.remove_from_isr(frozenset({node}), "replica failed")
        except FencedError as exc:
            self._dropping.pop(node, None)
            self._fence(str(exc))
        except AuthorityUnavailableError as exc:
            self._dropping.pop(node, None)  # retried by the next failing request
            raise BackendIOError(errno.EIO, f"cannot shrink the ISR: {exc}") from exc
        self._bitmaps.setdefault(node, DirtyBitmap(self._size))
        self._isr = [n for n in self._isr if n != node and n in new_isr]
        client = self._clients.pop(node, None)
        if client is not None:
            client.close()
        self.save_bitmaps()
        log.warning("%s replica=%s removed from ISR; isr=%s", self._ctx(), node, self._isr)

    # -- bitmaps and shutdown -------------------------------------------------------------

    def _bitmap_path(self, node: str) -> Path:
        return self._state_dir / f"{self.volume_id}.{node}.bitmap"

    def _load_bitmap(self, node: str) -> DirtyBitmap:
        path = self._bitmap_path(node)
        try:
            bitmap = DirtyBitmap.load(path)
            if bitmap.size == self._size:
                return bitmap
        except (OSError, ValueError):
            pass
        # No usable record of what it missed: everything must be copied.
        bitmap = DirtyBitmap(self._size)
        bitmap.mark_all()
        return bitmap

    def bitmap(self, node: str) -> DirtyBitmap | None:
        return self._bitmaps.get(node)

    def save_bitmaps(self) -> None:
        self._state_dir.mkdir(parents=True, exist_ok=True)
        for node, bitmap in self._bitmaps.items():
            bitmap.save(self._bitmap_path(node))

    def close(self) -> None:
        self.save_bitmaps()
        for client in self._clients.values():
            client.close()
        self._clients.clear()
