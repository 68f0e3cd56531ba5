"""The registry of direct local writers (replication/local_writers.py), on real processes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from replication import local_writers
from replication.local_writers import LocalWriters, WriterStillAlive, glob_escape


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_live_writer_below_the_epoch_is_stale(tmp_path: Path,
                                                sleeper: subprocess.Popen[bytes]) -> None:
    reg = LocalWriters(tmp_path)
    writer = reg.register("vol-a", 3, pid=sleeper.pid)
    assert reg.stale("vol-a", 4) == [writer]
    assert reg.stale("vol-a", 3) == [], "a fence at the writer's own epoch ends nobody"
    assert reg.stale("vol-b", 9) == [], "another volume's fence ends nobody"


def test_end_kills_and_waits_then_forgets(tmp_path: Path,
                                          sleeper: subprocess.Popen[bytes]) -> None:
    reg = LocalWriters(tmp_path)
    reg.register("vol-a", 1, pid=sleeper.pid)
    asyncio.run(reg.end(reg.stale("vol-a", 2)))
    assert sleeper.wait(timeout=5) == -9
    assert reg.stale("vol-a", 2) == []
    assert list(tmp_path.glob("*.writer")) == []


def test_dead_or_reused_pids_are_not_writers(tmp_path: Path) -> None:
    reg = LocalWriters(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    reg.register("vol-a", 1, pid=proc.pid)
    proc.wait()
    assert reg.stale("vol-a", 2) == [], "an exited writer cannot write"
    assert not (tmp_path / "vol-a.1.writer").exists(), "its entry is cleaned up"
    # A live pid with another start time: a reused pid, not the registered process.
    (tmp_path / "vol-a.1.writer").write_text(json.dumps({"pid": os.getpid(), "start_time": 1}))
    assert reg.stale("vol-a", 2) == []


def test_registrations_are_counted_per_process(tmp_path: Path) -> None:
    reg = LocalWriters(tmp_path)
    first = reg.register("vol-a", 5)
    second = reg.register("vol-a", 5)  # a rejoin's new connection, same process and epoch
    reg.unregister(first)
    assert (tmp_path / "vol-a.5.writer").exists(), "still held by the second registration"
    reg.unregister(second)
    assert not (tmp_path / "vol-a.5.writer").exists()


def test_garbage_entries_are_ignored(tmp_path: Path) -> None:
    reg = LocalWriters(tmp_path)
    (tmp_path / "vol-a.1.writer").write_text("{not json")
    (tmp_path / "vol-a.x.writer").write_text("{}")
    assert reg.stale("vol-a", 2) == []


def test_a_writer_that_will_not_die_fails_the_fence(
    tmp_path: Path, sleeper: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = LocalWriters(tmp_path)
    reg.register("vol-a", 1, pid=sleeper.pid)
    stale = reg.stale("vol-a", 2)
    monkeypatch.setattr(os, "kill", lambda pid, sig: None)  # a D-state stand-in
    monkeypatch.setattr(local_writers, "KILL_WAIT_S", 0.05)
    with pytest.raises(WriterStillAlive):
        asyncio.run(reg.end(stale))


def test_glob_escape_makes_names_literal(tmp_path: Path) -> None:
    (tmp_path / "a[1].1.writer").touch()
    (tmp_path / "a1.1.writer").touch()
    assert [p.name for p in tmp_path.glob(f"{glob_escape('a[1]')}.*.writer")] == ["a[1].1.writer"]
