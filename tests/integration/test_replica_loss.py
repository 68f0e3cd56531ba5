"""Losing a replica under write load loses no acknowledged write (I1, I3).

A 3-replica volume is exported as node-1 (``export_volume``: the target runs in the root
namespace, replicas on node-1..3 over the bridge). A writer in this test speaks NBD itself
(fixed newstyle, NBD_OPT_GO, simple replies), pipelines sequence-numbered 4 KiB blocks --
block ``i`` at offset ``i * 4096`` holds ``i``, a tag, filler and a CRC -- with FUA on every
32nd write and a FLUSH every 64, and records each write whose reply came back without
error: that reply is the acknowledgement. While it writes, node-3 dies, either at once
(SIGKILL: its peers see RST) or silently (link down, then SIGKILL: the target only notices
through TCP_USER_TIMEOUT, ~3 s). Then:

- writes go on after the ISR shrinks, none fails, and etcd's ISR no longer has node-3;
- after the export stops, every acknowledged block is in node-1's and node-2's pool files
  (read directly), and no block there holds anything but zeroes or its own valid contents;
- ``verify_volume`` finds the surviving in-sync replicas identical.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import struct
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from csi_driver._gen import csi_pb2
from csi_driver.client import CsiClient, block_capability
from csi_driver.state.etcd import EtcdStore
from csi_driver.verify import verify_volume
from devtools import devcluster
from devtools.devcluster.mounts import loop_devices
from devtools.export import export_volume
from tests.credentials import cluster_auth

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.timeout(150),
]

BLOCK = 4096
VOLUME_SIZE = 64 << 20
NBLOCKS = VOLUME_SIZE // BLOCK
QUEUE_DEPTH = 16
FUA_EVERY, FLUSH_EVERY = 32, 64
WRITES_BEFORE_KILL = WRITES_AFTER_SHRINK = 1500
PHASE_TIMEOUT_S = 30.0
SURVIVORS = ("node-1", "node-2")

# -- a minimal NBD client -----------------------------------------------------------------

NBDMAGIC, IHAVEOPT = 0x4E42444D41474943, 0x49484156454F5054
OPT_GO, REP_ACK, REP_INFO, INFO_EXPORT = 7, 1, 3, 0
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
REPLY = struct.Struct(">IIQ")  # magic, error, handle
REQUEST_MAGIC, REPLY_MAGIC = 0x25609513, 0x67446698
CMD_WRITE, CMD_DISC, CMD_FLUSH, FLAG_FUA = 1, 2, 3, 1


class NbdClient:
    """Pipelined NBD requests on one connection; each resolves to the reply's error code."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer
        self._handles = itertools.count(1)
        self._pending: dict[int, asyncio.Future[int]] = {}
        self._replies = asyncio.get_running_loop().create_task(self._read_replies())

    @classmethod
    async def connect(cls, path: Path) -> NbdClient:
        reader, writer = await asyncio.open_unix_connection(str(path))
        magic, opt_magic, _flags = struct.unpack(">QQH", await reader.readexactly(18))
        assert (magic, opt_magic) == (NBDMAGIC, IHAVEOPT), "not a newstyle NBD server"
        writer.write(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
        # NBD_OPT_GO for the default export (empty name), no info requests.
        writer.write(struct.pack(">QII", IHAVEOPT, OPT_GO, 6) + struct.pack(">IH", 0, 0))
        for _ in range(16):  # a few NBD_REP_INFO, then NBD_REP_ACK
            _m, _opt, rep, length = struct.unpack(">QIII", await reader.readexactly(20))
            data = await reader.readexactly(length)
            assert not rep & (1 << 31), f"NBD_OPT_GO refused: {rep:#x} {data!r}"
            if rep == REP_INFO and struct.unpack_from(">H", data)[0] == INFO_EXPORT:
                assert struct.unpack_from(">Q", data, 2)[0] == VOLUME_SIZE
            if rep == REP_ACK:
                return cls(reader, writer)
        raise AssertionError("no NBD_REP_ACK after 16 option replies")

    async def _read_replies(self) -> None:
        # Ends with the connection (EOF) or when close() cancels it.
        try:
            while True:
                magic, error, handle = REPLY.unpack(await self._reader.readexactly(REPLY.size))
                assert magic == REPLY_MAGIC, f"bad reply magic {magic:#x}"
                future = self._pending.pop(handle)
                if not future.done():
                    future.set_result(error)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(ConnectionError(f"NBD connection lost: {exc}"))

    def _send(self, flags: int, cmd: int, offset: int, data: bytes = b"") -> asyncio.Future[int]:
        handle = next(self._handles)
        future = asyncio.get_running_loop().create_future()
        self._pending[handle] = future
        self._writer.write(REQUEST.pack(REQUEST_MAGIC, flags, cmd, handle, offset, len(data))
                           + data)
        return future

    async def write(self, offset: int, data: bytes, fua: bool) -> int:
        return await self._send(FLAG_FUA if fua else 0, CMD_WRITE, offset, data)

    async def flush(self) -> int:
        return await self._send(0, CMD_FLUSH, 0)

    async def close(self) -> None:
        with contextlib.suppress(ConnectionError, TimeoutError):
            self._writer.write(REQUEST.pack(REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
            await asyncio.wait_for(self._writer.drain(), 10)
        self._writer.close()
        self._replies.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await self._replies
        for future in self._pending.values():  # nobody will answer these now
            if not future.done():
                future.set_exception(ConnectionError("NBD client closed"))


# -- the sequence-numbered writer ---------------------------------------------------------


def block(seq: int) -> bytes:
    """Block ``seq``: its number, a tag, filler derived from it, and a CRC of all that."""
    head = seq.to_bytes(8, "big") + b"TANDEMLS" + seq.to_bytes(8, "big") * 509
    return head + zlib.crc32(head).to_bytes(8, "big")


@dataclass
class Ledger:
    """What the writer sent and what was acknowledged, in acknowledgement order."""

    next_seq: int = 0
    acked: list[int] = field(default_factory=list)
    ack_times: list[float] = field(default_factory=list)
    failed: dict[int, int] = field(default_factory=dict)
    failed_flushes: int = 0
    stop: bool = False

    def longest_stall(self) -> float:
        gaps = [b - a for a, b in itertools.pairwise(self.ack_times)]
        return max(gaps, default=0.0)


async def write_worker(client: NbdClient, ledger: Ledger) -> None:
    while not ledger.stop and ledger.next_seq < NBLOCKS:  # bounded by the volume's blocks
        seq = ledger.next_seq
        ledger.next_seq += 1
        error = await client.write(seq * BLOCK, block(seq), fua=seq % FUA_EVERY == 0)
        if error:
            ledger.failed[seq] = error
            continue
        ledger.acked.append(seq)
        ledger.ack_times.append(time.monotonic())
        if seq % FLUSH_EVERY == 0 and await client.flush():
            ledger.failed_flushes += 1


async def until(check: Callable[[], bool], what: str, timeout_s: float = PHASE_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


# -- cluster, volume, checks --------------------------------------------------------------


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[devcluster.ClusterSpec]:
    directory = tmp_path / "c"
    try:
        yield devcluster.up(directory, 3, 1 << 30, lease_ttl_s=3.0)
    finally:
        devcluster.down(directory)
        assert not loop_devices(directory)


def create_volume(spec: devcluster.ClusterSpec) -> str:
    with CsiClient(spec.controller.csi_endpoint) as ctl:
        return str(ctl.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
            name=f"loss-{uuid.uuid4().hex[:8]}",
            capacity_range=csi_pb2.CapacityRange(required_bytes=VOLUME_SIZE),
            volume_capabilities=[block_capability()], parameters={"replicas": "3"},
        ), timeout=60).volume.volume_id)


@contextlib.asynccontextmanager
async def etcd(spec: devcluster.ClusterSpec) -> AsyncIterator[EtcdStore]:
    store = EtcdStore([spec.etcd_host_endpoint], prefix=spec.etcd_prefix)
    try:
        yield store
    finally:
        await store.close()


async def isr_of(spec: devcluster.ClusterSpec, volume_id: str) -> tuple[str, ...]:
    async with etcd(spec) as store:
        found = await store.get_volume(volume_id)
    assert found is not None
    return tuple(found.value.isr)


def image(spec: devcluster.ClusterSpec, node_id: str, volume_id: str) -> bytes:
    return (Path(spec.dir) / "pools" / node_id / f"{volume_id}.img").read_bytes()


def check_replica(data: bytes, acked: list[int], node_id: str) -> None:
    missing = [s for s in acked if data[s * BLOCK:(s + 1) * BLOCK] != block(s)]
    assert not missing, f"{node_id}: {len(missing)} acknowledged blocks missing, e.g. {missing[:5]}"
    zero = bytes(BLOCK)
    garbage = [i for i in range(NBLOCKS)
               if (chunk := data[i * BLOCK:(i + 1) * BLOCK]) != zero and chunk != block(i)]
    assert not garbage, f"{node_id}: blocks with foreign contents, e.g. {garbage[:5]}"


# -- the scenario -------------------------------------------------------------------------


@dataclass
class Outcome:
    ledger: Ledger
    acked_at_kill: int
    acked_at_shrink: int
    shrink_seconds: float
    isr_after: tuple[str, ...]


async def write_through_loss(
    spec: devcluster.ClusterSpec, volume_id: str, mode: devcluster.KillMode
) -> Outcome:
    directory = Path(spec.dir)
    handle = await export_volume(directory, volume_id, "node-1", directory / "loss.sock")
    ledger = Ledger()
    try:
        client = await NbdClient.connect(handle.socket_path)
        try:
            writers = asyncio.gather(*(write_worker(client, ledger) for _ in range(QUEUE_DEPTH)))
            try:
                outcome = await kill_while_writing(spec, volume_id, mode, ledger)
            finally:
                ledger.stop = True
                await asyncio.wait_for(writers, PHASE_TIMEOUT_S)
            assert await asyncio.wait_for(client.flush(), PHASE_TIMEOUT_S) == 0
        finally:
            await client.close()
    finally:
        rc = await handle.stop()
    assert rc == 0, f"target exit status {rc}:\n{handle.log_path.read_text()}"
    return outcome


async def kill_while_writing(
    spec: devcluster.ClusterSpec, volume_id: str, mode: devcluster.KillMode, ledger: Ledger
) -> Outcome:
    """Kill node-3 mid-stream, wait for the ISR to lose it, then for more acknowledgements."""
    await until(lambda: len(ledger.acked) >= WRITES_BEFORE_KILL, "writes before the kill")
    killed = time.monotonic()
    await asyncio.to_thread(devcluster.kill_node, Path(spec.dir), "node-3", mode)
    at_kill = len(ledger.acked)
    deadline = time.monotonic() + PHASE_TIMEOUT_S
    while "node-3" in (isr := await isr_of(spec, volume_id)):
        assert time.monotonic() < deadline, "node-3 never left the ISR"
        await asyncio.sleep(0.1)
    shrink_s, at_shrink = time.monotonic() - killed, len(ledger.acked)
    await until(lambda: len(ledger.acked) >= at_shrink + WRITES_AFTER_SHRINK,
                "writes after the ISR shrank")
    return Outcome(ledger, at_kill, at_shrink, shrink_s, isr)


@pytest.mark.parametrize("mode", ["sigkill", "link-down"])
def test_no_acknowledged_write_is_lost_when_a_replica_dies(
    cluster: devcluster.ClusterSpec, mode: devcluster.KillMode
) -> None:
    volume_id = create_volume(cluster)
    assert asyncio.run(isr_of(cluster, volume_id)) == ("node-1", "node-2", "node-3")
    out = asyncio.run(write_through_loss(cluster, volume_id, mode))
    ledger = out.ledger
    print(f"{mode}: {len(ledger.acked)} writes acknowledged ({out.acked_at_kill} before the "
          f"kill), ISR shrank after {out.shrink_seconds:.1f} s, longest stall between "
          f"acknowledgements {ledger.longest_stall():.2f} s")
    assert not ledger.failed, f"writes failed (NBD errors) while the ISR shrank: {ledger.failed}"
    assert ledger.failed_flushes == 0
    assert len(ledger.acked) >= out.acked_at_shrink + WRITES_AFTER_SHRINK > out.acked_at_kill
    assert set(out.isr_after) == set(SURVIVORS)
    assert set(asyncio.run(isr_of(cluster, volume_id))) == set(SURVIVORS)
    for node_id in SURVIVORS:
        check_replica(image(cluster, node_id, volume_id), ledger.acked, node_id)
    # The dead replica really missed writes: the survivors carry blocks it never saw.
    late = ledger.acked[-1]
    assert image(cluster, "node-3", volume_id)[late * BLOCK:(late + 1) * BLOCK] != block(late)

    async def verify() -> None:
        async with etcd(cluster) as store:
            report = await verify_volume(store, volume_id, cluster_auth(cluster.dir))
        assert report.identical, report
        assert {r.node_id for r in report.replicas if r.reachable} >= set(SURVIVORS), report

    asyncio.run(verify())
