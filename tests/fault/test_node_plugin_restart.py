"""A restart of a node's plugin process never interrupts I/O (issue 12: upgrades, crashes).

Real cluster, real writers on real devices. The node process of one node is restarted, as a
rollout (SIGTERM) or a crash (SIGKILL) would, while two volumes are written: one whose
target runs on that node, one served from another node with a replica on it. Every write
must succeed (a stall is allowed, an error is not), every acknowledged write must read back,
and the new node process must be able to unstage what the old one staged (it re-adopts the
running target), after which another node takes the volume over at once.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import time
from pathlib import Path

import pytest

from devtools import devcluster
from devtools.crashcheck import WriteRecord, WriterLog
from devtools.failover_csi import unpublish_unstage
from replication.proc_identity import start_ticks
from tests.fault.conftest import Fault, assert_clean, start_writer

WRITE_AFTER_S = 2.0
FIO_RUNTIME_S = 12


def _longest_gap(writes: list[WriteRecord], since: float) -> float:
    done = sorted(w.completed for w in writes if w.acked and w.completed is not None
                  and w.completed >= since)
    return max((b - a for a, b in itertools.pairwise(done)), default=0.0)


def _target_pid(fault: Fault, node_id: str, volume_id: str) -> int:
    state_dir = next(n.state_dir for n in fault.spec.nodes if n.id == node_id)
    pidfile = Path(state_dir, "targets", f"{volume_id}.pid")
    return int(json.loads(pidfile.read_text())["pid"])


@pytest.mark.parametrize("graceful", [True, False], ids=["rollout", "crash"])
def test_restarting_a_node_plugin_under_writes_fails_no_io(fault: Fault, graceful: bool) -> None:
    local, (node, other, _) = fault.create()
    remote, _ = fault.create()
    local_dev = fault.stage_publish(node, local)  # its target runs on the restarted node
    remote_dev = fault.stage_publish(other, remote)  # served elsewhere, a replica on it
    target = _target_pid(fault, node, local)
    logs = [WriterLog(), WriterLog()]  # one per device: each is checked against its own
    writers = [start_writer(local_dev, logs[0]), start_writer(remote_dev, logs[1])]
    try:
        time.sleep(1.0)
        restart_at = time.monotonic()
        devcluster.restart_node_process(fault.dir, node, graceful=graceful)
        restarted_at = time.monotonic()
        time.sleep(WRITE_AFTER_S)
    finally:
        for writer in writers:
            assert writer.stop(), "a writer is stuck in I/O"
    writes = [w for log in logs for w in log.writes()]
    failed = [w for w in writes if w.completed is not None and not w.acked]
    assert failed == [], f"{len(failed)} writes failed across the restart"
    for writer, log in zip(writers, logs, strict=True):
        late = [w for w in log.acked(writer.writer) if (w.completed or 0) > restarted_at]
        assert late, f"writer {writer.writer} acknowledged nothing after the restart"
    assert_clean(local_dev, logs[0])
    assert_clean(remote_dev, logs[1])
    # The same target kept serving: it was not restarted with the plugin.
    assert _target_pid(fault, node, local) == target and start_ticks(target) is not None
    print(f"{'SIGTERM' if graceful else 'SIGKILL'}: plugin back in "
          f"{restarted_at - restart_at:.2f} s; longest gap between acknowledged writes "
          f"{max(_longest_gap(log.writes(), restart_at) for log in logs):.2f} s; "
          f"{len(writes)} writes, 0 failed")

    # The new process unstages what the old one staged: it stops the adopted target...
    staging, publish_path = fault.paths(node, local, "a")
    unpublish_unstage(fault.nodes[node], local, staging, publish_path)
    fault.staged.remove((node, local, "a"))
    assert start_ticks(target) is None, "the adopted target still runs after unstage"
    # ... which released the claim: another node takes the volume over without waiting.
    takeover, device = fault.take_over(other, local)
    assert takeover.attempts == 1, takeover
    assert_clean(device, logs[0])


def test_fio_sees_no_error_while_every_node_plugin_restarts(fault: Fault) -> None:
    """The issue's check: fio with verification on a volume while each node's plugin is
    restarted in turn (its owner's first, then the two replica nodes')."""
    volume_id, placed = fault.create()
    owner = placed[0]
    device = fault.stage_publish(owner, volume_id)
    order = [owner, *(n.id for n in fault.spec.nodes if n.id != owner)]
    output = fault.work / "fio.json"
    fio = subprocess.Popen([
        "fio", "--name=restart", f"--filename={device}", "--rw=randwrite", "--bs=4k",
        "--direct=1", "--ioengine=libaio", "--iodepth=16", "--size=32M", "--time_based",
        f"--runtime={FIO_RUNTIME_S}", "--verify=crc32c", "--verify_backlog=256",
        "--verify_fatal=1", "--output-format=json", f"--output={output}",
    ], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(1.0)
        for i, node in enumerate(order):
            devcluster.restart_node_process(fault.dir, node, graceful=i % 2 == 0)
            time.sleep(1.0)
        _, stderr = fio.communicate(timeout=FIO_RUNTIME_S + 60)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
    assert fio.returncode == 0, stderr.decode(errors="replace")[-2000:]
    (job,) = json.loads(output.read_text())["jobs"]
    assert job["error"] == 0, job["error"]
    assert job["write"]["total_ios"] > 0
    print(f"fio: {job['write']['total_ios']} writes verified, 0 errors, while "
          f"{', '.join(order)} restarted; longest completion latency "
          f"{job['write']['clat_ns']['max'] / 1e9:.2f} s")
