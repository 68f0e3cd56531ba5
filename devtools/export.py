"""Serve a volume's NBD export without attaching it: a dev/test tool (``tandem volume export``).

``export_volume`` does what NodeStageVolume does up to the attach: it takes ownership of the
volume as a cluster node (epoch CAS, so every earlier writer is fenced) and starts the
volume's target process (``csi_driver.node.target_main``) -- but in the *root* network namespace,
where it reaches etcd on the host endpoint and every replica over the bridge, and serves
the NBD export on a unix socket of the caller's choosing. NBD clients (nbdinfo, qemu-io,
nbdcopy, fio's nbd engine, benchmarks) then talk to the real replicated data path, with no
FUSE or loop device in between.

The handle owns no event loop state (a plain ``Popen`` and a fresh etcd client per
operation), so one ``asyncio.run`` may export and another stop.

Must not: touch the node processes, attach or mount anything, or leave the target running
or the volume owned when the export fails half-way.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from csi_driver.node.ownership import OwnerLease, Ownership
from csi_driver.node.targets import lease_args
from csi_driver.state.etcd import EtcdStore
from devtools.devcluster import ClusterSpec, cluster_secret_path, load_spec
from replication.command import start_daemon

READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 15.0
_TAIL_LINES = 20


class ExportError(Exception):
    """The export could not be started; the message carries the target's last words."""


@dataclass
class ExportHandle:
    """A running export: its target process, socket and the ownership it holds."""

    cluster_dir: Path
    volume_id: str
    node_id: str
    socket_path: Path
    log_path: Path
    proc: subprocess.Popen[bytes]
    returncode: int | None = field(default=None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def uri(self) -> str:
        """The NBD URI of the export (the default export name is accepted)."""
        return f"nbd+unix:///?socket={self.socket_path}"

    def running(self) -> bool:
        return self.proc.poll() is None

    async def stop(self) -> int:
        """SIGTERM the target (it flushes every replica), wait, release ownership.

        Idempotent. Returns the target's exit status (0 after a clean flush).
        """
        if self.returncode is None:
            self.returncode = await asyncio.to_thread(_terminate, self.proc)
        async with _store(load_spec(self.cluster_dir)) as store:
            await Ownership(store, self.node_id, spec_ttl(self.cluster_dir)).release(
                self.volume_id)
        return self.returncode


@contextlib.asynccontextmanager
async def _store(spec: ClusterSpec) -> AsyncIterator[EtcdStore]:
    store = EtcdStore([spec.etcd_host_endpoint], prefix=spec.etcd_prefix)
    try:
        yield store
    finally:
        await store.close()


def _terminate(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM, wait up to the grace period, then SIGKILL; returns the exit status."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
    return proc.returncode


def tail(path: Path, lines: int = _TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    kept = [ln for ln in text.splitlines() if ln.strip()][-lines:]
    return "\n".join(kept) if kept else "(empty log)"


def spec_ttl(cluster_dir: Path) -> int:
    return int(load_spec(cluster_dir).lease_ttl_s)


def _argv(spec: ClusterSpec, volume_id: str, node_id: str, socket_path: Path,
          state_dir: Path, lease: OwnerLease) -> list[str]:
    return [
        sys.executable, "-m", "csi_driver.node.target_main",
        "--volume-id", volume_id, "--node-id", node_id, "--socket", str(socket_path),
        "--etcd-endpoints", spec.etcd_host_endpoint, "--etcd-prefix", spec.etcd_prefix,
        "--state-dir", str(state_dir), *lease_args(lease),
        "--cluster-secret-file", str(cluster_secret_path(Path(spec.dir))),
    ]


def _await_ready(proc: subprocess.Popen[bytes], timeout_s: float) -> tuple[bytes, bool]:
    """The target's first stdout line (b"" if it exited), and whether it timed out."""
    assert proc.stdout is not None
    # readline() cannot time out by itself; killing the process closes the pipe and so
    # unblocks it, which bounds the wait.
    timer = _Killer(proc, timeout_s)
    try:
        return proc.stdout.readline(), timer.fired
    finally:
        timer.cancel()


class _Killer:
    """Kills a process after a delay unless cancelled first (bounds a blocking read)."""

    def __init__(self, proc: subprocess.Popen[bytes], delay_s: float) -> None:
        self.fired = False
        self._proc = proc
        self._timer = threading.Timer(delay_s, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        self.fired = True
        with contextlib.suppress(ProcessLookupError):
            self._proc.kill()

    def cancel(self) -> None:
        self._timer.cancel()


async def export_volume(
    cluster_dir: Path, volume_id: str, as_node: str, socket_path: Path,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> ExportHandle:
    """Own ``volume_id`` (id or name) as ``as_node`` and serve its NBD export on
    ``socket_path``; raise ExportError (with the target's stderr tail) if it cannot."""
    cluster_dir = Path(cluster_dir).resolve()
    spec = load_spec(cluster_dir)
    spec.node(as_node)  # ClusterError for a node the cluster does not have
    async with _store(spec) as store:
        volume_id = await store.volume_id_for_name(volume_id) or volume_id
        ownership = Ownership(store, as_node, int(spec.lease_ttl_s))
        await ownership.acquire(volume_id)
        lease = ownership.lease(volume_id)
        assert lease is not None
    try:
        # The claim's lease lapses if the target does not start renewing it within a TTL:
        # the target then regains the claim at the same epoch (or stops, if overtaken).
        handle = _spawn(cluster_dir, spec, volume_id, as_node, Path(socket_path), lease)
        try:
            line, timed_out = await asyncio.to_thread(_await_ready, handle.proc,
                                                      ready_timeout_s)
        except BaseException:
            _terminate(handle.proc)  # also unblocks the reading thread
            raise
        if line.strip() != b"READY":
            rc = _terminate(handle.proc)
            why = f"was not READY within {ready_timeout_s:g} s" if timed_out else "exited"
            raise ExportError(f"target for volume {volume_id} as {as_node} {why} "
                              f"(rc={rc}):\n{tail(handle.log_path)}")
        return handle
    except BaseException:
        async with _store(spec) as store:
            await ownership.release(volume_id)
        raise


def _spawn(cluster_dir: Path, spec: ClusterSpec, volume_id: str, node_id: str,
           socket_path: Path, lease: OwnerLease) -> ExportHandle:
    state_dir = cluster_dir / "exports" / node_id
    state_dir.mkdir(parents=True, exist_ok=True)
    log_path = state_dir / f"{volume_id}.log"
    with open(log_path, "ab") as log:
        log.write(f"=== export as {node_id} at {time.strftime('%H:%M:%S')} ===\n".encode())
        log.flush()
        # Own session: a Ctrl-C in the terminal reaches the CLI, which stops the target
        # in order (flush, then release ownership), not both at once.
        proc = start_daemon(_argv(spec, volume_id, node_id, socket_path, state_dir, lease),
                            stdout=subprocess.PIPE, stderr=log,
                            env_extra={"PYTHONUNBUFFERED": "1"})
    return ExportHandle(cluster_dir, volume_id, node_id, socket_path, log_path, proc)


async def run_until_signalled(
    cluster_dir: Path, volume: str, as_node: str, socket_path: Path,
) -> int:
    """``tandem volume export``: serve until SIGINT/SIGTERM or the target exits."""
    handle = await export_volume(cluster_dir, volume, as_node, socket_path)
    print(f"exporting volume {handle.volume_id} as {as_node}: {handle.uri} "
          f"(target pid {handle.pid}, log {handle.log_path}); Ctrl-C stops", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        # Bounded by the signal or the target's own exit, checked twice a second.
        while not stop.is_set() and handle.running():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
        died = not handle.running()
    finally:
        rc = await handle.stop()
    if died:
        print(f"target exited unexpectedly (rc={rc}):\n{tail(handle.log_path)}",
              file=sys.stderr)
        return 1
    print(f"export stopped (target rc={rc}), ownership released", flush=True)
    return 0 if rc == 0 else 1
