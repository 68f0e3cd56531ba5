"""Faults around the replicas and the control plane (issue 5): a non-owner replica lost and
rebuilt, etcd restarted under writes (alone, and while a replica dies), a pool that is full.

Same method as test_failover_faults.py: self-describing blocks written through a published
block device, a fault, then ``crashcheck.check`` and a byte comparison of every in-sync
replica's file with what the owner serves (I1, I3, I5).
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import grpc
import pytest

from csi_driver.controller.volumes import volume_id_for
from csi_driver.state.etcd import EtcdStore
from devtools.crashcheck import WriterLog
from devtools.failover_csi import create_block_volume, delete_volume
from devtools.failover_io import BlockWriter
from replication.authority import ResyncProgress
from tests.fault.conftest import (
    Fault,
    assert_clean,
    assert_replicas_match,
    run_store,
    start_writer,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
Code = grpc.StatusCode
MIB = 1 << 20


# -- etcd restarted -------------------------------------------------------------------------


def test_etcd_restart_during_writes_loses_nothing(fault_ttl5: Fault) -> None:
    fault = fault_ttl5
    vid, (owner, _, _) = fault.create()
    dev = fault.stage_publish(owner, vid)
    before = fault.record(vid)
    log = WriterLog()
    writer = start_writer(dev, log)
    try:
        time.sleep(1.0)
        stopped_at = fault.stop_etcd()
        time.sleep(0.5)
        healthy_at = fault.start_etcd()
        time.sleep(1.5)
    finally:
        assert writer.stop(), "writer stuck in I/O"
    failed = [w for w in log.writes() if not w.acked]
    assert failed == [], f"{len(failed)} writes failed across an etcd restart (no ISR change)"
    during = [w for w in log.acked() if stopped_at < (w.completed or 0) < healthy_at]
    assert during, f"no write acknowledged during the {healthy_at - stopped_at:.2f} s outage"
    after = fault.record(vid)
    assert (after.isr, after.owner, after.epoch) == (before.isr, before.owner, before.epoch)
    assert_clean(dev, log)
    assert_replicas_match(fault.spec, vid, dev)


def test_replica_lost_while_etcd_is_down_no_ack_until_the_isr_shrinks(
    fault_ttl5: Fault,
) -> None:
    """I3 with etcd away: a write the dead replica missed waits for the ISR shrink (CAS),
    which waits for etcd; it is acknowledged once etcd is back, not before, and not lost."""
    fault = fault_ttl5
    vid, (owner, _, victim) = fault.create()
    dev = fault.stage_publish(owner, vid)
    log = WriterLog()
    writer = start_writer(dev, log)
    try:
        time.sleep(1.0)
        fault.stop_etcd()
        fault.kill(victim)
        killed_at = time.monotonic()
        time.sleep(1.0)
        healthy_at = fault.start_etcd()
        assert fault.wait_record(vid, lambda r: victim not in r.isr, 15) is not None
        time.sleep(1.0)
    finally:
        assert writer.stop(), "writer stuck in I/O"
    # 0.2 s: a write whose last replica answer arrived just before the kill may still
    # be on its way back to the writer.
    early = [w for w in log.acked() if killed_at + 0.2 < (w.completed or 0) < healthy_at]
    assert early == [], f"{len(early)} writes acknowledged before the ISR could shrink"
    assert [w for w in log.acked() if (w.completed or 0) > healthy_at], "no ack after etcd"
    failed = [w for w in log.writes() if not w.acked]
    assert failed == [], f"{len(failed)} writes failed (the outage was short)"
    assert_clean(dev, log)
    assert_replicas_match(fault.spec, vid, dev)


# -- pool full ------------------------------------------------------------------------------


def node_free_bytes(fault: Fault, node_id: str) -> int:
    found = run_store(fault.spec, lambda s: s.get_node(node_id))
    assert found is not None, f"{node_id} is not registered"
    return found.value.free_bytes




def half_made(fault: Fault, name: str) -> list[str]:
    """Assert no record and no name of the volume; return replica files still present."""
    vid = volume_id_for(name)
    assert run_store(fault.spec, lambda s: s.volume_id_for_name(name)) is None
    assert run_store(fault.spec, lambda s: s.get_volume(vid)) is None
    return [str(p) for p in (fault.dir / "pools").glob(f"*/{vid}.img")]


def release_node3(fault: Fault, filler: str) -> None:
    """Delete the filler and wait until node-3 reports its space again (the next test's
    placement reads that report)."""
    delete_volume(fault.ctl, filler)
    assert wait_for(lambda: node_free_bytes(fault, "node-3") > 128 * MIB, 10)


def create_refused(fault: Fault, name: str) -> str:
    """CreateVolume must answer RESOURCE_EXHAUSTED; returns the details."""
    with pytest.raises(grpc.RpcError) as err:
        create_block_volume(fault.ctl, name)
    assert err.value.code() is Code.RESOURCE_EXHAUSTED, err.value.details()
    return err.value.details() or ""


def test_full_pool_refuses_placement_with_resource_exhausted(fault: Fault) -> None:
    free = node_free_bytes(fault, "node-3")
    filler, _ = fault.create(replicas=1, nodes=("node-3",), size=(free - 32 * MIB) // MIB * MIB)
    try:
        assert wait_for(lambda: node_free_bytes(fault, "node-3") < 64 * MIB, 10)
        name = f"fault-full-{uuid.uuid4().hex[:8]}"
        create_refused(fault, name)
        assert half_made(fault, name) == []
    finally:
        release_node3(fault, filler)


def test_pool_full_behind_stale_capacity_fails_creation_and_rolls_back(fault: Fault) -> None:
    """node-3's pool filled up after it last reported free space (its report is stale): the
    replica creation there fails, and the replicas already made on node-1 and node-2 go.

    To fill it behind the node's back, a small one-replica volume's file on node-3 is grown
    in place (sparse): the record names it, so no orphan sweep removes it."""
    filler, _ = fault.create(replicas=1, nodes=("node-3",), size=MIB)
    image = Path(fault.spec.node("node-3").pool.dir) / f"{filler}.img"
    assert wait_for(lambda: node_free_bytes(fault, "node-3") > 128 * MIB, 10)
    os.truncate(image, node_free_bytes(fault, "node-3") - 32 * MIB + MIB)
    name = f"fault-full-{uuid.uuid4().hex[:8]}"
    try:
        # Placement passed on the stale report: the agent refused, the controller rolled back.
        assert "pool has" in create_refused(fault, name)
        leftovers = half_made(fault, name)
        create_refused(fault, name)  # the CO retries: the same clean answer
        leftovers += half_made(fault, name)
    finally:
        os.truncate(image, MIB)
        release_node3(fault, filler)
    assert not leftovers, f"a failed CreateVolume left replicas behind: {leftovers}"


# -- a replica that is not the owner --------------------------------------------------------


def lose_replica(fault: Fault) -> tuple[str, str, Path, WriterLog, BlockWriter]:
    """Owner writing, a non-owner replica killed: it leaves the ISR, writes go on."""
    vid, (owner, _, victim) = fault.create()
    dev = fault.stage_publish(owner, vid)
    log = WriterLog()
    writer = start_writer(dev, log)
    time.sleep(0.5)
    killed_at = time.monotonic()
    fault.kill(victim)
    assert fault.wait_record(vid, lambda r: victim not in r.isr, 15) is not None
    time.sleep(0.5)
    assert any(w.completed and w.completed > killed_at + 0.5 for w in log.acked())
    return vid, victim, dev, log, writer


def test_non_owner_replica_killed_writes_continue(fault: Fault) -> None:
    vid, victim, dev, log, writer = lose_replica(fault)
    assert writer.stop(), "writer stuck in I/O"
    assert [w for w in log.writes() if not w.acked] == [], "a write failed"
    assert_clean(dev, log)
    assert_replicas_match(fault.spec, vid, dev)
    report = fault.verify(vid)
    assert report.identical and victim not in report.isr, report


def resync_progress(fault: Fault, vid: str, node_id: str) -> ResyncProgress | None:
    """What the owner's target last published about node_id's rebuild (None: nothing)."""
    async def get(store: EtcdStore) -> ResyncProgress | None:
        return (await store.get_progress(vid)).get(node_id)
    return run_store(fault.spec, get)


def kill_during_rebuild(fault: Fault, vid: str, victim: str) -> None:
    """Kill the returning replica while its rebuild runs (polls the published progress)."""
    deadline = time.monotonic() + 20
    progress = None
    while time.monotonic() < deadline:  # no sleep: a rebuild here takes well under a second
        progress = resync_progress(fault, vid, victim)
        if progress is not None:
            break
    assert progress is not None and progress.kind == "rebuild", (
        f"no rebuild of {victim} in progress to interrupt: {progress}")
    fault.kill(victim)
    time.sleep(1.0)
    fault.revive(victim)


@pytest.mark.parametrize("kill_again", [False, True], ids=["revived", "killed-during-rebuild"])
def test_returning_replica_is_rebuilt_and_rejoins(fault: Fault, kill_again: bool) -> None:
    vid, victim, dev, log, writer = lose_replica(fault)
    size = fault.record(vid).size_bytes
    try:
        time.sleep(1.0)
        fault.revive(victim)
        if kill_again:
            kill_during_rebuild(fault, vid, victim)
        rejoined = fault.wait_record(vid, lambda r: victim in r.isr, 30)
        assert rejoined is not None, f"{victim} did not rejoin the ISR within 30 s"
        time.sleep(0.5)  # writes reach the rejoined replica too
    finally:
        assert writer.stop(), "writer stuck in I/O"
    report = fault.verify(vid)
    assert report.identical, report
    assert {r.node_id for r in report.replicas if r.reachable} == set(report.isr)
    assert victim in report.isr
    assert_clean(dev, log)
    assert_replicas_match(fault.spec, vid, dev)
    # The last rebuild's figures stay published ("rebuilt"); without them, nothing to check.
    done = resync_progress(fault, vid, victim)
    if done is not None:
        assert done.kind == "rebuilt", done
        assert 0 < done.done_bytes < size, f"rebuild copied {done.done_bytes} of {size} bytes"
