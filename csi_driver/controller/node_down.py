"""The node-down responder's decisions: pure, no I/O (the edge is ``kube_api``).

When a node dies, Kubernetes leaves its pods Terminating for minutes and a StatefulSet never
recreates them by itself. tandem sees the death sooner: the node's record vanishes from etcd
with its lease. Once a node has been gone from etcd for ``grace_s`` *and* its kubelet has not
renewed its Lease (``kube-node-lease/<node>``) for as long, the responder either applies the
``node.kubernetes.io/out-of-service=nodeshutdown:NoExecute`` taint (mode ``taint``:
Kubernetes then evicts the node's pods, force-deletes them once the node is NotReady, and
detaches their volumes), or force-deletes the node's pods that use tandem volumes (mode
``delete-pods``). A taint tandem applied is marked with the node annotation
``tandem.csi.io/out-of-service-by=tandem`` and removed when the node is live in etcd again;
a taint anyone else applied is never touched.

Safety does not rest on this module: a volume moves by an epoch CAS in etcd and the new owner
fences every replica, so a zombie node cannot write (docs/architecture.md). What this module
guards against is *needless* disruption:

- never act on a node tandem never knew (live now, seen live by this process, or named by a
  volume record), nor on one missing from Kubernetes;
- never act when tandem's liveness is unknown (etcd unreachable: the caller passes ``None``);
- never act on the tandem lease alone: the kubelet must be silent too (a tandem node plugin
  that restarts or crash-loops on a healthy node must not get the node's pods deleted). A
  node without a kubelet Lease is never acted on;
- never act when more than ``max_fraction`` of the known nodes look dead: that is more likely
  an etcd or network problem on our side than that many dead nodes. Refuse, and say so once
  per node with a Warning event;
- never take over a taint present without our annotation, and never re-apply one of ours
  that someone removed while the node was still down (the annotation stays as the marker
  until the node is live again).

Times are the caller's monotonic clock. "First seen dead" and "heartbeat first seen" are
remembered in ``Memory``; a restart of the controller only delays (the grace starts again).
Idempotent: with the state the actions produce, the next round yields no action.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

# "fenced" and "fenced-taint" act per pod on tandem's own evidence (node_down_fenced);
# "taint" and "delete-pods" act per node once tandem's lease and the kubelet's are both silent.
FENCED_MODES = ("fenced", "fenced-taint")
KUBELET_MODES = ("taint", "delete-pods")
MODES = FENCED_MODES + KUBELET_MODES
TAINT_KEY = "node.kubernetes.io/out-of-service"
TAINT_VALUE = "nodeshutdown"
TAINT_EFFECT = "NoExecute"
OWNER_ANNOTATION = "tandem.csi.io/out-of-service-by"
OWNER_VALUE = "tandem"
# The kubelet renews its Lease every leaseDurationSeconds / 4 (10 s of 40 s by default): it
# is silent only once two renewals are missing.
KUBELET_SILENT_FRACTION = 0.5
DEFAULT_KUBELET_LEASE_S = 40.0

REASON_TAINTED = "TandemOutOfServiceTaintApplied"
REASON_UNTAINTED = "TandemOutOfServiceTaintRemoved"
REASON_PODS_DELETED = "TandemPodsForceDeleted"
REASON_REFUSED = "TandemNodeDownRefused"


# -- inputs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class KubeNode:
    """One Kubernetes Node, as the edge read it."""

    name: str
    uid: str = ""
    out_of_service: bool = False  # a taint with key TAINT_KEY is on the node (anyone's)
    ours: bool = False  # OWNER_ANNOTATION == OWNER_VALUE: tandem applied that taint
    heartbeat: str | None = None  # the kubelet Lease's renewTime (opaque); None: no Lease
    heartbeat_period_s: float = DEFAULT_KUBELET_LEASE_S  # the Lease's leaseDurationSeconds


@dataclass(frozen=True)
class VolumeFacts:
    """One volume as etcd says now: who holds its ownership claim, and its in-sync replicas."""

    volume_id: str
    claim: str | None  # node whose target holds ``owners/<volume>``; None: no live claim
    isr: frozenset[str]


@dataclass(frozen=True)
class TandemView:
    """What etcd says: nodes whose lease is alive, nodes named by a volume record, and (the
    fenced modes) the volumes the pods of dead nodes use, by volume handle."""

    live: frozenset[str]
    referenced: frozenset[str] = frozenset()
    volumes: Mapping[str, VolumeFacts] = field(default_factory=dict)


@dataclass(frozen=True)
class PodRef:
    namespace: str
    name: str
    uid: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class PodFacts:
    """A pod on a node: does it use a tandem volume (a PVC bound to a PV of our driver)?"""

    pod: PodRef
    daemon_set: bool = False  # recreated on the same node: deleting it gains nothing
    tandem_volumes: tuple[str, ...] = ()  # volume handles of its tandem PVs
    # Storage tandem cannot fence (another driver's PV, an inline network volume): named,
    # so the event can say why the pod is left alone.
    blockers: tuple[str, ...] = ()
    finished: bool = False  # phase Succeeded or Failed: holds nothing, gains nothing

    @property
    def uses_tandem(self) -> bool:
        return bool(self.tandem_volumes)


@dataclass(frozen=True)
class Policy:
    mode: str  # one of MODES
    grace_s: float = 30.0
    max_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not self.grace_s > 0:
            raise ValueError(f"grace_s must be > 0, got {self.grace_s}")
        if not 0 < self.max_fraction <= 1:
            raise ValueError(f"max_fraction must be within (0, 1], got {self.max_fraction}")


@dataclass(frozen=True)
class Memory:
    """What the responder remembers between rounds (in memory only)."""

    dead_since: Mapping[str, float] = field(default_factory=dict)  # gone from etcd since
    heartbeats: Mapping[str, tuple[str, float]] = field(default_factory=dict)  # value, seen
    seen_live: frozenset[str] = frozenset()  # live in etcd at some round of this process
    warned: frozenset[str] = frozenset()  # refusal already reported for these nodes
    reported: frozenset[str] = frozenset()  # fenced modes: "why not" already said, per pod


# -- outputs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApplyTaint:
    node: str


@dataclass(frozen=True)
class RemoveTaint:
    node: str


@dataclass(frozen=True)
class DeletePods:
    node: str
    pods: tuple[PodRef, ...]


@dataclass(frozen=True)
class Event:
    node: str
    reason: str
    message: str
    type: str = "Warning"  # "Normal" | "Warning"


Action = ApplyTaint | RemoveTaint | DeletePods | Event


@dataclass(frozen=True)
class Decision:
    actions: tuple[Action, ...]
    memory: Memory


# -- logic --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Observed:
    memory: Memory
    known: frozenset[str]  # known to tandem and present in Kubernetes
    dead: frozenset[str]  # known and not live in etcd (any duration)
    due: tuple[str, ...]  # dead >= grace and kubelet silent >= its threshold, sorted


def known_nodes(
    nodes: Sequence[KubeNode], tandem: TandemView, memory: Memory
) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """(known, dead, seen_live): nodes tandem knows that exist in Kubernetes, those of them
    not live in etcd now, and every node this process has seen live (kept while it exists)."""
    names = frozenset(n.name for n in nodes)
    live = tandem.live
    seen_live = (memory.seen_live | live) & (names | live)
    known = (live | tandem.referenced | seen_live) & names
    return known, known - live, seen_live


def untaint(nodes: Sequence[KubeNode], tandem: TandemView) -> list[Action]:
    """Every mode: a node live in etcd again loses the taint tandem applied to it."""
    actions: list[Action] = []
    for name in sorted(n.name for n in nodes if n.ours and n.name in tandem.live):
        actions.append(RemoveTaint(name))
        actions.append(Event(name, REASON_UNTAINTED, "tandem: the node is live again; removed "
                             f"the {TAINT_KEY} taint tandem applied", "Normal"))
    return actions


def too_many_dead(policy: Policy, known: frozenset[str], dead: frozenset[str]) -> bool:
    return len(dead) > policy.max_fraction * len(known)


def refusals(
    candidates: Sequence[str], known: frozenset[str], dead: frozenset[str], policy: Policy,
    memory: Memory,
) -> list[Action]:
    """One Warning per candidate node (once while the refusal lasts): too many look dead."""
    return [Event(name, REASON_REFUSED, (
        f"tandem: {len(dead)} of {len(known)} known nodes look dead (more than "
        f"{policy.max_fraction:g} of them); not acting on any: more likely an etcd or "
        "network problem than dead nodes"))
        for name in candidates if name not in memory.warned]


def _observe(
    now: float, policy: Policy, nodes: Sequence[KubeNode], tandem: TandemView, memory: Memory
) -> _Observed:
    by_name = {n.name: n for n in nodes}
    known, dead, seen_live = known_nodes(nodes, tandem, memory)
    dead_since = {n: memory.dead_since.get(n, now) for n in dead}
    heartbeats: dict[str, tuple[str, float]] = {}
    for node in nodes:
        if node.heartbeat is None:
            continue
        previous = memory.heartbeats.get(node.name)
        same = previous is not None and previous[0] == node.heartbeat
        heartbeats[node.name] = previous if same and previous else (node.heartbeat, now)
    due = []
    for name in sorted(dead):
        beat = heartbeats.get(name)
        if beat is None or now - dead_since[name] < policy.grace_s:
            continue
        silent_needed = max(policy.grace_s,
                            KUBELET_SILENT_FRACTION * by_name[name].heartbeat_period_s)
        if now - beat[1] >= silent_needed:
            due.append(name)
    updated = replace(memory, dead_since=dead_since, heartbeats=heartbeats,
                      seen_live=seen_live)
    return _Observed(updated, known, dead, tuple(due))


def pods_needed(
    now: float, policy: Policy, nodes: Sequence[KubeNode], tandem: TandemView | None,
    memory: Memory,
) -> frozenset[str]:
    """Nodes whose pod facts ``decide`` will need this round (mode delete-pods only), so the
    edge lists pods of dead nodes only. Same ``now`` and inputs as the ``decide`` call."""
    if tandem is None or policy.mode != "delete-pods":
        return frozenset()
    return frozenset(_observe(now, policy, nodes, tandem, memory).due)


def decide(
    now: float,
    policy: Policy,
    nodes: Sequence[KubeNode],
    tandem: TandemView | None,
    pods: Mapping[str, Sequence[PodFacts]],
    memory: Memory,
) -> Decision:
    """One round: the actions to take, in order, and the memory for the next round.

    ``tandem`` None means etcd could not be read: no decision, memory unchanged. ``pods``
    maps a node (from ``pods_needed``) to its pods; a node missing from it is not acted on
    this round (mode delete-pods).
    """
    if tandem is None:
        return Decision((), memory)
    if policy.mode in FENCED_MODES:
        raise ValueError(f"mode {policy.mode!r} decides in csi_driver.controller.node_down_fenced")
    seen = _observe(now, policy, nodes, tandem, memory)
    by_name = {n.name: n for n in nodes}
    actions = untaint(nodes, tandem)

    candidates: list[tuple[str, tuple[PodRef, ...]]] = []
    for name in seen.due:
        node = by_name[name]
        if policy.mode == "taint":
            if not node.out_of_service and not node.ours:
                candidates.append((name, ()))
        else:
            victims = tuple(sorted(
                (f.pod for f in pods.get(name, ()) if f.uses_tandem and not f.daemon_set),
                key=lambda p: (p.namespace, p.name, p.uid),
            ))
            if victims:
                candidates.append((name, victims))

    if candidates and too_many_dead(policy, seen.known, seen.dead):
        names = [name for name, _ in candidates]
        actions += refusals(names, seen.known, seen.dead, policy, seen.memory)
        return Decision(tuple(actions), _with_warned(seen.memory, frozenset(names)))

    for name, victims in candidates:
        dead_for = now - seen.memory.dead_since[name]
        silent_for = now - seen.memory.heartbeats[name][1]
        why = (f"tandem: node lease gone for {dead_for:.0f}s and kubelet Lease not renewed "
               f"for {silent_for:.0f}s")
        if policy.mode == "taint":
            actions.append(ApplyTaint(name))
            actions.append(Event(name, REASON_TAINTED, (
                f"{why}; applied {TAINT_KEY}={TAINT_VALUE}:{TAINT_EFFECT}: its pods are "
                "evicted, force-deleted once the node is NotReady, and their volumes released "
                "(tandem removes the taint when the node is live again)")))
        else:
            actions.append(DeletePods(name, victims))
            listed = ", ".join(str(p) for p in victims)
            actions.append(Event(name, REASON_PODS_DELETED,
                                 f"{why}; force-deleted pods using tandem volumes: {listed}"))
    return Decision(tuple(actions), _with_warned(seen.memory, frozenset()))


def _with_warned(memory: Memory, warned: frozenset[str]) -> Memory:
    return replace(memory, warned=warned)
