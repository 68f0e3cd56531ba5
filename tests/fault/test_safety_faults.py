"""Issue 10's safety faults against a real cluster: racing takeovers, an etcd outage.

Real etcd, node processes in their own namespaces, real NBD + FUSE + loop devices; nothing
mocked. Each test fails on 7f5cc85 (see the docstrings).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import grpc

from csi_driver._gen import csi_pb2
from devtools.crashcheck import WriterLog
from devtools.failover_csi import stage
from devtools.failover_io import new_writer_id, write_one
from tests.fault.conftest import Fault, assert_clean, assert_replicas_match, run_store

Code = grpc.StatusCode


def condition(fault: Fault, node: str, vid: str, path: str) -> tuple[bool, str]:
    stats = fault.nodes[node].node.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=path), timeout=10)
    return stats.volume_condition.abnormal, stats.volume_condition.message


def wait_condition(fault: Fault, node: str, vid: str, path: str, abnormal: bool,
                   timeout_s: float = 10.0) -> str:
    deadline = time.monotonic() + timeout_s
    seen = condition(fault, node, vid, path)
    while seen[0] != abnormal and time.monotonic() < deadline:
        time.sleep(0.2)
        seen = condition(fault, node, vid, path)
    assert seen[0] == abnormal, f"volume condition stayed {seen}"
    return seen[1]


def test_racing_stages_exactly_one_wins(fault: Fault) -> None:
    """Two nodes stage one volume at once. On 7f5cc85 the epoch CAS and the claim were
    separate (the claim a plain put, later): both stages could answer OK and the first
    pod then got EIO. Now exactly one succeeds and its device writes."""
    vid, (a, b, _) = fault.create()
    results: dict[str, grpc.RpcError | None] = {}
    barrier = threading.Barrier(2)

    def go(node: str) -> None:
        staging, _ = fault.paths(node, vid, "race")
        fault.staged.append((node, vid, "race"))
        barrier.wait()
        try:
            stage(fault.nodes[node], vid, staging)
            results[node] = None
        except grpc.RpcError as exc:
            results[node] = exc

    threads = [threading.Thread(target=go, args=(n,)) for n in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    winners = [n for n, r in results.items() if r is None]
    assert len(winners) == 1, f"stages answered {results}"
    (winner,) = winners
    loser = b if winner == a else a
    error = results[loser]
    assert error is not None and error.code() in (Code.FAILED_PRECONDITION, Code.ABORTED), error
    record = fault.record(vid)
    assert record.owner == winner
    claim = run_store(fault.spec, lambda s: s.get_owner(vid))
    assert claim is not None and claim.node_id == winner and claim.epoch == record.epoch
    # The winner's volume is usable: its NodeStageVolume promise holds.
    device = fault.stage_publish(winner, vid, "race")
    log = WriterLog()
    for block in range(8):
        assert write_one(device, log, new_writer_id(), block, 1) is not None
    assert_clean(device, log)


def test_etcd_outage_holds_io_and_heals_without_restage(fault_ttl5: Fault) -> None:
    """etcd stopped for 10 s under writes. On 7f5cc85 the target self-fenced for good and
    the volume never served again until a restage. Now writes wait (held, not failed) and
    resume once etcd is back, on the same device, with every acknowledged write intact."""
    fault = fault_ttl5
    vid, (node, _, _) = fault.create()
    device = fault.stage_publish(node, vid)
    log = WriterLog()
    writer = new_writer_id()
    assert write_one(device, log, writer, 0, 1) is not None
    assert wait_condition(fault, node, vid, str(device), abnormal=False) == "healthy"
    fault.stop_etcd()
    held: list[float | None] = []
    try:
        time.sleep(7.0)  # past the 5 s lease: the target must have stopped acknowledging
        thread = threading.Thread(target=lambda: held.append(write_one(device, log, writer,
                                                                       1, 2)))
        thread.start()
        thread.join(3.0)
        assert thread.is_alive(), f"a write completed while etcd was down: {held}"
        # NodeGetVolumeStats said "healthy" throughout on 7f5cc85.
        message = wait_condition(fault, node, vid, str(device), abnormal=True)
        assert "holding" in message, message
    finally:
        etcd_back = fault.start_etcd()
    thread.join(60)
    assert not thread.is_alive(), "the held write never completed after etcd came back"
    assert held and held[0] is not None, "the held write failed instead of resuming"
    assert held[0] >= etcd_back - 0.5, "the held write was acknowledged before etcd was back"
    for block in range(2, 6):  # the same staging keeps serving: no restage
        assert write_one(device, log, writer, block, 1 + block) is not None
    wait_condition(fault, node, vid, str(device), abnormal=False)
    assert_clean(device, log)
    assert_replicas_match(fault.spec, vid, device)


def _readyz(address: str) -> tuple[int, str]:
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: n\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body.decode().strip()


def test_readiness_follows_etcd(fault: Fault) -> None:
    """Issue 12 #4: the readiness probe always answered ready. A node that cannot renew its
    lease (etcd down) takes no new volumes: /readyz says 503 and why, and 200 once etcd is
    back. (Liveness stays up: the process is fine, and a restart would help nothing.)"""
    node = fault.spec.nodes[0]
    assert _readyz(node.health_address) == (200, "ready")
    fault.stop_etcd()
    deadline = time.monotonic() + 15
    while (answer := _readyz(node.health_address))[0] == 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert answer[0] == 503 and "not renewed" in answer[1], answer
    fault.start_etcd()
    deadline = time.monotonic() + 30
    while (answer := _readyz(node.health_address))[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert answer == (200, "ready")


def _target_pid(fault: Fault, node: str, volume_id: str) -> int:
    """The target process serving ``volume_id`` on ``node``: it registered as the direct
    writer of the node's replica (a standby target's command line names no volume)."""
    registry = Path(fault.spec.node(node).state_dir) / "local-writers"
    entries = sorted(registry.glob(f"{volume_id}.*.writer"))
    assert entries, f"no target registered for {volume_id} on {node}"
    return int(json.loads(entries[-1].read_text())["pid"])


def test_a_target_dumps_its_state_on_sigusr1(fault: Fault) -> None:
    """For I/O that hangs: `kill -USR1` makes the target log its write-path state and every
    task's stack, and it goes on serving."""
    vid, (node, _, _) = fault.create()
    device = fault.stage_publish(node, vid)
    os.kill(_target_pid(fault, node, vid), signal.SIGUSR1)
    log = Path(fault.spec.node(node).state_dir) / "targets" / f"{vid}.log"
    deadline = time.monotonic() + 10
    while "state dump" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    text = log.read_text()
    assert "state dump: isr=" in text and "gate_open=True" in text and "task " in text, text[-2000:]
    # the NBD connection's flow control: what would keep requests from reaching the backend
    assert "nbd connection 0: read_paused=False write_paused=False" in text, text[-2000:]
    assert "transport_reading=True" in text and "backlog=0" in text, text[-2000:]
    assert "dump failed" not in text
    assert write_one(device, WriterLog(), new_writer_id(), 0, 1) is not None
