"""Benchmark: our NBD server (FileBackend) against qemu-nbd on the same file.

Owns one measurement: fio's nbd engine, 4k random writes then 4k random reads at
queue depth 32, against `python -m replication.nbd_server` and against
`qemu-nbd -f raw` (default writeback cache) on the same prefilled file, in one
invocation so the two share a machine state. Prints IOPS, the server's CPU use
and the ratio. Absolute numbers swing up to 40 % between runs here: compare the
ratio, not the figures.

Must not: be imported by product code, or leave servers running.

    .venv/bin/python bench/bench_nbd_local.py [--runtime 10] [--rounds 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")
Starter = Callable[[Path, Path], list[str]]


def ours(image: Path, sock: Path) -> list[str]:
    return [sys.executable, "-m", "replication.nbd_server", "--file", str(image),
            "--socket", str(sock), "--log-level", "WARNING"]  # fmt: skip


def qemu_nbd(image: Path, sock: Path) -> list[str]:
    return ["qemu-nbd", "-f", "raw", "--persistent", "--shared=16", "--socket", str(sock),
            str(image)]  # fmt: skip


SERVERS: dict[str, Starter] = {"tandem": ours, "qemu-nbd": qemu_nbd}


@contextlib.contextmanager
def serving(argv: list[str], sock: Path) -> Iterator[int]:
    """Run a server until it accepts connections; yields its pid, stops it after."""
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read() if proc.stderr else b""
                raise RuntimeError(f"{argv[0]} exited: {err!r}")
            with socket.socket(socket.AF_UNIX) as probe, contextlib.suppress(OSError):
                probe.connect(str(sock))
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} never listened on {sock}")
            time.sleep(0.05)
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def fio(uri: str, rw: str, args: argparse.Namespace) -> float:
    """IOPS of one fio nbd-engine job."""
    argv = [
        "fio", f"--name={rw}", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}",
        f"--bs={args.bs}", f"--iodepth={args.iodepth}", f"--size={args.size}M",
        "--time_based", f"--runtime={args.runtime}", "--output-format=json",
    ]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, check=True, env={
        **os.environ, "LC_ALL": "C"}).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]  # the nbd engine chats on stdout first
    return float(job["write" if "write" in rw else "read"]["iops"])


def measure(name: str, image: Path, sock: Path, args: argparse.Namespace) -> dict[str, float]:
    """{"randwrite": iops, "randwrite_cpu": cores, ...} for one server."""
    result: dict[str, float] = {}
    with serving(SERVERS[name](image, sock), sock) as pid:
        uri = f"nbd+unix:///?socket={sock}"
        for rw in ("randwrite", "randread"):
            cpu0, t0 = cpu_seconds(pid), time.monotonic()
            result[rw] = fio(uri, rw, args)
            result[f"{rw}_cpu"] = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
    return result


def prefill(image: Path, size_mib: int) -> None:
    """Real data everywhere, so reads are not served from holes."""
    with open(image, "wb") as f:
        for _ in range(size_mib):
            f.write(os.urandom(1 << 20))
        f.flush()
        os.fsync(f.fileno())


def report(results: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> None:
    print(f"fio nbd engine, bs={args.bs}, iodepth={args.iodepth}, {args.runtime}s per job, "
          f"{args.rounds} round(s), median shown")  # fmt: skip
    print(f"{'server':<10} {'job':<10} {'IOPS':>10} {'server CPU':>11}  rounds")
    medians: dict[tuple[str, str], float] = {}
    for name, rounds in results.items():
        for rw in ("randwrite", "randread"):
            iops = statistics.median(r[rw] for r in rounds)
            cpu = statistics.median(r[f"{rw}_cpu"] for r in rounds)
            medians[name, rw] = iops
            each = " ".join(f"{r[rw]:,.0f}" for r in rounds)
            print(f"{name:<10} {rw:<10} {iops:>10,.0f} {cpu:>10.0%}  {each}")
    for rw in ("randwrite", "randread"):
        ratio = medians["tandem", rw] / medians["qemu-nbd", rw]
        print(f"ratio tandem/qemu-nbd {rw}: {ratio:.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runtime", type=int, default=10, help="seconds per fio job")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds per server")
    parser.add_argument("--size", type=int, default=256, help="export size in MiB")
    parser.add_argument("--bs", default="4k")
    parser.add_argument("--iodepth", type=int, default=32)
    parser.add_argument("--dir", default=None, help="where to put the image (default: $TMPDIR)")
    args = parser.parse_args()
    for tool in ("fio", "qemu-nbd"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed")
    results: dict[str, list[dict[str, float]]] = {name: [] for name in SERVERS}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        image, sock = Path(tmp) / "disk.img", Path(tmp) / "nbd.sock"
        prefill(image, args.size)
        for round_no in range(args.rounds):
            # Alternate who goes first so neither always gets the warmer cache.
            order = list(SERVERS) if round_no % 2 == 0 else list(reversed(SERVERS))
            for name in order:
                results[name].append(measure(name, image, sock, args))
    report(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
