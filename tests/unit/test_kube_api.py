"""The node-down responder's Kubernetes edge (csi_driver.controller.kube_api) and its loop.

UNIT TESTS OF OUR TRANSLATION ONLY. No Kubernetes API server can be installed on this
machine, so these tests run against the fakes of tests/kube_fakes.py (``FakeCore``,
``FakeCoordination``), which hold the client's real model objects and enforce what the API
server would for our requests. The last tests put the real client on top of
``StubApiServer``, a few REST paths served over HTTP on 127.0.0.1, to see what actually goes
on the wire (JSON Patch content type, query, bodies). What none of this can show is that a
real API server, RBAC or admission agree; that needs a cluster.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from csi_driver.config import DRIVER_NAME, ConfigError
from csi_driver.controller import kube_api
from csi_driver.controller import node_down as nd
from csi_driver.controller.kube_api import KubeApi, KubeConflictError
from csi_driver.controller.node_down_loop import NodeDownResponder
from csi_driver.state import errors as store_errors
from csi_driver.state.model import (
    NodeRecord,
    OwnerClaim,
    ReplicaRef,
    ReplicaState,
    Versioned,
    VolumePhase,
    VolumeRecord,
)
from tests.kube_fakes import FakeCoordination, FakeCore, api
from tests.kube_fakes import node as _node
from tests.kube_fakes import pod as _pod

# -- reading nodes ----------------------------------------------------------------------------


def test_nodes_translate_taints_annotations_and_kubelet_lease() -> None:
    core = FakeCore(nodes={
        "a": _node("a"),
        "b": _node("b", [k8s.V1Taint(key=nd.TAINT_KEY, effect="NoExecute",
                                     value="nodeshutdown")]),
        "c": _node("c", [k8s.V1Taint(key=nd.TAINT_KEY, effect="NoSchedule")],
                   {nd.OWNER_ANNOTATION: nd.OWNER_VALUE}),
        "d": _node("d", annotations={nd.OWNER_ANNOTATION: "someone-else"}),
    })
    coordination = FakeCoordination()
    coordination.renew("a")
    coordination.renew("b")
    coordination.leases["b"].spec.lease_duration_seconds = 120
    got = {n.name: n for n in api(core, coordination).nodes()}
    assert got["a"] == nd.KubeNode("a", "uid-a", False, False,
                                   "2025-01-01T00:00:00.000001+00:00", 40.0)
    assert got["b"].out_of_service and not got["b"].ours and got["b"].heartbeat_period_s == 120
    assert got["c"].out_of_service and got["c"].ours  # any effect counts as present
    assert not got["d"].ours  # only our exact value marks the taint as ours
    assert got["c"].heartbeat is None and got["d"].heartbeat is None  # no Lease


def test_heartbeat_changes_with_every_renewal() -> None:
    core = FakeCore(nodes={"a": _node("a")})
    coordination = FakeCoordination()
    coordination.renew("a")
    first = api(core, coordination).nodes()[0].heartbeat
    coordination.renew("a")
    assert api(core, coordination).nodes()[0].heartbeat != first


# -- taints -----------------------------------------------------------------------------------


def test_apply_taint_adds_taint_and_annotation_in_one_write() -> None:
    other = k8s.V1Taint(key="dedicated", value="db", effect="NoSchedule")
    core = FakeCore(nodes={"a": _node("a", [other], {"keep": "me"})})
    assert api(core).apply_taint("a") is True
    node = core.nodes["a"]
    assert [t.key for t in node.spec.taints] == ["dedicated", nd.TAINT_KEY]
    taint = node.spec.taints[1]
    assert (taint.value, taint.effect) == ("nodeshutdown", "NoExecute")
    assert taint.time_added is not None
    assert node.metadata.annotations == {"keep": "me", nd.OWNER_ANNOTATION: nd.OWNER_VALUE}
    assert len(core.patches) == 1
    assert core.patches[0][0] == {"op": "replace", "path": "/metadata/resourceVersion",
                                  "value": "1"}
    assert core.calls.count("patch_node") == 1


def test_apply_taint_keeps_other_taints_exactly() -> None:
    stamped = k8s.V1Taint(key="node.kubernetes.io/unreachable", effect="NoExecute",
                          time_added="2025-03-04T05:06:07Z")
    core = FakeCore(nodes={"a": _node("a", [stamped])})
    api(core).apply_taint("a")
    sent = core.patches[0][1]["value"][0]
    assert sent == {"key": "node.kubernetes.io/unreachable", "effect": "NoExecute",
                    "timeAdded": "2025-03-04T05:06:07Z"}


def test_apply_taint_never_claims_a_taint_already_there() -> None:
    core = FakeCore(nodes={"a": _node("a", [k8s.V1Taint(key=nd.TAINT_KEY, effect="NoExecute")])})
    assert api(core).apply_taint("a") is False
    assert core.patches == [] and core.nodes["a"].metadata.annotations is None


def test_apply_taint_rereads_on_conflict_and_keeps_the_concurrent_change() -> None:
    core = FakeCore(nodes={"a": _node("a")})
    admin = k8s.V1Taint(key="maintenance", effect="NoSchedule")
    first = [True]

    def concurrent(name: str) -> None:
        if first[0]:
            first[0] = False
            core.touch(name, taints=[admin])

    core.after_read = concurrent
    assert api(core).apply_taint("a") is True
    assert core.calls.count("read_node") == 2 and core.calls.count("patch_node") == 2
    assert [t.key for t in core.nodes["a"].spec.taints] == ["maintenance", nd.TAINT_KEY]


def test_apply_taint_concurrent_admin_taint_wins() -> None:
    """The admin applied the same taint between our read and write: ours is not added and
    the node is not marked as ours."""
    core = FakeCore(nodes={"a": _node("a")})
    first = [True]

    def concurrent(name: str) -> None:
        if first[0]:
            first[0] = False
            core.touch(name, taints=[k8s.V1Taint(key=nd.TAINT_KEY, effect="NoExecute")])

    core.after_read = concurrent
    assert api(core).apply_taint("a") is False
    assert core.nodes["a"].metadata.annotations is None


def test_endless_conflicts_give_up() -> None:
    core = FakeCore(nodes={"a": _node("a")})
    core.after_read = lambda name: core.touch(name)
    with pytest.raises(KubeConflictError):
        api(core).apply_taint("a")
    assert core.calls.count("patch_node") == kube_api.PATCH_ATTEMPTS


def test_other_patch_errors_propagate() -> None:
    core = FakeCore(nodes={"a": _node("a")})
    core.fail["patch_node"] = ApiException(status=403, reason="Forbidden")
    with pytest.raises(ApiException):
        api(core).apply_taint("a")
    assert core.calls.count("patch_node") == 1


def test_remove_taint_removes_only_ours() -> None:
    core = FakeCore(nodes={"a": _node("a", [
        k8s.V1Taint(key="dedicated", effect="NoSchedule", value="db"),
        k8s.V1Taint(key=nd.TAINT_KEY, effect="NoExecute", value="nodeshutdown"),
    ], {nd.OWNER_ANNOTATION: nd.OWNER_VALUE, "keep": "me"})})
    assert api(core).remove_taint("a") is True
    node = core.nodes["a"]
    assert [t.key for t in node.spec.taints] == ["dedicated"]
    assert node.metadata.annotations == {"keep": "me"}


def test_remove_taint_without_our_annotation_does_nothing() -> None:
    taint = k8s.V1Taint(key=nd.TAINT_KEY, effect="NoExecute")
    core = FakeCore(nodes={"a": _node("a", [taint], {nd.OWNER_ANNOTATION: "admin"})})
    assert api(core).remove_taint("a") is False
    assert core.patches == [] and [t.key for t in core.nodes["a"].spec.taints] == [nd.TAINT_KEY]


def test_remove_taint_rechecks_the_annotation_after_a_conflict() -> None:
    """Between our read and write an admin took the taint over (annotation changed): the
    retry reads that and leaves the taint."""
    taint = k8s.V1Taint(key=nd.TAINT_KEY, effect="NoExecute")
    core = FakeCore(nodes={"a": _node("a", [taint], {nd.OWNER_ANNOTATION: nd.OWNER_VALUE})})
    first = [True]

    def concurrent(name: str) -> None:
        if first[0]:
            first[0] = False
            core.touch(name, annotations={nd.OWNER_ANNOTATION: "admin"})

    core.after_read = concurrent
    assert api(core).remove_taint("a") is False
    assert [t.key for t in core.nodes["a"].spec.taints] == [nd.TAINT_KEY]


def test_stale_annotation_without_taint_is_cleaned() -> None:
    core = FakeCore(nodes={"a": _node("a", None, {nd.OWNER_ANNOTATION: nd.OWNER_VALUE})})
    assert api(core).remove_taint("a") is True
    assert core.nodes["a"].metadata.annotations is None
    assert core.nodes["a"].spec.taints is None


# -- pods -------------------------------------------------------------------------------------


def test_pod_facts_resolve_pvc_to_pv_to_driver() -> None:
    core = FakeCore()
    core.bind("ns", "data-db-0", "pv-1", DRIVER_NAME)
    core.bind("ns", "other", "pv-2", "ebs.csi.aws.com")
    core.bind("ns", "local", "pv-3", None)  # hostPath PV
    core.bind("ns", "pending", None, None)  # unbound
    core.bind("ns", "web-1-scratch", "pv-4", DRIVER_NAME)  # generic ephemeral volume's PVC
    done = _pod("batch", "a", ["data-db-0"])
    done.status = k8s.V1PodStatus(phase="Succeeded")
    core.pods = [
        _pod("db-0", "a", ["data-db-0"]),
        _pod("db-1", "a", ["other", "data-db-0"]),
        _pod("app", "a", ["other", "local", "pending", "missing"]),
        _pod("web-1", "a", ephemeral=["scratch"]),
        _pod("agent", "a", ["data-db-0"], owner="DaemonSet"),
        _pod("elsewhere", "b", ["data-db-0"]),
        done,
    ]
    facts = {f.pod.name: f for f in api(core).pod_facts("a")}
    assert set(facts) == {"db-0", "db-1", "app", "web-1", "agent", "batch"}
    assert facts["db-0"] == nd.PodFacts(nd.PodRef("ns", "db-0", "uid-db-0"),
                                        tandem_volumes=("pv-1",))
    assert facts["db-1"].uses_tandem and facts["db-1"].tandem_volumes == ("pv-1",)
    assert facts["db-1"].blockers == ("claim other (ebs.csi.aws.com)",)
    assert not facts["app"].uses_tandem and not facts["app"].tandem_volumes
    # a missing or unbound claim holds no storage; a non-CSI PV is not tandem's to fence
    assert facts["app"].blockers == ("claim other (ebs.csi.aws.com)",
                                     "claim local (not a CSI volume)")
    assert facts["web-1"].uses_tandem and facts["web-1"].tandem_volumes == ("pv-4",)
    assert facts["agent"].uses_tandem and facts["agent"].daemon_set
    assert facts["batch"].finished and not facts["db-0"].finished
    # one read per claim and per PV, however many pods share them
    assert core.calls.count("read_namespaced_persistent_volume_claim") == 6
    assert core.calls.count("read_persistent_volume") == 4


def test_pod_facts_name_inline_storage_tandem_cannot_fence() -> None:
    core = FakeCore()
    pod = _pod("p", "a")
    assert pod.spec is not None and pod.spec.volumes is not None
    pod.spec.volumes += [
        k8s.V1Volume(name="conf", config_map=k8s.V1ConfigMapVolumeSource(name="c")),
        k8s.V1Volume(name="sec", secret=k8s.V1SecretVolumeSource(secret_name="s")),
        k8s.V1Volume(name="info", downward_api=k8s.V1DownwardAPIVolumeSource()),
        k8s.V1Volume(name="tok", projected=k8s.V1ProjectedVolumeSource(sources=[])),
        k8s.V1Volume(name="logs", host_path=k8s.V1HostPathVolumeSource(path="/var/log")),
        k8s.V1Volume(name="share", nfs=k8s.V1NFSVolumeSource(server="nfs", path="/x")),
        k8s.V1Volume(name="inline", csi=k8s.V1CSIVolumeSource(driver="secrets.example")),
    ]
    core.pods = [pod]
    (facts,) = api(core).pod_facts("a")
    assert facts.blockers == ("volume share (nfs)", "volume inline (csi)")
    assert not facts.uses_tandem


def test_pod_facts_propagate_errors_other_than_not_found() -> None:
    core = FakeCore(pods=[_pod("db-0", "a", ["data"])])
    core.fail["read_namespaced_persistent_volume_claim"] = ApiException(status=500)
    with pytest.raises(ApiException):
        api(core).pod_facts("a")


def test_delete_pod_is_forced_and_uid_guarded() -> None:
    core = FakeCore(pods=[_pod("db-0", "a")])
    assert api(core).delete_pod(nd.PodRef("ns", "db-0", "uid-db-0")) is True
    (_, _, options), = core.deletes
    assert options.grace_period_seconds == 0
    assert options.preconditions.uid == "uid-db-0"
    assert core.pods == []


def test_delete_pod_spares_a_new_pod_with_the_same_name() -> None:
    replacement = _pod("db-0", "b")
    replacement.metadata.uid = "uid-new"
    core = FakeCore(pods=[replacement])
    assert api(core).delete_pod(nd.PodRef("ns", "db-0", "uid-db-0")) is False
    assert core.pods == [replacement]


def test_delete_pod_already_gone() -> None:
    assert api(FakeCore()).delete_pod(nd.PodRef("ns", "db-0", "u")) is False


def test_delete_pod_other_errors_propagate() -> None:
    core = FakeCore(pods=[_pod("db-0", "a")])
    core.fail["delete_namespaced_pod"] = ApiException(status=403, reason="Forbidden")
    with pytest.raises(ApiException):
        api(core).delete_pod(nd.PodRef("ns", "db-0", "uid-db-0"))


# -- events -----------------------------------------------------------------------------------


def test_event_is_about_the_node() -> None:
    core = FakeCore()
    api(core).create_event("a", "uid-a", nd.REASON_TAINTED, "x" * 5000, "Warning")
    (namespace, event), = core.events
    assert namespace == "default" == event.metadata.namespace
    assert event.metadata.name.startswith("a.")
    ref = event.involved_object
    assert (ref.kind, ref.name, ref.uid, ref.api_version) == ("Node", "a", "uid-a", "v1")
    assert (event.reason, event.type, event.count) == (nd.REASON_TAINTED, "Warning", 1)
    assert len(event.message) == kube_api.EVENT_MESSAGE_MAX
    assert event.reporting_component == "tandem-controller" == event.source.component
    assert event.reporting_instance == "ctl-0"
    assert event.first_timestamp is not None and event.last_timestamp is not None
    k8s.ApiClient().sanitize_for_serialization(event)  # the client can send it


# -- connecting -------------------------------------------------------------------------------


def test_connect_with_a_kubeconfig(tmp_path: Path) -> None:
    config = tmp_path / "kubeconfig"
    config.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
    }))
    assert isinstance(kube_api.connect(config), KubeApi)  # no request is made


def test_connect_with_a_missing_kubeconfig(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--kubeconfig"):
        kube_api.connect(tmp_path / "nope")


def test_connect_outside_a_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ConfigError, match="in-cluster"):
        kube_api.connect(None)


def test_connect_without_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "kubernetes", None)
    with pytest.raises(ConfigError, match="pip install"):
        kube_api.connect(None)


# -- the loop ---------------------------------------------------------------------------------


def _record(node: str) -> Versioned[NodeRecord]:
    return Versioned(NodeRecord(node, f"{node}:1", f"{node}:2", "file", 1, 1, (), 0), 1, 1, 7)


def _volume(vid: str, replicas: list[str], owner: str | None) -> Versioned[VolumeRecord]:
    record = VolumeRecord(
        volume_id=vid, name=f"pvc-{vid}", size_bytes=1 << 20,
        replicas=tuple(ReplicaRef(n, ReplicaState.READY) for n in replicas),
        isr=tuple(replicas), epoch=1, owner=owner, phase=VolumePhase.READY, fs_type="ext4",
        access_type="mount", parameters=(), created_at=0.0,
    )
    return Versioned(record, 1, 1, 0)


@dataclass
class FakeStore:
    live: set[str]
    volumes: list[Versioned[VolumeRecord]] = field(default_factory=list)
    error: Exception | None = None
    volume_lists: int = 0
    claims: dict[str, str] = field(default_factory=dict)  # volume -> claim holder
    volume_reads: list[str] = field(default_factory=list)

    async def list_nodes(self) -> list[Versioned[NodeRecord]]:
        if self.error is not None:
            raise self.error
        return [_record(n) for n in sorted(self.live)]

    async def list_volumes(self) -> list[Versioned[VolumeRecord]]:
        if self.error is not None:
            raise self.error
        self.volume_lists += 1
        return list(self.volumes)

    async def get_volume(self, volume_id: str) -> Versioned[VolumeRecord] | None:
        if self.error is not None:
            raise self.error
        self.volume_reads.append(volume_id)
        return next((v for v in self.volumes if v.value.volume_id == volume_id), None)

    async def get_owner(self, volume_id: str) -> OwnerClaim | None:
        if self.error is not None:
            raise self.error
        node = self.claims.get(volume_id)
        return OwnerClaim(node, 1) if node is not None else None


@dataclass
class World:
    """Three nodes; ``step`` advances the clock one second, live kubelets renew, one round."""

    policy: nd.Policy
    core: FakeCore = field(default_factory=FakeCore)
    coordination: FakeCoordination = field(default_factory=FakeCoordination)
    store: FakeStore = field(default_factory=lambda: FakeStore({"n1", "n2", "n3"}))
    kubelets: set[str] = field(default_factory=lambda: {"n1", "n2", "n3"})
    now: float = 0.0
    responder: NodeDownResponder = field(init=False)

    def __post_init__(self) -> None:
        for name in ("n1", "n2", "n3"):
            self.core.nodes[name] = _node(name)
        store: Any = self.store  # the two Store methods the responder reads
        self.responder = NodeDownResponder(store, api(self.core, self.coordination),
                                           self.policy, monotonic=lambda: self.now)

    def step(self) -> tuple[nd.Action, ...]:
        self.now += 1
        for name in self.kubelets:
            self.coordination.renew(name)
        return asyncio.run(self.responder.run_once())

    def kill(self, name: str) -> None:
        self.store.live.discard(name)
        self.kubelets.discard(name)


def test_loop_taints_a_dead_node_and_untaints_it_when_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="csi_driver.controller.node_down_loop")
    world = World(nd.Policy("taint", grace_s=30.0))
    world.step()
    world.kill("n2")
    for _ in range(30):
        assert world.step() == ()
    assert "patch_node" not in world.core.calls
    world.step()
    node = world.core.nodes["n2"]
    assert [t.key for t in node.spec.taints] == [nd.TAINT_KEY]
    assert node.metadata.annotations == {nd.OWNER_ANNOTATION: nd.OWNER_VALUE}
    (_, event), = world.core.events
    assert event.reason == nd.REASON_TAINTED and event.involved_object.uid == "uid-n2"
    assert "node=n2 action=apply-taint" in caplog.text
    assert "node=n2 action=event type=Warning reason=TandemOutOfServiceTaintApplied" in caplog.text
    for _ in range(10):
        assert world.step() == ()  # idempotent
    world.store.live.add("n2")
    world.kubelets.add("n2")
    world.step()
    node = world.core.nodes["n2"]
    assert node.spec.taints is None and node.metadata.annotations is None
    assert [e.reason for _, e in world.core.events] == [nd.REASON_TAINTED, nd.REASON_UNTAINTED]
    assert "node=n2 action=remove-taint" in caplog.text


def test_loop_delete_pods_mode(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="csi_driver.controller.node_down_loop")
    world = World(nd.Policy("delete-pods", grace_s=30.0))
    world.core.bind("ns", "data-db-0", "pv-1", DRIVER_NAME)
    world.core.pods = [_pod("db-0", "n2", ["data-db-0"]), _pod("web", "n2"),
                       _pod("db-1", "n1", ["data-db-0"])]
    world.step()
    world.kill("n2")
    for _ in range(30):
        world.step()
    assert "list_pod_for_all_namespaces" not in world.core.calls  # only once due
    world.step()
    assert [p.metadata.name for p in world.core.pods] == ["web", "db-1"]
    (_, _, options), = world.core.deletes
    assert options.grace_period_seconds == 0
    (_, event), = world.core.events
    assert event.reason == nd.REASON_PODS_DELETED and "ns/db-0" in event.message
    assert "node=n2 action=delete-pods grace=0 pods=ns/db-0 deleted=1" in caplog.text
    assert world.core.nodes["n2"].spec.taints is None  # no taint in this mode
    world.step()
    assert len(world.core.deletes) == 1


def test_loop_fenced_mode_moves_a_pod_once_its_claim_lapses(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="csi_driver.controller.node_down_loop")
    world = World(nd.Policy("fenced"))
    world.core.bind("ns", "data-db-0", "pv-1", DRIVER_NAME)
    world.core.bind("ns", "data-db-1", "pv-2", DRIVER_NAME)
    world.store.volumes = [_volume("pv-1", ["n2", "n1"], "n2"), _volume("pv-2", ["n1"], "n1")]
    world.store.claims = {"pv-1": "n2", "pv-2": "n1"}
    world.core.pods = [_pod("db-0", "n2", ["data-db-0"]), _pod("web", "n2"),
                       _pod("db-1", "n1", ["data-db-1"])]
    world.step()
    assert "list_pod_for_all_namespaces" not in world.core.calls  # nobody dead: no reads
    assert world.store.volume_reads == []
    world.store.live.discard("n2")  # tandem's lease lapsed; the kubelet still renews
    assert world.step() == ()  # n2's target still holds pv-1's claim
    assert world.store.volume_reads == ["pv-1"]
    del world.store.claims["pv-1"]  # ... until its lease lapses too
    world.step()
    assert [p.metadata.name for p in world.core.pods] == ["web", "db-1"]
    (ns, name, options), = world.core.deletes
    assert (ns, name, options.grace_period_seconds) == ("ns", "db-0", 0)
    (_, event), = world.core.events
    assert event.reason == nd.REASON_PODS_DELETED and "ns/db-0 (pv-1)" in event.message
    assert "node=n2 action=delete-pods grace=0 pods=ns/db-0 deleted=1" in caplog.text
    for _ in range(5):
        assert world.step() == ()
    assert len(world.core.deletes) == 1
    assert world.coordination.lists == 0  # no kubelet Leases: its RBAC does not grant them


def test_loop_fenced_mode_etcd_error_on_volumes_decides_nothing() -> None:
    world = World(nd.Policy("fenced"))
    world.core.bind("ns", "data-db-0", "pv-1", DRIVER_NAME)
    world.store.volumes = [_volume("pv-1", ["n2", "n1"], None)]
    world.core.pods = [_pod("db-0", "n2", ["data-db-0"])]
    world.step()
    world.store.live.discard("n2")
    real = world.store.get_owner

    async def failing(volume_id: str) -> OwnerClaim | None:
        raise store_errors.StoreUnavailableError("etcd down")

    world.store.get_owner = failing  # type: ignore[method-assign]
    assert world.step() == ()
    assert world.core.deletes == []
    world.store.get_owner = real  # type: ignore[method-assign]
    world.step()
    assert len(world.core.deletes) == 1


def test_loop_etcd_unreachable_touches_nothing() -> None:
    world = World(nd.Policy("taint", grace_s=5.0))
    world.step()
    world.kill("n2")
    world.store.error = store_errors.StoreUnavailableError("etcd down")
    calls = len(world.core.calls)
    for _ in range(100):
        assert world.step() == ()
    assert len(world.core.calls) == calls  # not even a read


def test_loop_survives_api_errors_and_retries() -> None:
    world = World(nd.Policy("taint", grace_s=5.0))
    world.step()
    world.kill("n2")
    world.core.fail["list_node"] = ApiException(status=500, reason="boom")
    for _ in range(10):
        assert world.step() == ()
    del world.core.fail["list_node"]
    world.core.fail["patch_node"] = ApiException(status=403, reason="Forbidden")
    for _ in range(10):
        world.step()  # the taint fails each round: logged, its event not sent
    assert world.core.events == []
    del world.core.fail["patch_node"]
    world.step()
    assert [t.key for t in world.core.nodes["n2"].spec.taints] == [nd.TAINT_KEY]
    assert len(world.core.events) == 1


def test_loop_event_failure_is_not_fatal() -> None:
    world = World(nd.Policy("taint", grace_s=5.0))
    world.core.fail["create_namespaced_event"] = ApiException(status=403)
    world.step()
    world.kill("n2")
    for _ in range(25):  # the kubelet must be silent for half its 40 s Lease
        world.step()
    assert world.core.nodes["n2"].spec.taints is not None


def test_loop_knows_nodes_from_volume_records_after_a_restart() -> None:
    world = World(nd.Policy("taint", grace_s=5.0))
    world.coordination.renew("n2")  # its kubelet's last renewal
    world.kill("n2")  # dead before this controller ever saw it
    world.store.volumes = [_volume("v1", ["n1", "n3"], owner="n2")]
    for _ in range(25):
        world.step()
    assert world.core.nodes["n2"].spec.taints is not None
    assert world.store.volume_lists == 2  # at 1 s and 16 s: every REFERENCED_REFRESH_S


def test_loop_never_touches_a_node_tandem_never_knew() -> None:
    world = World(nd.Policy("taint", grace_s=5.0))
    world.core.nodes["gpu-1"] = _node("gpu-1")  # no tandem node plugin there
    for _ in range(30):
        world.step()
    assert "patch_node" not in world.core.calls


def test_run_forever_survives_unexpected_errors(caplog: pytest.LogCaptureFixture) -> None:
    world = World(nd.Policy("taint", grace_s=5.0))
    world.store.error = RuntimeError("surprise")

    async def main() -> None:
        task = asyncio.create_task(world.responder.run_forever(interval_s=0.001))
        await asyncio.sleep(0.05)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert caplog.text.count("surprise") == 1  # the same error is logged once


# -- on the wire: the real client against a stub HTTP server ----------------------------------


class StubApiServer:
    """Just enough of the Kubernetes REST API, over HTTP on 127.0.0.1, to see what the real
    ``kubernetes`` client sends for our calls (paths, query, Content-Type, bodies). Not an
    API server: no auth, no validation beyond what the assertions check."""

    def __init__(self) -> None:
        self.nodes: dict[str, dict[str, Any]] = {}
        self.leases: list[dict[str, Any]] = []
        self.pods: list[dict[str, Any]] = []
        self.pvcs: dict[str, dict[str, Any]] = {}
        self.pvs: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, dict[str, list[str]], dict[str, str], Any]] = []
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                with stub.lock:
                    stub.requests.append((self.command, url.path, parse_qs(url.query),
                                          dict(self.headers), body))
                    status, out = stub.route(self.command, url.path, parse_qs(url.query),
                                             self.headers.get("Content-Type", ""), body)
                data = json.dumps(out).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PATCH = do_DELETE = do_POST = _serve

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def _status(code: int, reason: str) -> tuple[int, dict[str, Any]]:
        return code, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                      "reason": reason, "code": code}

    def route(self, method: str, path: str, query: dict[str, list[str]], ctype: str,
              body: Any) -> tuple[int, dict[str, Any]]:
        parts = path.strip("/").split("/")
        if path == "/api/v1/nodes" and method == "GET":
            return 200, {"kind": "NodeList", "apiVersion": "v1", "metadata": {},
                         "items": list(self.nodes.values())}
        if parts[:3] == ["api", "v1", "nodes"] and len(parts) == 4:
            node = self.nodes.get(parts[3])
            if node is None:
                return self._status(404, "NotFound")
            if method == "GET":
                return 200, node
            assert method == "PATCH" and ctype == "application/json-patch+json", ctype
            for op in body:
                if op["path"] == "/metadata/resourceVersion":
                    if op["value"] != node["metadata"]["resourceVersion"]:
                        return self._status(409, "Conflict")
                elif op["path"] == "/spec/taints":
                    node["spec"]["taints"] = op["value"]
                elif op["path"] == "/metadata/annotations":
                    node["metadata"]["annotations"] = op["value"]
            node["metadata"]["resourceVersion"] = str(int(node["metadata"]["resourceVersion"]) + 1)
            return 200, node
        if path == "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases":
            return 200, {"kind": "LeaseList", "apiVersion": "coordination.k8s.io/v1",
                         "metadata": {}, "items": self.leases}
        if path == "/api/v1/pods":
            on = query["fieldSelector"][0].removeprefix("spec.nodeName=")
            return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {},
                         "items": [p for p in self.pods if p["spec"]["nodeName"] == on]}
        if len(parts) == 6 and parts[4] == "persistentvolumeclaims":
            found = self.pvcs.get(parts[5])
            return (200, found) if found else self._status(404, "NotFound")
        if parts[:3] == ["api", "v1", "persistentvolumes"]:
            found = self.pvs.get(parts[3])
            return (200, found) if found else self._status(404, "NotFound")
        if len(parts) == 6 and parts[4] == "pods" and method == "DELETE":
            for p in self.pods:
                if p["metadata"]["name"] == parts[5]:
                    self.pods.remove(p)
                    return 200, p
            return self._status(404, "NotFound")
        if len(parts) == 5 and parts[4] == "events" and method == "POST":
            return 201, body
        return self._status(404, "NotFound")


@pytest.fixture
def stub() -> Any:
    server = StubApiServer()
    yield server
    server.close()


def _real_client(url: str) -> KubeApi:
    configuration = k8s.Configuration()
    configuration.host = url
    client = k8s.ApiClient(configuration)
    return KubeApi(k8s.CoreV1Api(client), k8s.CoordinationV1Api(client), instance="ctl-0")


def test_wire_taint_and_untaint(stub: StubApiServer) -> None:
    stub.nodes["a"] = {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "a", "uid": "uid-a", "resourceVersion": "7",
                     "annotations": {"keep": "me"}},
        "spec": {"taints": [{"key": "node.kubernetes.io/unreachable", "effect": "NoExecute",
                             "timeAdded": "2025-03-04T05:06:07Z"}]},
    }
    stub.leases.append({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "a", "namespace": "kube-node-lease"},
        "spec": {"holderIdentity": "a", "leaseDurationSeconds": 40,
                 "renewTime": "2025-03-04T05:06:07.123456Z"},
    })
    kube = _real_client(stub.url)
    (node,) = kube.nodes()
    assert (node.name, node.uid, node.heartbeat_period_s) == ("a", "uid-a", 40.0)
    assert node.heartbeat is not None and "05:06:07.123456" in node.heartbeat
    lists = [r for r in stub.requests if r[0] == "GET" and r[1].endswith(("nodes", "leases"))]
    assert all(r[2].get("resourceVersion") == ["0"] for r in lists)

    assert kube.apply_taint("a") is True
    method, path, _, headers, body = stub.requests[-1]
    assert (method, path) == ("PATCH", "/api/v1/nodes/a")
    assert headers["Content-Type"] == "application/json-patch+json"
    assert body[0] == {"op": "replace", "path": "/metadata/resourceVersion", "value": "7"}
    assert body[1]["value"][0] == {"key": "node.kubernetes.io/unreachable",
                                   "effect": "NoExecute", "timeAdded": "2025-03-04T05:06:07Z"}
    assert body[1]["value"][1]["key"] == nd.TAINT_KEY
    assert body[2]["value"] == {"keep": "me", nd.OWNER_ANNOTATION: nd.OWNER_VALUE}
    assert kube.nodes()[0].out_of_service and kube.nodes()[0].ours

    assert kube.remove_taint("a") is True
    assert stub.nodes["a"]["spec"]["taints"] == [body[1]["value"][0]]
    assert stub.nodes["a"]["metadata"]["annotations"] == {"keep": "me"}


def test_wire_conflict_is_retried(stub: StubApiServer) -> None:
    stub.nodes["a"] = {"apiVersion": "v1", "kind": "Node",
                       "metadata": {"name": "a", "resourceVersion": "1"}, "spec": {}}
    original = stub.route
    bumped = [False]

    def route(method: str, path: str, query: dict[str, list[str]], ctype: str,
              body: Any) -> tuple[int, dict[str, Any]]:
        if method == "PATCH" and not bumped[0]:
            bumped[0] = True
            stub.nodes["a"]["metadata"]["resourceVersion"] = "2"  # someone else wrote
        return original(method, path, query, ctype, body)

    stub.route = route  # type: ignore[method-assign]
    assert _real_client(stub.url).apply_taint("a") is True
    patches = [r for r in stub.requests if r[0] == "PATCH"]
    assert [p[4][0]["value"] for p in patches] == ["1", "2"]


def test_wire_pods_delete_and_event(stub: StubApiServer) -> None:
    stub.pods.append({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "db-0", "namespace": "ns", "uid": "uid-db-0"},
        "spec": {"nodeName": "a", "containers": [{"name": "c"}],
                 "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "d"}}]},
    })
    stub.pvcs["d"] = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                      "metadata": {"name": "d", "namespace": "ns"}, "spec": {"volumeName": "pv"}}
    stub.pvs["pv"] = {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "pv"},
                      "spec": {"csi": {"driver": DRIVER_NAME, "volumeHandle": "v1"}}}
    kube = _real_client(stub.url)
    (facts,) = kube.pod_facts("a")
    assert facts == nd.PodFacts(nd.PodRef("ns", "db-0", "uid-db-0"),
                                tandem_volumes=("v1",))
    assert stub.requests[0][2]["fieldSelector"] == ["spec.nodeName=a"]

    assert kube.delete_pod(facts.pod) is True
    method, path, _, _, body = stub.requests[-1]
    assert (method, path) == ("DELETE", "/api/v1/namespaces/ns/pods/db-0")
    assert body["gracePeriodSeconds"] == 0 and body["preconditions"] == {"uid": "uid-db-0"}
    assert kube.delete_pod(facts.pod) is False  # 404: already gone

    kube.create_event("a", "uid-a", nd.REASON_PODS_DELETED, "gone", "Warning")
    method, path, _, _, body = stub.requests[-1]
    assert (method, path) == ("POST", "/api/v1/namespaces/default/events")
    assert body["involvedObject"] == {"apiVersion": "v1", "kind": "Node", "name": "a",
                                      "uid": "uid-a"}
    assert body["reportingComponent"] == "tandem-controller"
    assert body["source"] == {"component": "tandem-controller"}
    assert (body["reason"], body["type"], body["count"]) == (nd.REASON_PODS_DELETED,
                                                             "Warning", 1)
    assert body["firstTimestamp"].endswith("Z") or "+00:00" in body["firstTimestamp"]
