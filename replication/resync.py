"""Bringing one replica in line with the read source while writes continue.

Used for a returning or new replica (``join=True``: rebuild, then join the ISR by CAS, I5)
and for an ISR member after a takeover (``join=False``: convergence of the regions in-flight
writes may have left different, I4). The replica is already in the target's write set, so
every new write reaches it; what it may lack is tracked in a dirty bitmap:

- regions known to be missed (the target dropped it and kept a bitmap), or, without that
  knowledge, regions whose CHECKSUMs differ from the source's (only digests cross the
  network, so a replica that was away briefly copies little);
- every write issued to the volume marks its region again, so a region copied while a write
  raced with the copy is copied once more. Copies and writes to the replica travel on one
  ordered connection, so the last copy of a region always reflects the writes before it.

Copied regions are compared by checksum once more; then, with writes paused for a moment,
the last marked regions are copied and the replica joins the ISR by CAS.

Must not: talk to etcd (the Authority does) or decide which replicas to resync (the target
does).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from replication.authority import ResyncProgress
from replication.bitmap import DirtyBitmap
from replication.errors import ReplicaUnavailableError
from replication.messages import ChecksumAlgo, Status
from replication.replica_client import ReplicaClient

if TYPE_CHECKING:
    from replication.target import ReplicatedBackend

log = logging.getLogger(__name__)

# A CHECKSUM is a barrier on the replica's connection: every request behind it (the user's
# writes and flushes) waits while it hashes (~1.5 ms/MiB). 64 MiB chunks held a new owner's
# first flush, and so NodeStageVolume, ~0.25 s behind convergence; 4 MiB hold ~6 ms.
DIFF_CHUNK = 4 << 20
COPY_ROUNDS = 20
# Below this much left to copy, the last round runs with writes paused (a short stall).
FINAL_ROUND_BYTES = 8 << 20
PROGRESS_EVERY_S = 1.0
ALGO = ChecksumAlgo.BLAKE2B_128


class ResyncFailedError(ReplicaUnavailableError):
    """The replica (or the source) failed during the resync; it stays out of the ISR."""


class Resync:
    def __init__(
        self, backend: ReplicatedBackend, node: str, client: ReplicaClient,
        bitmap: DirtyBitmap | None, join: bool,
    ) -> None:
        self.backend = backend
        self.node = node
        self.client = client
        self.join = join
        # None = nothing known about what it missed: find out by checksum comparison.
        self.known = bitmap is not None
        self.bitmap = bitmap if bitmap is not None else DirtyBitmap(backend.size)
        self.copied = DirtyBitmap(backend.size)
        self.done_bytes = 0
        self.total_bytes = 0
        self._started = time.monotonic()
        self._reported = 0.0

    @property
    def kind(self) -> str:
        return "rebuild" if self.join else "converge"

    def progress(self) -> ResyncProgress:
        elapsed = max(time.monotonic() - self._started, 1e-6)
        return ResyncProgress(self.kind, self.done_bytes, max(self.total_bytes, self.done_bytes),
                              self.done_bytes / elapsed, self.backend.size)

    async def run(self) -> None:
        ctx = f"volume={self.backend.volume_id} epoch={self.backend.epoch} replica={self.node}"
        # Writes issued before the replica joined the write set must have landed on the
        # source before we compare or copy anything.
        await self.backend.quiesce()
        if not self.known:
            await self._diff_all()
        self.total_bytes = self.bitmap.dirty_bytes
        log.info("%s %s: %d bytes to copy of %d", ctx, self.kind, self.total_bytes,
                 self.backend.size)
        for _ in range(COPY_ROUNDS):
            await self._copy_marked()
            if self.bitmap.dirty_bytes <= FINAL_ROUND_BYTES:
                break
        await self._verify_copied()
        async with self.backend.writes_paused():
            # Nothing can re-mark a region now: after this copy the replica matches.
            await self._copy_marked()
            if self.join:
                await self.backend.join(self.node)
        await self._report(force=True)
        log.info("%s %s done: copied %d bytes in %.1f s", ctx, self.kind, self.done_bytes,
                 time.monotonic() - self._started)

    async def _digests(self, client: ReplicaClient, offset: int, length: int) -> bytes:
        response = await client.checksum(self.backend.volume_id, self.backend.epoch, offset,
                                         length, self.bitmap.region_size, ALGO)
        if response.status is not Status.OK:
            raise ResyncFailedError(f"CHECKSUM on {client.node_id}: {response.status.name}")
        return bytes(response.payload)

    async def _diff(self, offset: int, length: int, into: DirtyBitmap) -> None:
        """Mark in ``into`` the regions of the range whose digests differ, DIFF_CHUNK at a
        time (each CHECKSUM holds back the writes behind it on its connection)."""
        end = offset + length
        for pos in range(offset, end, DIFF_CHUNK):
            await self._diff_chunk(pos, min(DIFF_CHUNK, end - pos), into)

    async def _diff_chunk(self, offset: int, length: int, into: DirtyBitmap) -> None:
        source = self.backend.source_client()
        ours, theirs = await asyncio.gather(
            self._digests(source, offset, length), self._digests(self.client, offset, length)
        )
        size = len(ours) // max(1, -(-length // self.bitmap.region_size))
        for i in range(0, len(ours), size):
            if ours[i:i + size] != theirs[i:i + size]:
                into.mark(offset + (i // size) * self.bitmap.region_size, 1)

    async def _diff_all(self) -> None:
        await self._diff(0, self.backend.size, self.bitmap)

    async def _copy_marked(self) -> None:
        region = self.bitmap.region_size
        for index in range(self.bitmap.regions):
            if not self.bitmap.is_marked(index):
                continue
            self.bitmap.clear(index)  # a write from now on marks it again
            offset = index * region
            length = min(region, self.backend.size - offset)
            try:
                data = await self.backend.read_source(offset, length)
                response = await self.client.write(self.backend.volume_id, self.backend.epoch,
                                                   offset, data)
                if response.status is not Status.OK:
                    raise ResyncFailedError(f"copy to {self.node}: {response.status.name}")
            except BaseException:
                # Not copied (failed, or the resync was aborted): the region still differs.
                # The bitmap outlives this resync (saved, and the next one trusts it), so a
                # region cleared here would never be copied and the replica could join the
                # ISR without it.
                self.bitmap.mark(offset, length)
                raise
            self.copied.mark(offset, length)
            self.done_bytes += length
            self.total_bytes = max(self.total_bytes, self.done_bytes + self.bitmap.dirty_bytes)
            await self._report()

    async def _verify_copied(self) -> None:
        """Re-check copied regions by checksum and mark any that differ for copying again.

        A belt-and-braces check of the copy: with writes still flowing, a region being
        written may differ for a moment, which only costs one more copy of it."""
        mismatched = DirtyBitmap(self.backend.size, self.bitmap.region_size)
        for offset, length in list(self.copied.ranges()):
            await self._diff(offset, length, mismatched)
        self.bitmap.merge(mismatched)

    async def _report(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._reported >= PROGRESS_EVERY_S:
            self._reported = now
            await self.backend.report_progress(self.node, self.progress())
