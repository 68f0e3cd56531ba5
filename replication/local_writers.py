"""Which processes on this node write a local replica directly, and at which epoch.

A volume's target on a node that holds one of its replicas writes that replica through its
own descriptor instead of a TCP round trip through the node's replica server (a third of
the fan-out work for 3 replicas, and every read). A descriptor cannot be revoked, so fencing
that replica (I3: refuse lower epochs forever) must end the process holding it: each direct
writer registers here (one small file per volume and epoch, with its pid and start time);
the replica server, fencing a replica at epoch E, raises the durable fence first (every TCP
request below E is refused from then on), then SIGKILLs every live writer registered below E
and waits until it is gone before it answers. The files live in a directory of the node's
state, so a restarted node process still finds writers its predecessor started.

A writer registers after its own FENCE succeeded and before it opens the descriptor, then
proves with a STAT that nobody fenced higher in between (``LocalReplica`` does this): a
FENCE that lands before the registration is seen by that STAT, one after it finds the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from replication.proc_identity import start_ticks

log = logging.getLogger(__name__)

KILL_WAIT_S = 10.0  # a writer stuck in the kernel longer than this fails the fence (EIO)
_POLL_S = 0.005
_NAME = re.compile(r"^(?P<volume>.+)\.(?P<epoch>[0-9]+)\.writer$")


class WriterStillAlive(Exception):
    """A stale direct writer did not die in time: the fence must not be acknowledged."""


@dataclass(frozen=True, slots=True)
class Writer:
    volume_id: str
    epoch: int
    pid: int
    start_time: int  # /proc/<pid>/stat field 22: tells a reused pid from ours


class LocalWriters:
    """The registry of direct local writers, one directory per node."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Registrations this process holds (several LocalReplica objects over a volume's
        # life, e.g. after a rejoin): the file goes only when the last one lets go.
        self._held: dict[Writer, int] = {}

    def _path(self, volume_id: str, epoch: int) -> Path:
        return self.directory / f"{volume_id}.{epoch}.writer"

    # -- the writer's side ----------------------------------------------------------------

    def register(self, volume_id: str, epoch: int, pid: int | None = None) -> Writer:
        """Record ``pid`` (default: this process) as a direct writer of the replica."""
        pid = os.getpid() if pid is None else pid
        start = start_ticks(pid)
        if start is None:
            raise ProcessLookupError(f"process {pid} is not running")
        writer = Writer(volume_id, epoch, pid, start)
        path = self._path(volume_id, epoch)
        tmp = path.with_name(f".{path.name}.{pid}.tmp")
        tmp.write_text(json.dumps({"pid": pid, "start_time": start}))
        os.replace(tmp, path)  # no fsync: after a reboot no registered process is alive
        self._held[writer] = self._held.get(writer, 0) + 1
        return writer

    def unregister(self, writer: Writer) -> None:
        """Drop one registration; the entry goes with the last one (and only if it is still
        ours: a pid is never trusted alone)."""
        held = self._held.get(writer, 0) - 1
        if held > 0:
            self._held[writer] = held
            return
        self._held.pop(writer, None)
        if self._read(self._path(writer.volume_id, writer.epoch)) == writer:
            with contextlib.suppress(FileNotFoundError):
                self._path(writer.volume_id, writer.epoch).unlink()

    # -- the fencing side -----------------------------------------------------------------

    def _read(self, path: Path) -> Writer | None:
        match = _NAME.match(path.name)
        if match is None:
            return None
        try:
            doc = json.loads(path.read_text())
            return Writer(match["volume"], int(match["epoch"]), int(doc["pid"]),
                          int(doc["start_time"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def stale(self, volume_id: str, epoch: int) -> list[Writer]:
        """Live writers of ``volume_id`` registered below ``epoch``; dead entries are removed."""
        found = []
        for path in self.directory.glob(f"{glob_escape(volume_id)}.*.writer"):
            writer = self._read(path)
            if writer is None or writer.volume_id != volume_id or writer.epoch >= epoch:
                continue
            if start_ticks(writer.pid) == writer.start_time:
                found.append(writer)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        return found

    async def end(self, writers: list[Writer]) -> None:
        """SIGKILL each writer and wait until none can write any more."""
        deadline = time.monotonic() + KILL_WAIT_S
        for writer in writers:
            if start_ticks(writer.pid) != writer.start_time:
                continue
            log.warning("volume=%s epoch=%d fenced: killing direct writer pid=%d",
                        writer.volume_id, writer.epoch, writer.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(writer.pid, signal.SIGKILL)
        for writer in writers:
            while start_ticks(writer.pid) == writer.start_time:
                if time.monotonic() > deadline:
                    raise WriterStillAlive(
                        f"direct writer pid={writer.pid} of {writer.volume_id} (epoch "
                        f"{writer.epoch}) still alive {KILL_WAIT_S:g} s after SIGKILL"
                    )
                await asyncio.sleep(_POLL_S)
            with contextlib.suppress(FileNotFoundError):
                self._path(writer.volume_id, writer.epoch).unlink()


def glob_escape(name: str) -> str:
    """``name`` with glob metacharacters made literal (volume ids are validated, but a
    replica id reaching the fence path comes from the wire)."""
    return re.sub(r"([*?\[])", r"[\1]", name)
