"""Dev-cluster processes: start detached, identify by pid, stop, reap, probe readiness.

Owns the lifecycle of the long-lived processes a dev cluster runs (etcd, controller,
nodes): spawning them in their own session with output to a log file, telling a live
process from a reused pid (``/proc/PID/stat`` start time), SIGTERM -> grace -> SIGKILL,
and reaping. Processes spawned by *this* Python process are kept in a registry so they
are always ``wait()``-ed (PID 1 here does not reap orphans); ones started by an earlier
CLI invocation are watched through ``/proc`` instead.

Also owns the readiness checks (etcd /health, CSI Identity Probe). It must not touch
networking or the on-disk ledger.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from devtools.devcluster.spec import ClusterError, ProcRecord
from replication.command import start_daemon
from replication.proc_identity import start_ticks

_children: dict[int, subprocess.Popen[bytes]] = {}
_POLL_S = 0.05


def spawn(
    name: str, argv: Sequence[str], log: Path, *, netns: str | None = None,
    prefix: Sequence[str] = (), append_log: bool = False,
) -> ProcRecord:
    """Start argv detached (own session) with stdout+stderr to log; return its record."""
    with open(log, "ab" if append_log else "wb") as out:
        proc = start_daemon([*prefix, *argv], stdout=out, stderr=subprocess.STDOUT,
                            env_extra={"PYTHONUNBUFFERED": "1"})
    _children[proc.pid] = proc
    # The process may already have died; 0 then never matches a live process.
    ticks = start_ticks(proc.pid) or 0
    return ProcRecord(name=name, pid=proc.pid, start_ticks=ticks, log=str(log), netns=netns)


def is_running(rec: ProcRecord) -> bool:
    if rec.pid in _children and _children[rec.pid].poll() is not None:
        return False
    return start_ticks(rec.pid) == rec.start_ticks


def returncode(rec: ProcRecord) -> int | None:
    """Exit status when known: only for processes this Python process spawned."""
    child = _children.get(rec.pid)
    return None if child is None else child.poll()


def _reaped(pid: int) -> bool:
    """Reap pid if it is our child and has exited; True once it is gone for good."""
    child = _children.get(pid)
    if child is not None:
        return child.poll() is not None
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return start_ticks(pid) is None  # not ours: gone or a zombie of someone else
    return done == pid


def _signal_pid(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def kill_pids(pids: Iterable[int], timeout_s: float = 10.0) -> list[int]:
    """SIGKILL pids and wait until each is gone; return those still present afterwards."""
    pending = set(pids)
    for pid in pending:
        _signal_pid(pid, signal.SIGKILL)
    return _wait_gone(pending, timeout_s)


def _wait_gone(pids: set[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    pending = set(pids)
    while pending:
        pending = {pid for pid in pending if not _reaped(pid)}
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(_POLL_S)
    # Reaped Popen objects stay registered: they remember the exit status for status().
    return sorted(pending)


def stop(records: Sequence[ProcRecord], grace_s: float = 10.0) -> list[ProcRecord]:
    """SIGTERM, grace, then SIGKILL the process (and its group); always wait.

    Returns the records that are still alive at the end (should be none).
    """
    live = [rec for rec in records if is_running(rec)]
    for rec in live:
        _signal_pid(rec.pid, signal.SIGTERM)
    left = set(_wait_gone({rec.pid for rec in live}, grace_s))
    for rec in live:
        if rec.pid in left and is_running(rec):
            # Our own session: the group holds helpers the process spawned (e.g. nbdfuse).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(rec.pid, signal.SIGKILL)
            _signal_pid(rec.pid, signal.SIGKILL)
    still = set(_wait_gone(left, 10.0))
    # Ones that had already exited on their own still need reaping.
    _wait_gone({rec.pid for rec in records if rec.pid in _children} - still, 1.0)
    return [rec for rec in records if rec.pid in still]


def group_pids(pgid: int) -> set[int]:
    """Live pids whose process group is pgid (helpers a node spawned share its group)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            found.add(int(entry.name))
    return found


def wait_ready(
    checks: Mapping[str, Callable[[], bool]], watch: Sequence[ProcRecord], deadline: float,
) -> None:
    """Poll checks until all pass; fail fast, naming the process, if a watched one exits."""
    pending = dict(checks)
    while True:
        for rec in watch:
            if not is_running(rec):
                rc = returncode(rec)
                raise ClusterError(
                    f"{rec.name} (pid {rec.pid}) exited (rc={rc}) before it was "
                    f"ready; last 20 lines of {rec.log}:\n{log_tail(rec.log)}"
                )
        pending = {name: check for name, check in pending.items() if not check()}
        if not pending:
            return
        if time.monotonic() > deadline:
            logs = {rec.name: rec.log for rec in watch}
            tails = "\n".join(
                f"--- {name}: last 20 lines of {logs[name]}:\n{log_tail(logs[name])}"
                for name in pending if name in logs
            )
            raise ClusterError(f"not ready before the deadline: {', '.join(pending)}\n{tails}")
        time.sleep(0.1)


def log_tail(path: str | Path, lines: int = 20) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def free_port(host: str) -> int:
    """A port free right now on host (the caller binds it soon after; races are rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def etcd_healthy(host_endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(f"{host_endpoint}/health", timeout=1.0) as resp:
            body = json.loads(resp.read())
    except (OSError, urllib.error.URLError, ValueError):
        return False
    return bool(body.get("health") == "true")


def csi_ready(endpoint: str) -> bool:
    """CSI Identity Probe answered and ready is not false."""
    # Imported here: only the readiness path needs grpc and the generated stubs.
    import grpc

    from csi_driver._gen import csi_pb2, csi_pb2_grpc

    path = endpoint.removeprefix("unix://")
    if not os.path.exists(path):
        return False
    with grpc.insecure_channel(endpoint) as channel:
        try:
            resp = csi_pb2_grpc.IdentityStub(channel).Probe(csi_pb2.ProbeRequest(), timeout=1.0)
        except grpc.RpcError:
            return False
    return not resp.HasField("ready") or bool(resp.ready.value)
