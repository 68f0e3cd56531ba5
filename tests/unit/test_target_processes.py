"""How the node hears from its per-volume target processes (csi_driver/node/targets.py).

The children here are real processes running tiny scripts that speak the target's stdout
protocol (READY / FAILED <reason> / nothing), so the node side is checked without etcd:
a stage must never wait on a failed child's exit, and a silent child is killed and reported
as UNAVAILABLE, not leaked as a bare TimeoutError (INTERNAL).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from csi_driver import errors
from csi_driver.config import EtcdConfig, NodeConfig
from csi_driver.node import targets
from csi_driver.node.ownership import OwnerLease

LEASE = OwnerLease(0x1234, 2, 100.0)


def _config(tmp_path: Path) -> NodeConfig:
    return NodeConfig(
        node_id="node-1", csi_socket=tmp_path / "csi.sock", agent_listen=("127.0.0.1", 1),
        replica_listen=("127.0.0.1", 2), etcd=EtcdConfig(("http://127.0.0.1:1",), "/t/"),
        pool_kind="file", pool_dir=tmp_path / "pool", pool_size=1 << 20, lvm_vg=None,
        lvm_thin_pool=None, state_dir=tmp_path / "state", cluster_secret_file=tmp_path / "s",
        agent_public_key_file=tmp_path / "p",
    )


class ScriptedTargets(targets.TargetProcesses):
    """Children run ``script`` instead of target_main (no standby: every stage spawns)."""

    def __init__(self, config: NodeConfig, script: str) -> None:
        super().__init__(config)
        self.script = script
        self.spawned: list[asyncio.subprocess.Process] = []

    async def _spawn(self, args: list[str]) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", self.script,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        )
        self.spawned.append(proc)
        return proc

    async def prepare(self) -> None:
        return None


def _run(tmp_path: Path, script: str, check: object) -> None:
    async def go() -> None:
        procs = ScriptedTargets(_config(tmp_path), script)
        try:
            await check(procs)  # type: ignore[operator]
        finally:
            for proc in procs.spawned:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()

    asyncio.run(go())


def test_ready_child_serves(tmp_path: Path) -> None:
    async def check(procs: ScriptedTargets) -> None:
        path = await procs.start("vol-a", LEASE)
        assert path == procs.socket_path("vol-a")
        assert procs.running("vol-a")
        await procs.stop("vol-a")
        assert not procs.running("vol-a")

    _run(tmp_path, "import time; print('READY', flush=True); time.sleep(30)", check)


def test_failed_child_is_reported_without_waiting_for_its_exit(tmp_path: Path) -> None:
    # The child says why and then hangs (as a teardown stuck on a dead peer would).
    script = "import time; print('FAILED no in-sync replica reachable', flush=True); time.sleep(30)"

    async def check(procs: ScriptedTargets) -> None:
        with pytest.raises(errors.UnavailableError, match="no in-sync replica reachable"):
            await procs.start("vol-a", LEASE)
        assert procs.spawned[0].returncode is None, "the stage waited for the child's exit"
        assert not procs.running("vol-a")

    _run(tmp_path, script, check)


def test_hung_failed_child_is_killed_after_the_grace(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(targets, "STOP_GRACE_S", 0.2)
    script = "import time; print('FAILED x', flush=True); time.sleep(30)"

    async def check(procs: ScriptedTargets) -> None:
        with pytest.raises(errors.UnavailableError):
            await procs.start("vol-a", LEASE)
        rc = await asyncio.wait_for(procs.spawned[0].wait(), 10)
        assert rc == -9

    _run(tmp_path, script, check)


def test_silent_child_is_killed_and_reported_unavailable(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(targets, "READY_TIMEOUT_S", 0.3)
    monkeypatch.setattr(targets, "STOP_GRACE_S", 0.2)

    async def check(procs: ScriptedTargets) -> None:
        with pytest.raises(errors.UnavailableError, match=r"not ready within 0\.3 s"):
            await procs.start("vol-a", LEASE)
        assert procs.spawned[0].returncode is not None, "the silent child was left running"

    _run(tmp_path, "import time; time.sleep(30)", check)


def test_child_exiting_without_a_word_reports_its_last_log_line(tmp_path: Path) -> None:
    async def check(procs: ScriptedTargets) -> None:
        (tmp_path / "state" / "targets" / "vol-a.log").write_text(
            "first\nTraceback: something broke\n\n"
        )
        with pytest.raises(errors.UnavailableError, match="something broke"):
            await procs.start("vol-a", LEASE)

    _run(tmp_path, "import sys; sys.exit(1)", check)


def test_the_claim_lease_is_handed_to_the_target(tmp_path: Path) -> None:
    """The node took the claim (epoch CAS + claim in one txn); the target keeps its lease."""
    argv = asyncio.run(targets.TargetProcesses(_config(tmp_path))._argv("vol-a", LEASE))
    assert argv[argv.index("--owner-lease") + 1] == "0x1234"
    assert argv[argv.index("--lease-ttl") + 1] == "2"
    assert float(argv[argv.index("--lease-granted-at") + 1]) == 100.0


def test_sockets_only_in_a_private_directory(tmp_path: Path) -> None:
    """Issue 11 #7: the short socket directory under /tmp was created with exist_ok and
    never checked, so a local user could pre-create it and own the export sockets."""
    import os

    ours = tmp_path / "ours"
    ours.mkdir(mode=0o755)
    assert targets.private_dir(ours) == ours
    assert (ours.stat().st_mode & 0o777) == 0o700  # tightened
    made = targets.private_dir(tmp_path / "new")
    assert (made.stat().st_mode & 0o777) == 0o700
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o777)
    if os.geteuid() == 0:
        os.chown(foreign, 65534, 65534)
        with pytest.raises(errors.FailedPreconditionError, match="not a directory owned"):
            targets.private_dir(foreign)
    link = tmp_path / "link"
    link.symlink_to(ours)
    with pytest.raises(errors.FailedPreconditionError):
        targets.private_dir(link)


def test_a_new_node_process_adopts_the_targets_the_last_one_left(tmp_path: Path) -> None:
    """The first process starts a target and goes away; the next one takes it back from its
    pidfile (identity checked), can stop it, and forgets stale and garbled pidfiles."""
    script = "import time; print('READY', flush=True); time.sleep(60)"

    async def first(procs: ScriptedTargets) -> None:
        await procs.start("vol-1", LEASE)

    async def go() -> None:
        old = ScriptedTargets(_config(tmp_path), script)
        await first(old)
        (child,) = old.spawned
        directory = tmp_path / "state" / "targets"
        (directory / "vol-2.pid").write_text('{"pid": 1, "start": 0}')  # pid reused
        (directory / "vol-3.pid").write_text("garbage")
        new = ScriptedTargets(_config(tmp_path), script)
        assert new.adopt() == ["vol-1"]
        assert new.running("vol-1") and not new.running("vol-2")
        assert sorted(p.name for p in directory.glob("*.pid")) == ["vol-1.pid"]
        # A stage of the same volume finds it serving and starts nothing.
        assert await new.start("vol-1", LEASE) == new.socket_path("vol-1")
        assert new.spawned == []
        await new.stop("vol-1")
        assert await asyncio.wait_for(child.wait(), 5) == -15  # SIGTERM
        assert not new.running("vol-1")
        assert not (directory / "vol-1.pid").exists()

    asyncio.run(go())
