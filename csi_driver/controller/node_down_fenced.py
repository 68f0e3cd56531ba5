"""The node-down responder's fast modes, ``fenced`` and ``fenced-taint``: pure, no I/O.

The kubelet-gated modes (``node_down``) wait until Kubernetes itself could tell that a node
is dead. These modes act on what only tandem knows, per pod, as soon as it is
true: a pod on node N can do nothing useful there, and moving it cannot let two writers at
its data, once

1. N is gone from etcd (its tandem lease lapsed or was revoked), and
2. every tandem volume the pod uses has no live ownership claim held by N: the claim is
   bound to the lease of N's target, and that target stops acknowledging writes before the
   lease can lapse; any later owner bumps the epoch and fences every replica, so N can never
   write to it again (docs/architecture.md, invariants I2 and I6), and
3. each of those volumes has an in-sync replica on another live node, so the replacement
   pod can stage it at once (otherwise moving the pod only trades a stuck pod for a Pending
   one: leave it, and say why once), and
4. the pod uses no storage tandem cannot fence (another driver's volume, an inline network
   volume): for those, tandem's evidence proves nothing. Leave the pod, and say why once.

Mode ``fenced`` then force-deletes each such pod (its controller recreates it elsewhere;
StatefulSet and ReadWriteOncePod included: the old pod object is exactly what holds them).
Mode ``fenced-taint`` does the same and also applies the out-of-service taint to N (which
keeps the scheduler off N and hands N's other pods to Kubernetes' fast path), but the taint
is node-wide, so only when every pod on N is covered: tandem pods moved (this round or an
earlier one), none waiting, and no pod on N with storage tandem cannot fence. No grace and
no kubelet Lease: the evidence is the lapsed claims, which takes one lease TTL. The
``max_fraction`` guard and the removal of tandem's own taint when the node is live again are
the same as in the kubelet-gated modes. Idempotent: with the state the actions produce, the
next round yields no action.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from csi_driver.controller import node_down as nd

REASON_POD_KEPT = "TandemPodNotMoved"


@dataclass(frozen=True)
class _Verdict:
    ready: bool
    why_not: str = ""  # empty: nothing worth reporting (transient, or not tandem's business)


_READY = _Verdict(True)
_QUIET = _Verdict(False)


def pods_needed(
    policy: nd.Policy, nodes: Sequence[nd.KubeNode], tandem: nd.TandemView | None,
    memory: nd.Memory,
) -> frozenset[str]:
    """Nodes whose pods (and their volumes' facts) ``decide`` needs: every known node that is
    not live in etcd."""
    if tandem is None or policy.mode not in nd.FENCED_MODES:
        return frozenset()
    return nd.known_nodes(nodes, tandem, memory)[1]


def decide(
    policy: nd.Policy,
    nodes: Sequence[nd.KubeNode],
    tandem: nd.TandemView | None,
    pods: Mapping[str, Sequence[nd.PodFacts]],
    memory: nd.Memory,
) -> nd.Decision:
    """One round. ``tandem`` None: etcd unreadable, no decision. ``pods`` maps a node from
    ``pods_needed`` to its pods (a node missing is not acted on this round);
    ``tandem.volumes`` holds the facts of every volume handle those pods name (a handle
    missing from it is a volume without a record)."""
    if policy.mode not in nd.FENCED_MODES:
        raise ValueError(f"mode {policy.mode!r} decides in csi_driver.controller.node_down")
    if tandem is None:
        return nd.Decision((), memory)
    known, dead, seen_live = nd.known_nodes(nodes, tandem, memory)
    by_name = {n.name: n for n in nodes}
    actions = nd.untaint(nodes, tandem)
    reports: list[nd.Action] = []
    reported: set[str] = set()
    deletes: list[tuple[str, tuple[nd.PodFacts, ...]]] = []
    taints: list[str] = []

    for name in sorted(dead):
        if name not in pods:
            continue
        verdicts = [(f, _verdict(name, f, tandem)) for f in pods[name]]
        for facts, verdict in verdicts:
            if verdict.why_not:
                key = f"{facts.pod.uid} {verdict.why_not}"
                reported.add(key)
                if key not in memory.reported:
                    reports.append(nd.Event(name, REASON_POD_KEPT,
                                            f"tandem: left pod {facts.pod} on the dead node: "
                                            f"{verdict.why_not}"))
        ready = tuple(f for f, v in verdicts if v.ready)
        if ready:
            deletes.append((name, ready))
        moved = f"node {name} moved pods"  # remembered while the node stays dead
        if ready or moved in memory.reported:
            reported.add(moved)
        if policy.mode != "fenced-taint":
            continue
        node = by_name[name]
        uncovered = [f for f, v in verdicts if not v.ready and not _bystander(f)]
        for facts in uncovered:
            if _bystander_blocked(facts):
                key = f"{facts.pod.uid} taint"
                reported.add(key)
                if key not in memory.reported:
                    reports.append(nd.Event(name, REASON_POD_KEPT, (
                        f"tandem: not tainting the dead node: the taint would also evict pod "
                        f"{facts.pod}, which uses {', '.join(facts.blockers)}; tandem cannot "
                        "fence that")))
        if (moved in reported and not uncovered and not node.out_of_service
                and not node.ours):
            taints.append(name)

    memory = replace(memory, seen_live=seen_live, reported=frozenset(reported))
    acting = sorted({name for name, _ in deletes} | set(taints))
    if acting and nd.too_many_dead(policy, known, dead):
        actions += reports + nd.refusals(acting, known, dead, policy, memory)
        return nd.Decision(tuple(actions), replace(memory, warned=frozenset(acting)))
    for name, ready in deletes:
        listed = ", ".join(f"{f.pod} ({' '.join(f.tandem_volumes)})" for f in ready)
        actions.append(nd.DeletePods(name, tuple(sorted(
            (f.pod for f in ready), key=lambda p: (p.namespace, p.name, p.uid)))))
        actions.append(nd.Event(name, nd.REASON_PODS_DELETED, (
            f"tandem: node {name} is gone from etcd and has lost its claims on these pods' "
            "volumes (it is fenced from them; each has an in-sync replica on a live node); "
            f"force-deleted {listed}")))
    for name in taints:
        actions.append(nd.ApplyTaint(name))
        actions.append(nd.Event(name, nd.REASON_TAINTED, (
            f"tandem: node {name} is gone from etcd, its tandem pods are fenced and moved, and "
            "no pod on it uses storage tandem cannot fence; applied "
            f"{nd.TAINT_KEY}={nd.TAINT_VALUE}:{nd.TAINT_EFFECT} (tandem removes it when the "
            "node is live again)")))
    actions += reports
    return nd.Decision(tuple(actions), replace(memory, warned=frozenset()))


def _not_ours(facts: nd.PodFacts) -> bool:
    """Nothing to gain by moving it (a DaemonSet's pod comes back on the same node, a
    finished pod holds nothing), or not tandem's business (no tandem volume)."""
    return facts.finished or facts.daemon_set or not facts.tandem_volumes


def _bystander(facts: nd.PodFacts) -> bool:
    """A pod fenced-taint may let the taint evict along with the tandem pods: one of ours
    is never a bystander; another is, when it holds no storage tandem cannot fence."""
    return _not_ours(facts) and not facts.blockers


def _bystander_blocked(facts: nd.PodFacts) -> bool:
    return _not_ours(facts) and bool(facts.blockers)


def _verdict(node: str, facts: nd.PodFacts, tandem: nd.TandemView) -> _Verdict:
    if _not_ours(facts):
        return _QUIET
    if facts.blockers:
        return _Verdict(False, _blocked(facts))
    for handle in facts.tandem_volumes:
        volume = tandem.volumes.get(handle)
        if volume is None:
            return _Verdict(False, f"tandem has no record of its volume {handle}")
        if volume.claim == node:
            return _QUIET  # the claim lapses within one lease TTL; look again next round
        elsewhere = sorted(n for n in volume.isr if n != node and n in tandem.live)
        if not elsewhere:
            isr = ", ".join(sorted(volume.isr)) or "none"
            return _Verdict(False, f"no in-sync replica of {handle} is live on another node "
                                   f"(in sync: {isr}); moving the pod would not start it")
    return _READY


def _blocked(facts: nd.PodFacts) -> str:
    return (f"it also uses {', '.join(facts.blockers)}, which tandem cannot fence; "
            "Kubernetes' own handling applies")
