"""The owner's client of one replica server: each replication op as a method.

Owns: turning an op's arguments into its request (flags, the CHECKSUM spec, a whole
``WriteBatch``) on the pipelined, authenticated ``replica_connection.ReplicaConnection``,
which owns connecting, request ids, batching, deadlines and failure. Must not: retry,
interpret non-OK statuses (``expect_ok`` is the caller's choice), or import csi_driver,
grpc or etcd. Every method returns an ``asyncio.Future[Response]`` with the replica's
response whatever its status; payloads handed in must not change until it is done.
"""

from __future__ import annotations

import asyncio

from replication.messages import Buffer, ChecksumAlgo, Flag, Op, Response
from replication.payloads import ChecksumSpec, WriteBatch
from replication.replica_connection import ReplicaConnection

_FUA = int(Flag.FUA)
_NO_HOLE = int(Flag.NO_HOLE)


class ReplicaClient(ReplicaConnection):
    """A pipelined connection to one replica server; use ``await ReplicaClient.connect()``."""

    def write(
        self,
        volume_id: str,
        epoch: int,
        offset: int,
        data: Buffer,
        *,
        fua: bool = False,
        payload_crc: int | None = None,
    ) -> asyncio.Future[Response]:
        """``payload_crc``: checksum.crc32(data) if already known (sending to several replicas)."""
        flags = _FUA if fua else 0
        return self._submit(Op.WRITE, volume_id, epoch, offset, len(data), flags, data, payload_crc)

    def read(
        self, volume_id: str, epoch: int, offset: int, length: int
    ) -> asyncio.Future[Response]:
        return self._submit(Op.READ, volume_id, epoch, offset, length)

    def read_now(self, offset: int, length: int) -> bytes | None:
        """The data at once if this replica can read it without the network, else None."""
        return None

    def flush(self, volume_id: str, epoch: int) -> asyncio.Future[Response]:
        return self._submit(Op.FLUSH, volume_id, epoch)

    def trim(
        self, volume_id: str, epoch: int, offset: int, length: int, *, fua: bool = False
    ) -> asyncio.Future[Response]:
        return self._submit(Op.TRIM, volume_id, epoch, offset, length, _FUA if fua else 0)

    def write_zeroes(
        self,
        volume_id: str,
        epoch: int,
        offset: int,
        length: int,
        *,
        no_hole: bool = False,
        fua: bool = False,
    ) -> asyncio.Future[Response]:
        flags = (_NO_HOLE if no_hole else 0) | (_FUA if fua else 0)
        return self._submit(Op.WRITE_ZEROES, volume_id, epoch, offset, length, flags)

    def fence(self, volume_id: str, epoch: int) -> asyncio.Future[Response]:
        return self._submit(Op.FENCE, volume_id, epoch)

    def stat(self, volume_id: str, epoch: int) -> asyncio.Future[Response]:
        """The OK payload decodes with ``payloads.StatInfo.decode``."""
        return self._submit(Op.STAT, volume_id, epoch)

    def checksum(
        self,
        volume_id: str,
        epoch: int,
        offset: int,
        length: int,
        block_size: int,
        algo: ChecksumAlgo = ChecksumAlgo.BLAKE2B_128,
    ) -> asyncio.Future[Response]:
        """The OK payload equals ``payloads.block_digests`` of the range."""
        spec = ChecksumSpec(block_size, algo).encode()
        return self._submit(Op.CHECKSUM, volume_id, epoch, offset, length, 0, spec)

    def settle(self, volume_id: str, epoch: int, seq: int) -> asyncio.Future[Response]:
        """Declare every write sent before this on every ISR replica (send when quiescent)."""
        return self._submit(Op.SETTLE, volume_id, epoch, seq)

    def write_batch(
        self, volume_id: str, epoch: int, batch: WriteBatch, *, fua: bool = False
    ) -> asyncio.Future[Response]:
        """Many writes in one frame, applied in order; one response for all of them. Sent at
        once (with anything queued before it): a batch is already a whole tick's writes."""
        return self._submit_batch(volume_id, epoch, batch, fua)
