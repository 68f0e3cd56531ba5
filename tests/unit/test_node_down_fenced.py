"""The node-down responder's fast modes (controller/node_down_fenced.py): tables, properties.

``decide`` is pure: each test builds the Kubernetes view (nodes, pods with their tandem
volume handles and the storage tandem cannot fence), the etcd view (live nodes, each
volume's claim holder and in-sync replicas) and the memory by hand.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csi_driver.controller import node_down as nd
from csi_driver.controller import node_down_fenced as fenced
from csi_driver.controller.node_down import (
    ApplyTaint,
    DeletePods,
    Event,
    KubeNode,
    Memory,
    PodFacts,
    PodRef,
    Policy,
    RemoveTaint,
    TandemView,
    VolumeFacts,
)

FENCED = Policy("fenced", max_fraction=0.5)
FENCED_TAINT = Policy("fenced-taint", max_fraction=0.5)
NODES = ["a", "b", "c", "d"]


def knode(name: str, *, oos: bool = False, ours: bool = False) -> KubeNode:
    # The kubelet Lease is fresh on purpose: the fast modes never look at it.
    return KubeNode(name, f"uid-{name}", oos, ours, heartbeat="just renewed")


def pod(name: str, *volumes: str, blockers: Sequence[str] = (), daemon: bool = False,
        finished: bool = False) -> PodFacts:
    return PodFacts(PodRef("ns", name, f"uid-{name}"), daemon_set=daemon,
                    tandem_volumes=volumes, blockers=tuple(blockers), finished=finished)


def vol(handle: str, claim: str | None, *isr: str) -> VolumeFacts:
    return VolumeFacts(handle, claim, frozenset(isr))


def view(live: Iterable[str], *volumes: VolumeFacts) -> TandemView:
    return TandemView(frozenset(live), frozenset(NODES), {v.volume_id: v for v in volumes})


def run(policy: Policy, tandem: TandemView | None, pods: Mapping[str, Sequence[PodFacts]],
        memory: Memory | None = None, nodes: Sequence[KubeNode] | None = None) -> nd.Decision:
    return fenced.decide(policy, nodes if nodes is not None else [knode(n) for n in NODES],
                         tandem, pods, memory or Memory())


def writes(decision: nd.Decision) -> list[nd.Action]:
    return [a for a in decision.actions if not isinstance(a, Event)]


def reasons(decision: nd.Decision) -> list[str]:
    return [a.reason for a in decision.actions if isinstance(a, Event)]


LIVE_BUT_A = ("b", "c", "d")


@pytest.mark.parametrize(("case", "tandem", "pods", "deleted", "events"), [
    ("claim lapsed, replica live elsewhere: move at once",
     view(LIVE_BUT_A, vol("v1", None, "a", "b")), {"a": [pod("db-0", "v1")]},
     ["db-0"], [nd.REASON_PODS_DELETED]),
    ("the volume already moved to another owner",
     view(LIVE_BUT_A, vol("v1", "b", "b", "c")), {"a": [pod("db-0", "v1")]},
     ["db-0"], [nd.REASON_PODS_DELETED]),
    ("the node is live to etcd: never touched, whatever the claims say",
     view(NODES, vol("v1", None, "a", "b")), {"a": [pod("db-0", "v1")]}, [], []),
    ("the dead node still holds the claim: wait (it lapses within one TTL), quietly",
     view(LIVE_BUT_A, vol("v1", "a", "a", "b")), {"a": [pod("db-0", "v1")]}, [], []),
    ("one of two volumes still claimed: wait",
     view(LIVE_BUT_A, vol("v1", None, "a", "b"), vol("v2", "a", "a", "c")),
     {"a": [pod("db-0", "v1", "v2")]}, [], []),
    ("no in-sync replica live elsewhere: the pod would not start anywhere",
     view(("b",), vol("v1", None, "a", "c")), {"a": [pod("db-0", "v1")]},
     [], [fenced.REASON_POD_KEPT]),
    ("the only in-sync replica was on the dead node",
     view(LIVE_BUT_A, vol("v1", None, "a")), {"a": [pod("db-0", "v1")]},
     [], [fenced.REASON_POD_KEPT]),
    ("another driver's volume too: tandem's evidence proves nothing about it",
     view(LIVE_BUT_A, vol("v1", None, "a", "b")),
     {"a": [pod("db-0", "v1", blockers=["claim logs (ebs.csi.aws.com)"])]},
     [], [fenced.REASON_POD_KEPT]),
    ("a volume without a record",
     view(LIVE_BUT_A), {"a": [pod("db-0", "v9")]}, [], [fenced.REASON_POD_KEPT]),
    ("not ours: no tandem volume, a DaemonSet's pod, a finished pod",
     view(LIVE_BUT_A, vol("v1", None, "a", "b")),
     {"a": [pod("web"), pod("agent", "v1", daemon=True), pod("job", "v1", finished=True),
            pod("nfs-user", blockers=["volume share (nfs)"])]}, [], []),
    ("some ready, some waiting: the ready ones move",
     view(LIVE_BUT_A, vol("v1", None, "a", "b"), vol("v2", "a", "a", "b")),
     {"a": [pod("db-0", "v1"), pod("db-1", "v2")]}, ["db-0"], [nd.REASON_PODS_DELETED]),
    ("the pods were not listed (API error): nothing",
     view(LIVE_BUT_A, vol("v1", None, "a", "b")), {}, [], []),
])
def test_fenced_table(case: str, tandem: TandemView, pods: dict[str, list[PodFacts]],
                      deleted: list[str], events: list[str]) -> None:
    decision = run(FENCED, tandem, pods)
    got = [p.name for a in writes(decision) if isinstance(a, DeletePods) for p in a.pods]
    assert got == deleted, case
    assert reasons(decision) == events, case
    assert all(a.node == "a" for a in decision.actions)


def test_the_event_says_why_and_which_volumes() -> None:
    decision = run(FENCED, view(LIVE_BUT_A, vol("v1", None, "a", "b")),
                   {"a": [pod("db-0", "v1")]})
    delete, event = decision.actions
    assert delete == DeletePods("a", (PodRef("ns", "db-0", "uid-db-0"),))
    assert isinstance(event, Event) and event.type == "Warning"
    assert "gone from etcd" in event.message and "ns/db-0 (v1)" in event.message


def test_why_not_is_said_once_and_again_when_it_changes() -> None:
    pods = {"a": [pod("db-0", "v1")]}
    first = run(FENCED, view(("b",), vol("v1", None, "a", "c")), pods)
    assert reasons(first) == [fenced.REASON_POD_KEPT]
    assert "no in-sync replica of v1" in first.actions[0].message  # type: ignore[union-attr]
    again = run(FENCED, view(("b",), vol("v1", None, "a", "c")), pods, first.memory)
    assert again.actions == ()
    # c comes back: the pod moves now
    moved = run(FENCED, view(("b", "c"), vol("v1", None, "a", "c")), pods, again.memory)
    assert [type(a) for a in moved.actions] == [DeletePods, Event]


def test_a_node_tandem_never_knew_is_never_touched() -> None:
    tandem = TandemView(frozenset({"b"}), frozenset({"b"}), {"v1": vol("v1", None, "b")})
    assert fenced.pods_needed(FENCED, [knode("a"), knode("b")], tandem, Memory()) == set()
    decision = fenced.decide(FENCED, [knode("a"), knode("b")], tandem,
                             {"a": [pod("db-0", "v1")]}, Memory())
    assert decision.actions == ()


def test_etcd_unreadable_decides_nothing() -> None:
    memory = Memory(seen_live=frozenset({"a"}))
    decision = run(FENCED, None, {"a": [pod("db-0", "v1")]}, memory)
    assert decision == nd.Decision((), memory)
    assert fenced.pods_needed(FENCED, [knode("a")], None, memory) == set()


def test_pods_needed_lists_dead_known_nodes_only() -> None:
    nodes = [knode(n) for n in NODES]
    assert fenced.pods_needed(FENCED, nodes, view(LIVE_BUT_A), Memory()) == {"a"}
    assert fenced.pods_needed(FENCED, nodes, view(NODES), Memory()) == set()
    assert fenced.pods_needed(Policy("taint"), nodes, view(LIVE_BUT_A), Memory()) == set()


def test_each_decide_refuses_the_other_family() -> None:
    with pytest.raises(ValueError, match="node_down"):
        fenced.decide(Policy("delete-pods"), [], view(NODES), {}, Memory())
    with pytest.raises(ValueError, match="node_down_fenced"):
        nd.decide(0.0, FENCED, [], view(NODES), {}, Memory())


def test_too_many_dead_refuses_once_per_node() -> None:
    tandem = view(("c", "d"), vol("v1", None, "a", "c"), vol("v2", None, "b", "d"))
    pods = {"a": [pod("db-0", "v1")], "b": [pod("db-1", "v2")]}
    strict = Policy("fenced", max_fraction=0.25)
    first = run(strict, tandem, pods)
    assert writes(first) == []
    assert reasons(first) == [nd.REASON_REFUSED, nd.REASON_REFUSED]
    assert run(strict, tandem, pods, first.memory).actions == ()
    # half dead is within the default fraction
    assert [type(a) for a in writes(run(FENCED, tandem, pods))] == [DeletePods, DeletePods]


@pytest.mark.parametrize("policy", [FENCED, FENCED_TAINT])
def test_our_taint_is_removed_when_the_node_is_live_again(policy: Policy) -> None:
    nodes = [knode("a", oos=True, ours=True), *(knode(n) for n in LIVE_BUT_A)]
    decision = run(policy, view(NODES), {}, nodes=nodes)
    assert writes(decision) == [RemoveTaint("a")]
    assert reasons(decision) == [nd.REASON_UNTAINTED]


# -- fenced-taint -----------------------------------------------------------------------------


@pytest.mark.parametrize(("case", "pods", "node", "deleted", "tainted", "events"), [
    ("every pod covered: moved, and the node tainted", [pod("db-0", "v1")], knode("a"),
     ["db-0"], True, [nd.REASON_PODS_DELETED, nd.REASON_TAINTED]),
    ("a stateless bystander may be evicted with them", [pod("db-0", "v1"), pod("web")],
     knode("a"), ["db-0"], True, [nd.REASON_PODS_DELETED, nd.REASON_TAINTED]),
    ("a bystander with another driver's volume: the taint would detach it",
     [pod("db-0", "v1"), pod("pg", blockers=["claim pg (ebs.csi.aws.com)"])], knode("a"),
     ["db-0"], False, [nd.REASON_PODS_DELETED, fenced.REASON_POD_KEPT]),
    ("a tandem pod still waiting for its claim: no taint yet",
     [pod("db-0", "v1"), pod("db-1", "v2")], knode("a"), ["db-0"], False,
     [nd.REASON_PODS_DELETED]),
    ("no tandem pod at all: not tandem's call", [pod("web")], knode("a"), [], False, []),
    ("someone else's taint is already there", [pod("db-0", "v1")], knode("a", oos=True),
     ["db-0"], False, [nd.REASON_PODS_DELETED]),
    ("our annotation without the taint: someone removed it; not again", [pod("db-0", "v1")],
     knode("a", ours=True), ["db-0"], False, [nd.REASON_PODS_DELETED]),
])
def test_fenced_taint_table(case: str, pods: list[PodFacts], node: KubeNode,
                            deleted: list[str], tainted: bool, events: list[str]) -> None:
    tandem = view(LIVE_BUT_A, vol("v1", None, "a", "b"), vol("v2", "a", "a", "b"))
    nodes = [node, *(knode(n) for n in LIVE_BUT_A)]
    decision = run(FENCED_TAINT, tandem, {"a": pods}, nodes=nodes)
    got = [p.name for a in writes(decision) if isinstance(a, DeletePods) for p in a.pods]
    assert got == deleted, case
    assert (ApplyTaint("a") in decision.actions) == tainted, case
    assert reasons(decision) == events, case


def test_fenced_taint_follows_once_the_last_tandem_pod_moved() -> None:
    nodes = [knode(n) for n in NODES]
    pods = {"a": [pod("db-0", "v1"), pod("db-1", "v2"), pod("web")]}
    first = run(FENCED_TAINT, view(LIVE_BUT_A, vol("v1", None, "a", "b"),
                                   vol("v2", "a", "a", "b")), pods, nodes=nodes)
    assert writes(first) == [DeletePods("a", (PodRef("ns", "db-0", "uid-db-0"),))]
    # db-0 is gone; db-1's claim lapses a second later: it moves and the taint follows
    pods = {"a": [pod("db-1", "v2"), pod("web")]}
    second = run(FENCED_TAINT, view(LIVE_BUT_A, vol("v1", None, "a", "b"),
                                    vol("v2", None, "a", "b")), pods, first.memory, nodes)
    assert writes(second) == [DeletePods("a", (PodRef("ns", "db-1", "uid-db-1"),)),
                              ApplyTaint("a")]
    # and if the last one left by itself before the node was covered, the taint still comes
    third = run(FENCED_TAINT, view(LIVE_BUT_A), {"a": [pod("web")]}, first.memory, nodes)
    assert writes(third) == [ApplyTaint("a")]


# -- properties -------------------------------------------------------------------------------

CLAIMS = st.sampled_from([None, *NODES])


@st.composite
def worlds(draw: st.DrawFn) -> tuple[Policy, list[KubeNode], TandemView, dict[str, list[PodFacts]]]:
    live = draw(st.frozensets(st.sampled_from(NODES)))
    handles = [f"v{i}" for i in range(draw(st.integers(1, 4)))]
    volumes = {h: vol(h, draw(CLAIMS), *draw(st.frozensets(st.sampled_from(NODES))))
               for h in handles if draw(st.booleans()) or h == "v0"}
    pods = {n: [pod(f"{n}{i}", *draw(st.lists(st.sampled_from(handles), max_size=2,
                                                unique=True)),
                    blockers=draw(st.sampled_from([(), ("claim x (other.csi)",)])),
                    daemon=draw(st.booleans()), finished=draw(st.booleans()))
                for i in range(draw(st.integers(0, 3)))] for n in NODES}
    nodes = [knode(n, oos=draw(st.booleans()), ours=draw(st.booleans())) for n in NODES]
    policy = Policy(draw(st.sampled_from(nd.FENCED_MODES)),
                    max_fraction=draw(st.sampled_from([0.25, 0.5, 1.0])))
    tandem = TandemView(live, frozenset(NODES), volumes)
    return policy, nodes, tandem, pods


@settings(max_examples=400, deadline=None)
@given(worlds())
def test_only_fenced_pods_of_dead_nodes_are_moved(
    world: tuple[Policy, list[KubeNode], TandemView, dict[str, list[PodFacts]]],
) -> None:
    policy, nodes, tandem, pods = world
    decision = fenced.decide(policy, nodes, tandem, pods, Memory())
    facts = {f.pod: f for fs in pods.values() for f in fs}
    for action in decision.actions:
        if isinstance(action, DeletePods | ApplyTaint):
            assert action.node not in tandem.live
        if isinstance(action, DeletePods):
            for ref in action.pods:
                f = facts[ref]
                assert not f.blockers and not f.daemon_set and not f.finished
                for handle in f.tandem_volumes:
                    volume = tandem.volumes[handle]
                    assert volume.claim != action.node
                    assert volume.isr & tandem.live - {action.node}
        if isinstance(action, ApplyTaint):
            assert all(not f.blockers for f in pods[action.node])
            assert policy.mode == "fenced-taint"
        if isinstance(action, RemoveTaint):
            assert action.node in tandem.live


@settings(max_examples=300, deadline=None)
@given(worlds())
def test_a_round_on_its_own_outcome_writes_nothing(
    world: tuple[Policy, list[KubeNode], TandemView, dict[str, list[PodFacts]]],
) -> None:
    policy, nodes, tandem, pods = world
    first = fenced.decide(policy, nodes, tandem, pods, Memory())
    by_name = {n.name: n for n in nodes}
    after = {n: list(fs) for n, fs in pods.items()}
    for action in first.actions:
        if isinstance(action, ApplyTaint):
            by_name[action.node] = replace(by_name[action.node], out_of_service=True, ours=True)
        elif isinstance(action, RemoveTaint):
            by_name[action.node] = replace(by_name[action.node], out_of_service=False,
                                           ours=False)
        elif isinstance(action, DeletePods):
            after[action.node] = [f for f in after[action.node] if f.pod not in action.pods]
    second = fenced.decide(policy, list(by_name.values()), tandem, after, first.memory)
    assert second.actions == ()
