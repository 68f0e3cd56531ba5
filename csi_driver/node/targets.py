"""Starts, stops and re-adopts the per-volume target processes of this node (``target_main``).

Each target is started by the node process: its first stdout line says ``READY`` once the
NBD export serves, or ``FAILED <reason>`` when the volume cannot be served (e.g. "none of the
in-sync replicas could be fenced"); its log goes to ``<state_dir>/targets/<volume>.log``, and
a reaper task waits for it so no zombie is left. The stage never waits on the child's exit:
a failed target's teardown happens in the background, bounded by STOP_GRACE_S and SIGKILL.

A target outlives the node process that started it (it keeps its own claim's lease alive and
serves its export by itself), so a restart of the node process must not interrupt a volume's
I/O, and the new process must be able to stop what the old one started. Each ready target
therefore has ``<volume>.pid`` (pid and start time); ``adopt`` takes back every target whose
identity still matches after a restart and removes stale files. An adopted target is not our
child: it is stopped by signal and watched by identity, not waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
import stat
import sys
import tempfile
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from csi_driver import errors
from csi_driver.config import NodeConfig
from csi_driver.node.ownership import OwnerLease
from replication.atomic_file import write_atomic
from replication.command import start_piped
from replication.proc_identity import start_ticks

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 60.0
_SUN_PATH_MAX = 100
STOP_GRACE_S = 15.0
_GONE_POLL_S = 0.05


@dataclass(frozen=True)
class Adopted:
    """A target a previous node process started: identified by pid and start time."""

    pid: int
    start: int

    def alive(self) -> bool:
        return start_ticks(self.pid) == self.start


class TargetProcesses:
    def __init__(self, config: NodeConfig,
                 local_replica: Callable[[str], str | None] = lambda _volume_id: None) -> None:
        """``local_replica(volume_id)``: the path of this node's replica of the volume, if
        any; the target then does its I/O on it directly (fenced through local_writers)."""
        self._config = config
        self._local_replica = local_replica
        self._dir = private_dir(config.state_dir / "targets")
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._adopted: dict[str, Adopted] = {}
        self._spare: asyncio.subprocess.Process | None = None
        self._preparing = False
        self._tasks: set[asyncio.Task[None]] = set()

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    def socket_path(self, volume_id: str) -> Path:
        path = self._dir / f"{volume_id}.nbd.sock"
        if len(str(path)) < _SUN_PATH_MAX:
            return path
        # A unix socket path must fit sun_path (108 bytes); deep state dirs (tests) do not.
        digest = hashlib.sha256(str(self._dir).encode()).hexdigest()[:12]
        short = private_dir(Path(tempfile.gettempdir()) / f"tandem-{digest}")
        return short / f"{volume_id}.sock"

    def running(self, volume_id: str) -> bool:
        proc = self._procs.get(volume_id)
        if proc is not None:
            return proc.returncode is None
        adopted = self._adopted.get(volume_id)
        return adopted is not None and adopted.alive()

    def adopt(self) -> list[str]:
        """Take back the targets a previous node process left running; forget the rest.
        Returns the adopted volumes. Call once, before serving."""
        for path in sorted(self._dir.glob("*.pid")):
            volume_id = path.name.removesuffix(".pid")
            try:
                data = json.loads(path.read_bytes())
                target = Adopted(int(data["pid"]), int(data["start"]))
            except (OSError, ValueError, KeyError, TypeError):
                target = None
            if target is not None and target.alive():
                self._adopted[volume_id] = target
                log.info("volume=%s node=%s target pid=%d adopted (left running by the "
                         "previous node process)", volume_id, self._config.node_id, target.pid)
            else:
                path.unlink(missing_ok=True)
        return sorted(self._adopted)

    def _pidfile(self, volume_id: str) -> Path:
        return self._dir / f"{volume_id}.pid"

    def _remember(self, volume_id: str, pid: int) -> None:
        start = start_ticks(pid)
        if start is None:
            return  # gone already: the reaper sees it
        try:
            write_atomic(self._pidfile(volume_id),
                         json.dumps({"pid": pid, "start": start}).encode())
        except OSError as exc:
            # Serving goes on; only a restart of this process could not take it back.
            log.warning("volume=%s node=%s cannot record target pid %d: %s", volume_id,
                        self._config.node_id, pid, exc)

    async def _argv(self, volume_id: str, lease: OwnerLease) -> list[str]:
        c = self._config
        argv = [
            "--volume-id", volume_id, "--node-id", c.node_id,
            "--socket", str(self.socket_path(volume_id)),
            "--etcd-endpoints", ",".join(c.etcd.endpoints), "--etcd-prefix", c.etcd.prefix,
            "--state-dir", str(self._dir), *lease_args(lease),
            "--cluster-secret-file", str(c.cluster_secret_file),
            "--hold-io-timeout", str(c.hold_io_s),
            "--log-file", str(self._dir / f"{volume_id}.log"),
        ]
        # A pool lookup may run a tool (lvs, ~65 ms): never on the node's event loop.
        if c.tls_cert_file and c.tls_key_file:
            argv += ["--tls-cert-file", str(c.tls_cert_file),
                     "--tls-key-file", str(c.tls_key_file)]
            if c.tls_trust_file:
                argv += ["--tls-trust-file", str(c.tls_trust_file)]
        local = await asyncio.to_thread(self._local_replica, volume_id)
        if local is not None:
            argv += ["--local-replica-path", local,
                     "--local-writers-dir", str(local_writers_dir(c.state_dir))]
        return argv

    async def _spawn(self, args: list[str]) -> asyncio.subprocess.Process:
        with open(self._dir / "standby.log", "ab") as log_file:
            return await start_piped(
                [sys.executable, "-m", "csi_driver.node.target_main", *args], stderr=log_file)

    async def prepare(self) -> None:
        """Keep one warm standby target (imports done) for the next stage."""
        if self._preparing or (self._spare is not None and self._spare.returncode is None):
            return  # one spare at a time: two racing stages must not leak a second one
        self._preparing = True
        try:
            self._spare = await self._spawn(["--standby"])
        finally:
            self._preparing = False

    async def _launch(self, volume_id: str, lease: OwnerLease) -> asyncio.subprocess.Process:
        spare, self._spare = self._spare, None
        argv = await self._argv(volume_id, lease)
        if spare is not None and spare.returncode is None and spare.stdin is not None:
            try:
                spare.stdin.write(json.dumps(argv).encode() + b"\n")
                await spare.stdin.drain()
                spare.stdin.close()
                return spare
            except (BrokenPipeError, ConnectionResetError):
                await self._kill(spare)
        return await self._spawn(argv)

    async def start(self, volume_id: str, lease: OwnerLease) -> Path:
        """Start the target, handing it the lease our claim on the volume is bound to."""
        if self.running(volume_id):
            return self.socket_path(volume_id)
        log_path = self._dir / f"{volume_id}.log"
        proc = await self._launch(volume_id, lease)
        self._background(self.prepare())
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), READY_TIMEOUT_S)
        except TimeoutError:
            await self._kill(proc)
            raise errors.UnavailableError(
                f"volume {volume_id}: target not ready within {READY_TIMEOUT_S:g} s "
                f"(killed); its last log line: {_last_line(log_path)}"
            ) from None
        except BaseException:
            await self._kill(proc)
            raise
        if line.strip() != b"READY":
            self._background(self._reap_failed(volume_id, proc))
            reason = line.decode(errors="replace").strip().removeprefix("FAILED").strip()
            raise errors.UnavailableError(
                f"volume {volume_id} cannot be served: {reason or _last_line(log_path)}"
            )
        self._procs[volume_id] = proc
        self._remember(volume_id, proc.pid)
        self._background(self._reap(volume_id, proc))
        log.info("volume=%s node=%s target pid=%d ready", volume_id, self._config.node_id,
                 proc.pid)
        return self.socket_path(volume_id)

    def condition(self, volume_id: str) -> tuple[bool, str]:
        """(abnormal, message) of a staged volume, as its target last published it."""
        if not self.running(volume_id):
            return True, "the volume's target process is not running: restage it"
        path = self._dir / f"{volume_id}.condition.json"
        try:
            data = json.loads(path.read_bytes())
            return bool(data["abnormal"]), str(data["message"])
        except (OSError, ValueError, KeyError, TypeError):
            return False, "serving (no condition published yet)"

    async def _reap(self, volume_id: str, proc: asyncio.subprocess.Process) -> None:
        rc = await proc.wait()
        level = logging.INFO if rc == 0 else logging.ERROR
        log.log(level, "volume=%s node=%s target exited rc=%s", volume_id,
                self._config.node_id, rc)
        if self._procs.get(volume_id) is proc:
            del self._procs[volume_id]
            self._pidfile(volume_id).unlink(missing_ok=True)

    async def stop(self, volume_id: str) -> None:
        proc = self._procs.get(volume_id)
        if proc is not None:
            await self._kill(proc)
        adopted = self._adopted.pop(volume_id, None)
        if adopted is not None:
            await _stop_adopted(volume_id, adopted)
            self._pidfile(volume_id).unlink(missing_ok=True)

    @staticmethod
    async def _reap_failed(volume_id: str, proc: asyncio.subprocess.Process) -> None:
        """A failed target releases its claim and exits by itself; SIGKILL it if it hangs."""
        try:
            await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
        except TimeoutError:
            log.error("volume=%s failed target pid=%d still running after %g s: killed",
                      volume_id, proc.pid, STOP_GRACE_S)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    @staticmethod
    async def _kill(proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()

    async def close_standby(self) -> None:
        spare, self._spare = self._spare, None
        if spare is not None:
            await self._kill(spare)


def private_dir(path: Path) -> Path:
    """``path`` as a directory only we can enter (0700, owned by us, not a symlink), made
    if absent. A socket in a directory someone else made (say a local user who pre-created
    ``/tmp/tandem-<hash>``) could be replaced under us: refuse it (issue 11 #7)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise errors.FailedPreconditionError(
            f"{path} is not a directory owned by uid {os.geteuid()}: refusing to put sockets "
            "there")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)  # ours: tighten it (an older release made it 0755)
    return path


async def _stop_adopted(volume_id: str, target: Adopted) -> None:
    """SIGTERM (the target flushes and releases its claim), SIGKILL after STOP_GRACE_S; wait
    until the identity is gone (init reaps it: it is not our child)."""
    for sig, grace in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, STOP_GRACE_S)):
        if not target.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(target.pid, sig)
        deadline = asyncio.get_running_loop().time() + grace
        while target.alive() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(_GONE_POLL_S)
    if target.alive():
        log.error("volume=%s adopted target pid=%d survived SIGKILL", volume_id, target.pid)


def lease_args(lease: OwnerLease) -> list[str]:
    """The target's arguments that hand it the claim's lease (and when it was granted)."""
    return ["--owner-lease", hex(lease.lease_id), "--lease-ttl", str(lease.ttl_s),
            "--lease-granted-at", repr(lease.granted_monotonic)]


def local_writers_dir(state_dir: Path) -> Path:
    """Where this node's targets register as direct writers of its replicas (the replica
    server reads it when fencing)."""
    return state_dir / "local-writers"


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "target exited (no log)"
    return lines[-1] if lines else "target exited without a message"
