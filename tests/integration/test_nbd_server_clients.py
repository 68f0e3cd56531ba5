"""NbdServer + FileBackend against real NBD clients nobody here wrote.

Most tests start `python -m replication.nbd_server` on a fresh 64 MiB file and
talk to it with nbdinfo, qemu-io, nbdcopy, libnbd and fio's nbd engine, then
check the backing file itself; the last ones serve an async-only in-memory
backend in-process (the path the replicated backend takes). A missing client
tool fails the test (it is part of the development image), it does not skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import random
import shutil
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvloop

from replication.backend import BackendIOError
from replication.nbd_dispatch import MAX_IN_FLIGHT
from replication.nbd_server import NbdServer

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SIZE = 64 * 1024 * 1024
MiB = 1024 * 1024


@dataclass(frozen=True)
class Served:
    image: Path
    socket: Path
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"


def run(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    tool = shutil.which(argv[0])
    assert tool is not None, f"{argv[0]} is not installed"
    env = {**os.environ, "LC_ALL": "C"}
    result = subprocess.run(
        [tool, *argv[1:]], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    assert result.returncode == 0, f"{argv} rc={result.returncode}\n{result.stdout}{result.stderr}"
    return result


def start_server(image: Path, sock: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "replication.nbd_server", "--file", str(image),
             "--socket", str(sock)],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited rc={proc.returncode}: {log.read_text()}"
        with socket.socket(socket.AF_UNIX) as probe, contextlib.suppress(OSError):
            probe.connect(str(sock))
            return proc
        time.sleep(0.05)
    stop(proc)
    raise AssertionError(f"server never listened: {log.read_text()}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    sock, log = tmp_path / "nbd.sock", tmp_path / "server.log"
    proc = start_server(image, sock, log)
    try:
        yield Served(image, sock, proc, log)
        assert proc.poll() is None, f"server died: {log.read_text()}"
    finally:
        stop(proc)
    assert "Traceback" not in log.read_text(), log.read_text()
    assert not sock.exists(), "socket left behind after SIGTERM"


def read_image(served: Served, offset: int, length: int) -> bytes:
    with open(served.image, "rb") as f:
        f.seek(offset)
        return f.read(length)


def test_socket_is_private(served: Served) -> None:
    mode = os.stat(served.socket).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


def test_nbdinfo_reports_size_block_sizes_and_capabilities(served: Served) -> None:
    info = json.loads(run(["nbdinfo", "--json", served.uri]).stdout)
    assert info["protocol"] == "newstyle-fixed"
    assert info["structured"] is False
    [export] = info["exports"]
    assert export["export-size"] == SIZE
    assert (export["block_size_minimum"], export["block_size_preferred"]) == (512, 4096)
    assert export["block_size_maximum"] == 32 * MiB
    for cap in ("can_fua", "can_trim", "can_zero", "can_flush"):
        assert export[cap] is True, cap
    assert export["can_multi_conn"] is False
    assert export["is_read_only"] is False


def test_unknown_export_name_is_refused(served: Served) -> None:
    argv = ["nbdinfo", f"nbd+unix:///nope?socket={served.socket}"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode != 0
    assert "export" in result.stderr.lower(), result.stderr


def test_qemu_io_patterns_zeroes_discard_fua(served: Served) -> None:
    with open(served.image, "r+b") as f:  # non-zero data where zeroing must land
        f.write(b"\xee" * 4 * MiB)
    commands = [
        "write -P 0xab 0 1M", "read -P 0xab 0 1M",
        "write -z 1M 1M", "read -P 0 1M 1M",
        "discard 2M 1M", "read -P 0 2M 1M",
        "write -f -P 0x11 3M 64k", "read -P 0x11 3M 64k",
        "write -P 0x22 4095k 2k", "read -P 0x22 4095k 2k",  # unaligned to 4k, aligned to 512
        "write -P 0x33 63M 1M", "read -P 0x33 63M 1M",  # the last MiB of the export
        "flush",
    ]  # fmt: skip
    opts = f"driver=nbd,server.type=unix,server.path={served.socket}"
    argv = ["qemu-io", "--image-opts", opts]
    for command in commands:
        argv += ["-c", command]
    out = run(argv).stdout
    assert "fail" not in out.lower(), out
    assert read_image(served, 0, MiB) == b"\xab" * MiB
    assert read_image(served, MiB, 2 * MiB) == bytes(2 * MiB)
    assert read_image(served, 3 * MiB, 64 * 1024) == b"\x11" * 64 * 1024
    assert read_image(served, 3 * MiB + 64 * 1024, 1024) == b"\xee" * 1024
    assert read_image(served, 4095 * 1024, 2048) == b"\x22" * 2048
    assert read_image(served, 63 * MiB, MiB) == b"\x33" * MiB


# Runs under the system python, which has libnbd's bindings. Strict mode off lets
# libnbd send requests it would normally refuse, so the server has to answer them.
PROBE = """
import json, sys, nbd
size = int(sys.argv[2])
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
results = {}
for name, call in [%s]:
    try:
        results[name] = "mismatch" if call() is False else "ok"
    except nbd.Error as exc:
        results[name] = exc.errno  # libnbd gives the errno's name
h.shutdown()
print(json.dumps(results))
"""


def libnbd_probe(uri: str, calls: str) -> dict[str, str]:
    script = PROBE % calls
    result: dict[str, str] = json.loads(
        run(["/usr/bin/python3", "-c", script, uri, str(SIZE)]).stdout
    )
    return result


def test_libnbd_out_of_bounds_requests_get_spec_errors(served: Served) -> None:
    results = libnbd_probe(served.uri, """
        ("read_past_end", lambda: h.pread(4096, size - 512)),
        ("write_past_end", lambda: h.pwrite(b"x" * 4096, size - 512)),
        ("trim_past_end", lambda: h.trim(4096, size)),
        ("zero_past_end", lambda: h.zero(4096, size - 512)),
        ("unaligned_write", lambda: h.pwrite(b"x" * 100, 3)),
        ("read_above_max_payload", lambda: h.pread(33 * 1024 * 1024, 0)),
        ("write", lambda: h.pwrite(b"y" * 4096, 8192)),
        ("read_back", lambda: h.pread(4096, 8192) == b"y" * 4096),
    """)
    assert results == {
        "read_past_end": "EINVAL", "write_past_end": "ENOSPC", "trim_past_end": "EINVAL",
        "zero_past_end": "ENOSPC",
        "unaligned_write": "EINVAL",  # libnbd negotiated the 512-byte minimum
        "read_above_max_payload": "EINVAL", "write": "ok", "read_back": "ok",
    }  # fmt: skip


def test_nbdcopy_round_trip(served: Served, tmp_path: Path) -> None:
    source, back = tmp_path / "source.bin", tmp_path / "back.bin"
    payload = random.Random(7).randbytes(8 * MiB)
    source.write_bytes(payload)
    run(["nbdcopy", str(source), served.uri])
    run(["nbdcopy", served.uri, str(back)])
    copied = back.read_bytes()
    assert len(copied) == SIZE
    assert copied[: 8 * MiB] == payload
    assert copied[8 * MiB :] == bytes(SIZE - 8 * MiB)
    assert read_image(served, 0, 8 * MiB) == payload


def test_fio_random_writes_verify(served: Served) -> None:
    run([
        "fio", "--name=verify", "--ioengine=nbd", f"--uri={served.uri}",
        "--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=32M",
        "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--output-format=json",
    ], timeout=300)  # fmt: skip


def test_fio_large_blocks_two_jobs_verify(served: Served) -> None:
    # Payloads of 1 MiB span many receive chunks and take the thread-pool path.
    run([
        "fio", "--name=big", "--ioengine=nbd", f"--uri={served.uri}", "--rw=randwrite",
        "--bs=1M", "--iodepth=8", "--size=16M", "--numjobs=2", "--offset_increment=16M",
        "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--output-format=json",
    ], timeout=300)  # fmt: skip


def test_stale_socket_is_replaced_and_live_one_is_not(tmp_path: Path) -> None:
    image, sock, log = tmp_path / "disk.img", tmp_path / "nbd.sock", tmp_path / "server.log"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))
    stale.close()  # leaves the file behind, with nobody listening
    proc = start_server(image, sock, log)
    try:
        run(["nbdinfo", "--size", f"nbd+unix:///?socket={sock}"])
        second = subprocess.run(
            [sys.executable, "-m", "replication.nbd_server", "--file", str(image),
             "--socket", str(sock)],
            cwd=REPO, capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert second.returncode != 0
        assert "listening" in second.stderr, second.stderr
        run(["nbdinfo", "--size", f"nbd+unix:///?socket={sock}"])  # the first one is intact
    finally:
        stop(proc)
    assert not sock.exists()


# -- an async-only backend: the task path the replicated backend will take ------


class MemoryBackend:
    """A BlockBackend in RAM with no SyncFastPath. Every call sleeps a random
    fraction of a millisecond, so completions (and replies) come out of order.
    The last MiB fails: reads with EIO, writes with ENOSPC."""

    def __init__(self, size: int) -> None:
        self._buf = bytearray(size)
        self._rng = random.Random(3)
        self._bad = size - MiB

    @property
    def size(self) -> int:
        return len(self._buf)

    async def _pause(self, offset: int, length: int, err: int) -> None:
        await asyncio.sleep(self._rng.random() / 2000)
        if offset + length > self._bad:
            raise BackendIOError(err)

    async def read(self, offset: int, length: int) -> bytes:
        await self._pause(offset, length, errno.EIO)
        return bytes(self._buf[offset : offset + length])

    async def write(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        await self._pause(offset, len(data), errno.ENOSPC)
        self._buf[offset : offset + len(data)] = data

    async def flush(self) -> None:
        await self._pause(0, 0, errno.EIO)

    async def trim(self, offset: int, length: int) -> None:
        await self.write_zeroes(offset, length, False)

    async def write_zeroes(self, offset: int, length: int, no_hole: bool) -> None:
        await self._pause(offset, length, errno.ENOSPC)
        self._buf[offset : offset + length] = bytes(length)


@pytest.fixture
def served_async(tmp_path: Path) -> Iterator[str]:
    """NbdServer on a MemoryBackend in a thread with its own uvloop; yields the URI."""
    sock = tmp_path / "mem.sock"
    loop = uvloop.new_event_loop()
    server = NbdServer(str(sock), MemoryBackend(SIZE))
    thread = threading.Thread(target=loop.run_until_complete, args=(server.serve(),))
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert time.monotonic() < deadline, "in-process server never listened"
            time.sleep(0.02)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        loop.call_soon_threadsafe(server.close)
        thread.join(10)
        loop.close()
    assert not sock.exists()


def test_async_backend_out_of_order_replies_verify(served_async: str) -> None:
    run([
        "fio", "--name=ooo", "--ioengine=nbd", f"--uri={served_async}", "--rw=randrw",
        "--bs=4k", "--iodepth=32", "--size=16M", "--verify=crc32c", "--do_verify=1",
        "--verify_fatal=1", "--output-format=json",
    ], timeout=300)  # fmt: skip


def test_backend_errors_reach_the_client_as_nbd_errors(served_async: str) -> None:
    results = libnbd_probe(served_async, """
        ("write_ok", lambda: h.pwrite(b"q" * 65536, 0)),
        ("read_ok", lambda: h.pread(65536, 0) == b"q" * 65536),
        ("read_bad", lambda: h.pread(4096, size - 4096)),
        ("write_bad", lambda: h.pwrite(b"q" * 4096, size - 4096)),
        ("zero_bad", lambda: h.zero(4096, size - 4096)),
        ("flush", lambda: h.flush()),
    """)
    assert results == {
        "write_ok": "ok", "read_ok": "ok", "read_bad": "EIO", "write_bad": "ENOSPC",
        "zero_bad": "ENOSPC", "flush": "ok",
    }  # fmt: skip


class GatedBackend(MemoryBackend):
    """Flushes wait for a gate; counts how many the server lets in at once."""

    def __init__(self) -> None:
        super().__init__(SIZE)
        self.gate = asyncio.Event()
        self.active = self.peak = 0

    async def flush(self) -> None:
        self.active += 1
        self.peak = max(self.peak, self.active)
        await self.gate.wait()
        self.active -= 1


async def _pipeline_flushes(sock: Path, count: int) -> None:
    backend = GatedBackend()
    server = NbdServer(str(sock), backend)
    await server.start()
    try:
        reader, writer = await asyncio.open_unix_connection(str(sock))
        await reader.readexactly(18)  # NBDMAGIC, IHAVEOPT, handshake flags
        go = struct.pack(">QII", 0x49484156454F5054, 7, 6) + bytes(6)  # GO, default export
        writer.write(struct.pack(">I", 3) + go)
        while True:  # option replies until the ACK
            _magic, _opt, rep, length = struct.unpack(">QIII", await reader.readexactly(20))
            await reader.readexactly(length)
            if rep == 1:
                break
        flush = struct.Struct(">IHHQQI")
        writer.write(b"".join(flush.pack(0x25609513, 0, 3, h, 0, 0) for h in range(count)))
        for _ in range(500):  # until the server stops taking more (bounded: 5 s)
            if backend.active == MAX_IN_FLIGHT:
                break
            await asyncio.sleep(0.01)
        for _ in range(5):  # ... and it stays there: the rest wait in the backlog
            await asyncio.sleep(0)
        assert backend.peak == MAX_IN_FLIGHT
        backend.gate.set()
        replies = [struct.unpack(">IIQ", await reader.readexactly(16)) for _ in range(count)]
        assert sorted(handle for _m, _e, handle in replies) == list(range(count))
        assert {err for _m, err, _h in replies} == {0}
        writer.close()
    finally:
        server.close()


def test_in_flight_requests_are_bounded(tmp_path: Path) -> None:
    asyncio.run(_pipeline_flushes(tmp_path / "gated.sock", MAX_IN_FLIGHT * 3))
