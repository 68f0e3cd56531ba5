"""The node-down responder's fenced mode on a real cluster.

Real etcd, real node processes, a real kill, the real responder loop reading the real store;
only the Kubernetes API is a fake (tests/kube_fakes.py): none can run on this machine. What
this shows: the pod of a killed node is force-deleted as soon as the etcd evidence holds,
never before its volume's ownership claim has lapsed, pods on live nodes are never touched,
and the volume can be staged on another node at once with every acknowledged write intact.
The Kubernetes half of the timeline (the StatefulSet controller, the scheduler, the kubelet
starting the replacement) cannot be measured here: docs/node-down-responder.md.
"""

from __future__ import annotations

import asyncio
import time

from kubernetes import client as k8s

from csi_driver.config import DRIVER_NAME
from csi_driver.controller import node_down as nd
from csi_driver.controller.node_down_loop import NodeDownResponder
from csi_driver.state.etcd import EtcdStore
from devtools.crashcheck import WriterLog
from tests.fault.conftest import Fault, assert_clean, start_writer
from tests.kube_fakes import FakeCore, api, node, pod

ROUND_S = 0.25
ROUNDS = 160  # 40 s at most


def _kubernetes(fault: Fault, volume_id: str, old: str, other: str) -> FakeCore:
    core = FakeCore()
    for spec in fault.spec.nodes:
        core.nodes[spec.id] = node(spec.id)
    for claim in ("data-db-0", "data-reader-0"):
        core.bind("ns", claim, f"pv-{claim}", DRIVER_NAME)
        pv = core.pvs[f"pv-{claim}"]
        assert pv.spec is not None and pv.spec.csi is not None
        pv.spec.csi.volume_handle = volume_id
    core.pods = [pod("db-0", old, ["data-db-0"]), pod("web-0", old),
                 pod("reader-0", other, ["data-reader-0"])]
    return core


def _names(core: FakeCore) -> set[str]:
    pods: list[k8s.V1Pod] = core.pods
    return {p.metadata.name for p in pods}


async def _respond(fault: Fault, core: FakeCore, volume_id: str, old: str
                   ) -> tuple[float, list[str]]:
    """Rounds until db-0 is deleted: (seconds from the kill, the old node's claim as read
    after each round that left db-0 alone)."""
    store = EtcdStore([fault.spec.etcd_host_endpoint], prefix=fault.spec.etcd_prefix)
    try:
        responder = NodeDownResponder(store, api(core), nd.Policy("fenced"))
        for _ in range(8):  # all live: nothing, and the responder has seen every node live
            assert await responder.run_once() == ()
            await asyncio.sleep(ROUND_S)
        assert core.deletes == []
        claims_while_kept: list[str] = []
        await asyncio.to_thread(fault.kill, old)
        killed_at = time.monotonic()
        for _ in range(ROUNDS):
            await responder.run_once()
            if "db-0" not in _names(core):
                return time.monotonic() - killed_at, claims_while_kept
            claim = await store.get_owner(volume_id)
            claims_while_kept.append(claim.node_id if claim else "")
            await asyncio.sleep(ROUND_S)
        raise AssertionError(f"db-0 was never deleted; events: {core.events}")
    finally:
        await store.close()


def test_a_killed_nodes_pod_moves_as_soon_as_its_volume_is_fenced(fault: Fault) -> None:
    volume_id, (old, other, _) = fault.create()
    device = fault.stage_publish(old, volume_id)
    log = WriterLog()
    writer = start_writer(device, log)
    core = _kubernetes(fault, volume_id, old, other)
    try:
        time.sleep(1.0)
        kill_to_delete, claims = asyncio.run(_respond(fault, core, volume_id, old))
    finally:
        assert writer.stop(), "the old writer is stuck in I/O"
    # Only the fenced pod: not the stateless pod beside it, not the pod on a live node.
    assert _names(core) == {"web-0", "reader-0"}
    (namespace, name, options), = core.deletes
    assert (namespace, name, options.grace_period_seconds) == ("ns", "db-0", 0)
    reasons = [event.reason for _, event in core.events]
    assert reasons == [nd.REASON_PODS_DELETED]
    # While the pod was kept, the dead node's claim had not lapsed yet (it is what held the
    # responder back); the round that deleted it had read it gone.
    assert claims and set(claims[:1]) == {old}, claims
    takeover, new_device = fault.take_over(other, volume_id)
    log.mark_takeover(takeover.staged_at, {writer.writer})
    assert_clean(new_device, log)
    print(f"kill -> pod force-deleted {kill_to_delete:.2f} s (claim seen held for "
          f"{len([c for c in claims if c == old])} rounds of {ROUND_S} s)")
