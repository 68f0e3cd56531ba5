"""EtcdServer: runs a private single-member etcd process (tests, dev clusters).

Starts ``/usr/bin/etcd`` with its own data dir, ports and log file, waits until
it answers ``/health``, and stops it by SIGTERM (SIGKILL after a grace period),
always reaping the child: PID 1 in our containers does not reap orphans, so an
un-waited etcd would linger as a zombie. Timings are tuned for fast failure
detection on loopback (10 ms heartbeat, 50 ms election timeout).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from replication.command import start_daemon

ETCD_BINARY = "/usr/bin/etcd"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (bind to 0, read, release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class EtcdServer:
    """One etcd member listening on ``http://host:client_port``."""

    def __init__(
        self,
        data_dir: Path,
        host: str = "127.0.0.1",
        client_port: int | None = None,
        peer_port: int | None = None,
        name: str = "default",
        binary: str = ETCD_BINARY,
        log_path: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.data_dir = data_dir
        self.host = host
        self.client_port = client_port or free_port(host)
        self.peer_port = peer_port or free_port(host)
        while self.peer_port == self.client_port:
            self.peer_port = free_port(host)
        self.name = name
        self.binary = binary
        self.log_path = log_path or data_dir.with_name(data_dir.name + ".log")
        self.extra_args = list(extra_args)
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def command(self) -> list[str]:
        return [
            self.binary,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.endpoint,
            "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", f"{self.name}={self.peer_url}",
            "--initial-cluster-state", "new",
            "--heartbeat-interval", "10",
            "--election-timeout", "50",
            "--logger", "zap",
            "--log-outputs", "stderr",
            *self.extra_args,
        ]

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def healthy(self, timeout_s: float = 1.0) -> bool:
        """True if etcd reports itself healthy (it has a leader and serves reads)."""
        try:
            with urllib.request.urlopen(f"{self.endpoint}/health", timeout=timeout_s) as resp:
                body = json.loads(resp.read())
        except (OSError, urllib.error.URLError, ValueError):
            return False
        return isinstance(body, dict) and body.get("health") == "true"

    def start(self, timeout: float = 30.0) -> None:
        """Start etcd and wait until healthy; on failure stop it and raise RuntimeError."""
        if self.running():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (lives as long as etcd)
        # Own session: a Ctrl-C aimed at pytest must not kill etcd before the fixture's
        # teardown has a chance to stop it cleanly.
        self._proc = start_daemon(self.command(), stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self.stop()
                raise RuntimeError(f"etcd exited with {code} during start:\n{self.log_tail()}")
            if self.healthy(timeout_s=0.5):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"etcd not healthy after {timeout} s:\n{self.log_tail()}")

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM, wait up to ``grace_s``, then SIGKILL; always reaps. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            else:
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """SIGKILL (a crash, not a shutdown) and reap."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        self.stop()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
