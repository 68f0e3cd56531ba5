"""The node-down responder's decisions (csi_driver.controller.node_down), and its controller flags.

``decide`` is pure: every test builds the Kubernetes view, the etcd view and the memory by
hand and checks the actions. ``Sim`` runs rounds over time the way the controller loop does
(a live kubelet renews its Lease between rounds, a dead one does not).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csi_driver import cli
from csi_driver import config as cfg
from csi_driver.controller import node_down as nd
from csi_driver.controller.kube_api import connect
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
    decide,
    pods_needed,
)
from csi_driver.credentials import write_credentials

TAINT = Policy("taint", grace_s=30.0, max_fraction=0.5)
DELETE = Policy("delete-pods", grace_s=30.0, max_fraction=0.5)


def kinds(actions: Iterable[nd.Action]) -> list[tuple[str, str]]:
    return [(type(a).__name__, a.node) for a in actions]


def writes(actions: Iterable[nd.Action]) -> list[nd.Action]:
    return [a for a in actions if not isinstance(a, Event)]


def pod(name: str, *, tandem: bool = True, daemon: bool = False, ns: str = "ns") -> PodFacts:
    return PodFacts(PodRef(ns, name, f"uid-{name}"), daemon_set=daemon,
                    tandem_volumes=(f"vol-{name}",) if tandem else ())


@dataclass
class Sim:
    """A cluster over time: tandem-live nodes, kubelet-live nodes, taints, pods."""

    policy: Policy
    nodes: list[str]
    tandem_live: set[str]
    kubelet_live: set[str]
    referenced: set[str] = field(default_factory=set)
    tainted: set[str] = field(default_factory=set)  # out-of-service taint present
    ours: set[str] = field(default_factory=set)  # our annotation present
    pods: dict[str, list[PodFacts]] = field(default_factory=dict)
    no_lease: set[str] = field(default_factory=set)
    etcd_down: bool = False
    memory: Memory = field(default_factory=Memory)
    now: float = 0.0
    renewals: int = 0

    def kube(self) -> list[KubeNode]:
        self.renewals += 1
        out = []
        for name in self.nodes:
            if name in self.no_lease:
                beat = None
            elif name in self.kubelet_live:
                beat = f"{name}@{self.renewals}"
            else:
                beat = f"{name}@frozen"
            out.append(KubeNode(name, f"uid-{name}", name in self.tainted, name in self.ours,
                                beat))
        return out

    def view(self) -> TandemView | None:
        if self.etcd_down:
            return None
        return TandemView(frozenset(self.tandem_live), frozenset(self.referenced))

    def advance(self, start: int, stop: int) -> None:
        """One round per second from ``start`` up to (not including) ``stop``."""
        for t in range(start, stop):
            self.round(float(t))

    def round(self, at: float, apply: bool = True) -> tuple[nd.Action, ...]:
        self.now = at
        nodes, view = self.kube(), self.view()
        needed = pods_needed(at, self.policy, nodes, view, self.memory)
        pods = {n: self.pods.get(n, []) for n in needed}
        decision = decide(at, self.policy, nodes, view, pods, self.memory)
        self.memory = decision.memory
        if apply:
            self.apply(decision.actions)
        return decision.actions

    def apply(self, actions: Sequence[nd.Action]) -> None:
        for action in actions:
            if isinstance(action, ApplyTaint):
                self.tainted.add(action.node)
                self.ours.add(action.node)
            elif isinstance(action, RemoveTaint):
                self.tainted.discard(action.node)
                self.ours.discard(action.node)
            elif isinstance(action, DeletePods):
                gone = set(action.pods)
                self.pods[action.node] = [p for p in self.pods.get(action.node, [])
                                          if p.pod not in gone]

    def kill(self, name: str) -> None:
        self.tandem_live.discard(name)
        self.kubelet_live.discard(name)

    def revive(self, name: str) -> None:
        self.tandem_live.add(name)
        self.kubelet_live.add(name)


def cluster(policy: Policy = TAINT, n: int = 4) -> Sim:
    names = [f"n{i}" for i in range(1, n + 1)]
    sim = Sim(policy, names, set(names), set(names))
    assert sim.round(0.0) == ()  # every node seen live once: known
    return sim


# -- the basic rule ---------------------------------------------------------------------------


def test_dead_node_is_tainted_after_grace_and_not_before() -> None:
    sim = cluster()
    sim.kill("n2")
    for t in range(1, 31):
        assert sim.round(float(t)) == (), t  # dead since t=1: grace ends at t=31
    actions = sim.round(31.0)
    assert kinds(actions) == [("ApplyTaint", "n2"), ("Event", "n2")]
    event = actions[1]
    assert isinstance(event, Event)
    assert event.reason == nd.REASON_TAINTED and event.type == "Warning"
    assert "30s" in event.message and nd.TAINT_KEY in event.message


def test_idempotent_once_tainted() -> None:
    sim = cluster()
    sim.kill("n2")
    sim.advance(1, 32)
    assert "n2" in sim.tainted and "n2" in sim.ours
    for t in range(32, 100):
        assert sim.round(float(t)) == ()


def test_same_state_twice_gives_the_same_actions_until_applied() -> None:
    sim = cluster()
    sim.kill("n2")
    sim.advance(1, 31)
    first = writes(sim.round(31.0, apply=False))  # the API call failed: nothing changed
    assert writes(sim.round(32.0, apply=False)) == first == writes(sim.round(33.0))
    assert first == [ApplyTaint("n2")]
    assert sim.round(34.0) == ()


def test_live_again_removes_our_taint_only() -> None:
    sim = cluster()
    sim.kill("n2")
    sim.advance(1, 32)
    sim.revive("n2")
    actions = sim.round(40.0)
    assert kinds(actions) == [("RemoveTaint", "n2"), ("Event", "n2")]
    assert isinstance(actions[1], Event) and actions[1].type == "Normal"
    assert actions[1].reason == nd.REASON_UNTAINTED
    assert sim.round(41.0) == ()
    assert not sim.tainted and not sim.ours


def test_tandem_live_is_enough_to_remove_our_taint() -> None:
    """The kubelet may come back later than the node plugin; tandem live is the signal."""
    sim = cluster()
    sim.kill("n2")
    sim.advance(1, 32)
    sim.tandem_live.add("n2")
    assert kinds(writes(sim.round(40.0))) == [("RemoveTaint", "n2")]


def test_admin_taint_never_removed_and_never_claimed() -> None:
    sim = cluster()
    sim.tainted.add("n3")  # an admin tainted a live node
    for t in range(1, 50):
        assert sim.round(float(t)) == ()
    sim.kill("n3")  # ...and then it died: the admin's taint already does the job
    for t in range(50, 200):
        assert sim.round(float(t)) == ()
    sim.revive("n3")
    for t in range(200, 210):
        assert sim.round(float(t)) == ()
    assert sim.tainted == {"n3"} and not sim.ours


def test_our_taint_removed_by_someone_while_down_is_not_reapplied() -> None:
    sim = cluster()
    sim.kill("n2")
    sim.advance(1, 32)
    sim.tainted.discard("n2")  # an admin removed the taint, our annotation stays
    for t in range(32, 100):
        assert sim.round(float(t)) == ()
    sim.revive("n2")  # the stale annotation is cleaned when the node is back
    assert kinds(writes(sim.round(100.0))) == [("RemoveTaint", "n2")]


def test_grace_restarts_when_the_node_comes_back() -> None:
    sim = cluster()
    sim.kill("n2")
    sim.advance(1, 25)
    sim.revive("n2")
    sim.round(25.0)
    sim.kill("n2")
    for t in range(26, 56):
        assert sim.round(float(t)) == (), t
    assert kinds(writes(sim.round(56.0))) == [("ApplyTaint", "n2")]


# -- the kubelet must agree -------------------------------------------------------------------


def test_node_plugin_down_on_a_healthy_node_is_left_alone() -> None:
    """tandem's lease gone (plugin restart, crash loop) but the kubelet renews: no action."""
    sim = cluster()
    sim.tandem_live.discard("n2")
    for t in range(1, 1000, 7):
        assert sim.round(float(t)) == ()


def test_kubelet_silent_but_tandem_live_is_left_alone() -> None:
    sim = cluster()
    sim.kubelet_live.discard("n2")
    for t in range(1, 1000, 7):
        assert sim.round(float(t)) == ()


def test_node_without_kubelet_lease_is_never_acted_on() -> None:
    sim = cluster()
    sim.no_lease.add("n2")
    sim.kill("n2")
    for t in range(1, 500, 5):
        assert sim.round(float(t)) == ()


def test_kubelet_silence_counts_from_the_last_change_we_saw() -> None:
    sim = cluster()
    sim.tandem_live.discard("n2")
    for t in range(1, 100):
        sim.round(float(t))  # kubelet still renewing, tandem dead for long
    sim.kubelet_live.discard("n2")  # last renewal seen at t=99
    for t in range(100, 130):
        assert sim.round(float(t)) == (), t
    assert kinds(writes(sim.round(130.0))) == [("ApplyTaint", "n2")]


def test_kubelet_silence_threshold_is_at_least_half_its_lease() -> None:
    """With a short grace, two missed kubelet renewals (half the Lease duration) are still
    needed: a renewal every 10 s must never look like silence."""
    policy = Policy("taint", grace_s=5.0, max_fraction=1.0)
    nodes = [KubeNode("a", heartbeat="h", heartbeat_period_s=40.0)]
    view = TandemView(frozenset(), frozenset({"a"}))
    memory = Memory()
    decision = decide(0.0, policy, nodes, view, {}, memory)
    assert decide(19.9, policy, nodes, view, {}, decision.memory).actions == ()
    assert kinds(writes(decide(20.0, policy, nodes, view, {}, decision.memory).actions)) == [
        ("ApplyTaint", "a")]


def test_a_controller_restart_only_delays() -> None:
    sim = cluster()
    sim.kill("n2")
    sim.advance(1, 20)
    sim.memory = Memory()  # restarted: n2 is known only through the volume records now
    sim.referenced = {"n2"}
    for t in range(20, 50):
        assert sim.round(float(t)) == (), t
    assert kinds(writes(sim.round(50.0))) == [("ApplyTaint", "n2")]


# -- who is known -----------------------------------------------------------------------------


def test_never_act_on_a_node_tandem_never_knew() -> None:
    sim = cluster()
    sim.nodes.append("stranger")  # in Kubernetes, never registered with tandem
    for t in range(1, 500, 3):
        assert sim.round(float(t)) == ()


def test_referenced_node_is_known_without_being_seen_live() -> None:
    sim = Sim(TAINT, ["n1", "n2", "n3"], {"n1", "n3"}, {"n1", "n3"}, referenced={"n2"})
    sim.round(0.0)
    for t in range(1, 30):
        assert sim.round(float(t)) == ()
    assert kinds(writes(sim.round(30.0))) == [("ApplyTaint", "n2")]


def test_node_missing_from_kubernetes_is_ignored_and_forgotten() -> None:
    sim = cluster()
    sim.kill("n2")
    sim.round(1.0)
    sim.nodes.remove("n2")  # deleted from Kubernetes
    for t in range(2, 100):
        assert sim.round(float(t)) == ()
    assert "n2" not in sim.memory.dead_since
    assert "n2" not in sim.memory.heartbeats
    assert "n2" not in sim.memory.seen_live


def test_memory_forgets_nodes_that_are_live_again() -> None:
    sim = cluster()
    sim.kill("n2")
    sim.round(1.0)
    assert set(sim.memory.dead_since) == {"n2"}
    sim.revive("n2")
    sim.round(2.0)
    assert sim.memory.dead_since == {}


# -- etcd unreachable -------------------------------------------------------------------------


def test_etcd_unreachable_is_no_decision() -> None:
    sim = cluster()
    sim.kill("n2")
    sim.advance(1, 20)
    sim.etcd_down = True
    before = sim.memory
    for t in range(20, 200):
        assert sim.round(float(t)) == ()
    assert sim.memory is before


def test_etcd_unreachable_does_not_remove_taints_either() -> None:
    nodes = [KubeNode("a", out_of_service=True, ours=True, heartbeat="h")]
    assert decide(0.0, TAINT, nodes, None, {}, Memory()).actions == ()


# -- the cap ----------------------------------------------------------------------------------


def test_too_many_dead_refuses_and_warns_once_per_node() -> None:
    sim = cluster(n=4)
    for name in ("n1", "n2", "n3"):
        sim.kill(name)
    for t in range(1, 31):
        assert sim.round(float(t)) == ()
    actions = sim.round(31.0)
    assert kinds(actions) == [("Event", "n1"), ("Event", "n2"), ("Event", "n3")]
    assert all(isinstance(a, Event) and a.reason == nd.REASON_REFUSED and a.type == "Warning"
               and "3 of 4" in a.message for a in actions)
    for t in range(32, 100):
        assert sim.round(float(t)) == ()
    assert not sim.tainted
    sim.revive("n1")  # 2 of 4 dead: within the cap (not more than half)
    assert kinds(writes(sim.round(100.0))) == [("ApplyTaint", "n2"), ("ApplyTaint", "n3")]
    assert sim.memory.warned == frozenset()


def test_exactly_the_fraction_is_allowed() -> None:
    sim = cluster(n=4)
    sim.kill("n1")
    sim.kill("n2")
    sim.advance(1, 31)
    assert kinds(writes(sim.round(31.0))) == [("ApplyTaint", "n1"), ("ApplyTaint", "n2")]


def test_cap_counts_nodes_already_tainted() -> None:
    sim = cluster(n=4)
    sim.kill("n1")
    sim.advance(1, 32)
    assert sim.tainted == {"n1"}
    sim.kill("n2")
    sim.kill("n3")
    for t in range(32, 200):
        assert writes(sim.round(float(t))) == []
    assert sim.tainted == {"n1"}  # kept: still dead


def test_refusal_still_removes_taints_of_nodes_that_are_back() -> None:
    sim = cluster(n=4)
    sim.kill("n1")
    sim.advance(1, 32)
    sim.tandem_live.add("n1")  # n1 is back, three others die
    for name in ("n2", "n3", "n4"):
        sim.kill(name)
    actions = sim.round(32.0)
    assert kinds(writes(actions)) == [("RemoveTaint", "n1")]


def test_refusal_warns_again_after_it_ended() -> None:
    sim = cluster(n=3)
    sim.kill("n1")
    sim.kill("n2")
    sim.advance(1, 31)
    assert len(sim.round(31.0)) == 2
    sim.revive("n2")
    sim.round(32.0)  # n1 alone is within the cap: tainted
    assert sim.tainted == {"n1"}
    sim.kill("n2")
    sim.advance(33, 63)
    assert kinds(sim.round(63.0)) == [("Event", "n2")]


def test_single_known_node_is_never_acted_on() -> None:
    sim = cluster(n=1)
    sim.kill("n1")
    actions = [a for t in range(1, 100) for a in sim.round(float(t))]
    assert kinds(actions) == [("Event", "n1")]  # the refusal, once


def test_fraction_one_allows_all() -> None:
    sim = cluster(Policy("taint", grace_s=30.0, max_fraction=1.0), n=2)
    sim.kill("n1")
    sim.kill("n2")
    sim.advance(1, 31)
    assert kinds(writes(sim.round(31.0))) == [("ApplyTaint", "n1"), ("ApplyTaint", "n2")]


# -- mode delete-pods -------------------------------------------------------------------------


def test_delete_pods_deletes_only_pods_using_tandem() -> None:
    sim = cluster(DELETE)
    sim.pods["n2"] = [pod("db-0"), pod("web", tandem=False), pod("agent", daemon=True),
                      pod("cache-1", ns="a")]
    sim.kill("n2")
    for t in range(1, 31):
        assert sim.round(float(t)) == ()
    actions = sim.round(31.0)
    assert kinds(actions) == [("DeletePods", "n2"), ("Event", "n2")]
    delete, event = actions
    assert isinstance(delete, DeletePods) and isinstance(event, Event)
    assert delete.pods == (PodRef("a", "cache-1", "uid-cache-1"), PodRef("ns", "db-0", "uid-db-0"))
    assert event.reason == nd.REASON_PODS_DELETED and "a/cache-1, ns/db-0" in event.message
    assert sim.round(32.0) == ()  # deleted: nothing left to do
    assert not sim.tainted


def test_delete_pods_catches_pods_that_land_on_the_dead_node_later() -> None:
    sim = cluster(DELETE)
    sim.pods["n2"] = [pod("db-0")]
    sim.kill("n2")
    sim.advance(1, 33)
    assert sim.pods["n2"] == []
    sim.pods["n2"] = [replace(pod("db-0"), pod=PodRef("ns", "db-0", "uid-new"))]
    actions = sim.round(33.0)
    assert [a.pods for a in actions if isinstance(a, DeletePods)] == [
        (PodRef("ns", "db-0", "uid-new"),)]


def test_delete_pods_without_pod_facts_waits() -> None:
    sim = cluster(DELETE)
    sim.kill("n2")
    nodes = sim.kube()
    view = sim.view()
    memory = sim.memory
    for t in range(1, 40):
        decision = decide(float(t), DELETE, nodes, view, {}, memory)
        memory = decision.memory
        assert decision.actions == ()


def test_delete_pods_node_without_tandem_pods_needs_nothing() -> None:
    sim = cluster(DELETE)
    sim.pods["n2"] = [pod("web", tandem=False)]
    sim.kill("n2")
    assert [a for t in range(1, 100) for a in sim.round(float(t))] == []


def test_delete_pods_mode_never_taints_but_cleans_up_old_taints() -> None:
    sim = cluster(DELETE)
    sim.tainted.add("n3")
    sim.ours.add("n3")  # left over from an earlier run in mode taint
    assert kinds(writes(sim.round(1.0))) == [("RemoveTaint", "n3")]
    sim.kill("n2")
    assert not [a for t in range(2, 100) for a in sim.round(float(t))
                if isinstance(a, ApplyTaint)]


def test_delete_pods_respects_the_cap() -> None:
    sim = cluster(DELETE, n=2)
    sim.pods = {"n1": [pod("a")], "n2": [pod("b")]}
    sim.kill("n1")
    sim.kill("n2")
    actions = [a for t in range(1, 100) for a in sim.round(float(t))]
    assert kinds(actions) == [("Event", "n1"), ("Event", "n2")]
    assert all(isinstance(a, Event) and a.reason == nd.REASON_REFUSED for a in actions)


def test_pods_needed_only_for_due_nodes_in_delete_pods_mode() -> None:
    sim = cluster(DELETE)
    sim.kill("n2")
    nodes, view = sim.kube(), sim.view()
    decision = decide(1.0, DELETE, nodes, view, {}, sim.memory)
    assert pods_needed(10.0, DELETE, nodes, view, decision.memory) == frozenset()
    assert pods_needed(31.0, DELETE, nodes, view, decision.memory) == {"n2"}
    assert pods_needed(31.0, TAINT, nodes, view, decision.memory) == frozenset()
    assert pods_needed(31.0, DELETE, nodes, None, decision.memory) == frozenset()


# -- shape of the output ----------------------------------------------------------------------


def test_every_event_follows_its_action_for_the_same_node() -> None:
    sim = cluster(n=6)
    sim.kill("n2")
    sim.kill("n5")
    sim.advance(1, 31)
    actions = sim.round(31.0)
    assert kinds(actions) == [("ApplyTaint", "n2"), ("Event", "n2"), ("ApplyTaint", "n5"),
                              ("Event", "n5")]


@pytest.mark.parametrize(
    ("mode", "grace", "fraction"),
    [("off", 30.0, 0.5), ("evict", 30.0, 0.5), ("taint", 0.0, 0.5), ("taint", -1.0, 0.5),
     ("taint", 30.0, 0.0), ("taint", 30.0, 1.5), ("taint", float("nan"), 0.5)],
)
def test_policy_rejects_bad_values(mode: str, grace: float, fraction: float) -> None:
    with pytest.raises(ValueError):
        Policy(mode, grace, fraction)


# -- properties -------------------------------------------------------------------------------

NAMES = ["a", "b", "c", "d", "e"]


@st.composite
def states(draw: st.DrawFn) -> tuple[
    float, Policy, list[KubeNode], TandemView | None, dict[str, list[PodFacts]], Memory
]:
    """Random clusters, biased towards the interesting case: dead, known, kubelet silent."""
    names = draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=5))
    mostly_false = st.sampled_from([False, False, False, True])
    times = st.floats(0, 200)
    nodes: list[KubeNode] = []
    live: set[str] = set()
    referenced: set[str] = set()
    seen: set[str] = set()
    dead_since: dict[str, float] = {}
    heartbeats: dict[str, tuple[str, float]] = {}
    for n in names:
        beat = draw(st.sampled_from([None, "h1", "h2", "h2"]))
        nodes.append(KubeNode(n, f"uid-{n}", draw(mostly_false), draw(mostly_false), beat,
                              draw(st.sampled_from([10.0, 40.0, 120.0]))))
        if draw(st.booleans()):
            live.add(n)
        if draw(st.booleans()):
            referenced.add(n)
        if draw(st.booleans()):
            seen.add(n)
        if draw(st.booleans()):
            dead_since[n] = draw(times)
        if draw(st.booleans()):
            heartbeats[n] = (beat if beat and draw(st.booleans()) else "h1", draw(times))
    outsiders = st.frozensets(st.sampled_from(["x", "y"]))  # ids Kubernetes does not know
    view: TandemView | None = TandemView(frozenset(live) | draw(outsiders),
                                         frozenset(referenced) | draw(outsiders))
    if draw(mostly_false):
        view = None  # etcd unreachable
    policy = Policy(draw(st.sampled_from(nd.KUBELET_MODES)),
                    draw(st.sampled_from([5.0, 30.0, 90.0])),
                    draw(st.sampled_from([0.25, 0.5, 1.0, 1.0])))
    memory = Memory(dead_since=dead_since, heartbeats=heartbeats,
                    seen_live=frozenset(seen) | draw(outsiders),
                    warned=draw(st.frozensets(st.sampled_from(NAMES))))
    pods = {
        n: [pod(f"p{i}", tandem=draw(st.booleans()), daemon=draw(mostly_false))
            for i in range(draw(st.integers(0, 3)))]
        for n in names
    }
    return draw(st.floats(0, 400)), policy, nodes, view, pods, memory


State = tuple[float, Policy, list[KubeNode], TandemView | None, dict[str, list[PodFacts]], Memory]


def _apply(nodes: list[KubeNode], pods: Mapping[str, list[PodFacts]],
           actions: Sequence[nd.Action]) -> tuple[list[KubeNode], dict[str, list[PodFacts]]]:
    by_name = {n.name: n for n in nodes}
    out_pods = {k: list(v) for k, v in pods.items()}
    for action in actions:
        if isinstance(action, ApplyTaint):
            by_name[action.node] = replace(by_name[action.node], out_of_service=True, ours=True)
        elif isinstance(action, RemoveTaint):
            by_name[action.node] = replace(by_name[action.node], out_of_service=False,
                                           ours=False)
        elif isinstance(action, DeletePods):
            out_pods[action.node] = [p for p in out_pods[action.node]
                                     if p.pod not in action.pods]
    return [by_name[n.name] for n in nodes], out_pods


@st.composite
def dead_clusters(draw: st.DrawFn) -> State:
    """Every node known; some dead long enough with a silent kubelet: actions are due."""
    names = draw(st.lists(st.sampled_from(NAMES), unique=True, min_size=1, max_size=5))
    dead = draw(st.frozensets(st.sampled_from(names), min_size=1))
    nodes = [KubeNode(n, f"uid-{n}", draw(st.booleans()), draw(st.booleans()), "h", 40.0)
             for n in names]
    memory = Memory(dead_since={n: 0.0 for n in dead}, heartbeats={n: ("h", 0.0) for n in names},
                    seen_live=frozenset(names))
    policy = Policy(draw(st.sampled_from(nd.KUBELET_MODES)), 30.0,
                    draw(st.sampled_from([0.25, 0.5, 0.75, 1.0])))
    pods = {n: [pod(f"p{i}", tandem=draw(st.booleans()), daemon=draw(st.booleans()))
                for i in range(draw(st.integers(0, 3)))] for n in names}
    view = TandemView(frozenset(names) - dead)
    return draw(st.floats(30, 400)), policy, nodes, view, pods, memory


@settings(max_examples=300, deadline=None)
@given(dead_clusters())
def test_due_nodes_are_acted_on_within_the_cap(state: State) -> None:
    now, policy, nodes, view, pods, memory = state
    assert view is not None
    decision = decide(now, policy, nodes, view, pods, memory)
    dead = {n.name for n in nodes} - view.live
    acted = {a.node for a in decision.actions if isinstance(a, ApplyTaint | DeletePods)}
    if len(dead) > policy.max_fraction * len(nodes):
        assert not acted
    elif policy.mode == "taint":
        assert acted == {n.name for n in nodes
                         if n.name in dead and not n.out_of_service and not n.ours}
    else:
        assert acted == {n for n in dead
                         if any(f.uses_tandem and not f.daemon_set for f in pods[n])}
    _check(state)


@settings(max_examples=400, deadline=None)
@given(states())
def test_properties(state: State) -> None:
    _check(state)


def _check(state: State) -> None:
    now, policy, nodes, view, pods, memory = state
    decision = decide(now, policy, nodes, view, pods, memory)
    by_name = {n.name: n for n in nodes}
    if view is None:
        assert decision.actions == () and decision.memory is memory
        return
    known = view.live | view.referenced | memory.seen_live
    for action in decision.actions:
        node = by_name[action.node]
        if isinstance(action, RemoveTaint):
            assert node.ours  # never an admin's taint
            assert action.node in view.live
        if isinstance(action, ApplyTaint | DeletePods):
            assert action.node not in view.live  # never a live node
            assert action.node in known  # never a node tandem never knew
            assert node.heartbeat is not None  # never without the kubelet's word
        if isinstance(action, ApplyTaint):
            assert policy.mode == "taint"
            assert not node.out_of_service and not node.ours
        if isinstance(action, DeletePods):
            assert policy.mode == "delete-pods" and action.pods
            facts = {f.pod: f for f in pods[action.node]}
            assert all(facts[p].uses_tandem and not facts[p].daemon_set for p in action.pods)
    known_here = known & set(by_name)
    dead = known_here - view.live
    if len(dead) > policy.max_fraction * len(known_here):
        assert not [a for a in decision.actions if isinstance(a, ApplyTaint | DeletePods)]
    # Idempotent: with the state the actions produce, the next round has nothing to do.
    nodes2, pods2 = _apply(nodes, pods, decision.actions)
    again = decide(now, policy, nodes2, view, pods2, decision.memory)
    assert again.actions == ()


# -- flags ------------------------------------------------------------------------------------

@pytest.fixture
def base(tmp_path: Path) -> list[str]:
    """The controller's required flags, with a real agent key (checked before serving)."""
    write_credentials(tmp_path / "credentials")
    return ["controller", "--csi-endpoint", "unix:///tmp/tandem-nd-test.sock",
            "--etcd-endpoints", "http://127.0.0.1:1",
            "--agent-key-file", str(tmp_path / "credentials" / "agent.key")]


@pytest.mark.parametrize(("kubeconfig", "environ", "mode"), [
    (None, {}, "off"),  # outside Kubernetes there is nothing to respond to
    (None, {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, "fenced"),  # in a pod
    (None, {"KUBERNETES_SERVICE_HOST": ""}, "off"),
    ("/k/config", {}, "fenced"),
])
def test_default_mode_is_fenced_where_there_is_a_kubernetes_api(
    kubeconfig: str | None, environ: dict[str, str], mode: str,
) -> None:
    assert cfg.default_node_down_mode(kubeconfig, environ) == mode


def test_flags_defaults(base: list[str]) -> None:
    args = cli.build_parser().parse_args(base)
    assert args.node_down_responder is None  # resolved by default_node_down_mode
    assert args.node_down_grace == 30.0 == cfg.DEFAULT_NODE_DOWN_GRACE_S
    assert args.node_down_max_fraction == 0.5
    assert args.kubeconfig is None


def test_flags_parse(base: list[str]) -> None:
    args = cli.build_parser().parse_args(
        [*base, "--node-down-responder", "delete-pods", "--node-down-grace", "45",
         "--node-down-max-fraction", "0.3", "--kubeconfig", "/k/config"])
    assert (args.node_down_responder, args.node_down_grace, args.node_down_max_fraction,
            args.kubeconfig) == ("delete-pods", 45.0, 0.3, "/k/config")


@pytest.mark.parametrize("extra", [["--node-down-responder", "evict"],
                                   ["--node-down-grace", "soon"],
                                   ["--node-down-max-fraction", "half"]])
def test_bad_flags_exit_2(extra: list[str], capsys: pytest.CaptureFixture[str],
                         base: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main([*base, *extra])
    assert exc.value.code == 2
    assert extra[0] in capsys.readouterr().err


@pytest.mark.parametrize("extra", [["--node-down-grace", "1"], ["--node-down-grace", "1e9"],
                                   ["--node-down-grace", "nan"],
                                   ["--node-down-max-fraction", "0"],
                                   ["--node-down-max-fraction", "1.01"]])
def test_bad_values_exit_2(extra: list[str], capsys: pytest.CaptureFixture[str],
                          base: list[str]) -> None:
    assert cli.main([*base, "--node-down-responder", "taint", *extra]) == 2
    assert extra[0] in capsys.readouterr().err


def test_config_rejects_unknown_mode() -> None:
    with pytest.raises(cfg.ConfigError, match="--node-down-responder"):
        cfg.ControllerConfig(csi_socket=Path("/x.sock"),
                             etcd=cfg.EtcdConfig(("http://127.0.0.1:1",)),
                             agent_key_file=Path("/agent.key"), node_down_mode="taints")


def test_missing_kubernetes_package_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], base: list[str]
) -> None:
    """Enabled without the package: a clear message and exit 2, before anything is served."""
    monkeypatch.setitem(__import__("sys").modules, "kubernetes", None)
    assert cli.main([*base, "--node-down-responder", "taint"]) == 2
    err = capsys.readouterr().err
    assert "kubernetes" in err and "pip install" in err


@pytest.mark.parametrize("url", ["https://10.0.0.1:6443", "https://api.example:443/",
                                 "http://127.0.0.1:8080"])
def test_kube_api_server_override_reaches_the_client(url: str, tmp_path: Path) -> None:
    """Issue 12 #3: without kube-proxy the Service address from the service account is
    unreachable; --kube-api-server replaces it, as the sidecars allow."""
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: k, cluster: {server: 'https://kubernetes.default.svc'}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u}}]\n")
    api = connect(kubeconfig, cfg.api_server_url(url))
    assert api._core.api_client.configuration.host == url.rstrip("/")
    assert api._coordination.api_client.configuration.host == url.rstrip("/")
    plain = connect(kubeconfig)
    assert plain._core.api_client.configuration.host == "https://kubernetes.default.svc"


@pytest.mark.parametrize("url", ["10.0.0.1:6443", "ftp://x", "https://", "https://h/path",
                                 "https://h:99999", "https://h?x=1"])
def test_bad_kube_api_server_exits_2(url: str, base: list[str],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main([*base, "--kube-api-server", url])
    assert exc.value.code == 2
    assert "--kube-api-server" in capsys.readouterr().err
