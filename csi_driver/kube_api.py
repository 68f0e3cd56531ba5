"""The node-down responder's Kubernetes API edge, and its loop in the controller.

``KubeApi`` is a thin translation between the official ``kubernetes`` client (synchronous:
the loop calls it through ``asyncio.to_thread``) and the plain records of
``csi_driver.node_down``, which makes every decision. The package is imported only when the
responder is enabled (``connect``), so the controller runs without it.

API calls, and why each is shaped the way it is:

- nodes and kubelet Leases (``kube-node-lease``) are listed with ``resourceVersion=0``,
  served from the API server's watch cache: two cheap LISTs a second;
- a taint change is a read-modify-write: read the Node, compute the new taint list and
  annotations, send a JSON Patch that also sets ``metadata.resourceVersion`` to the value
  read. If the Node changed in between (another controller, an admin) the API server
  answers 409 and we read again, so a concurrent change is never overwritten. The taint
  and our annotation change in the same write;
- pods on a node: ``spec.nodeName`` field selector; a pod uses tandem when one of its
  volumes is a PVC (or a generic ephemeral volume's PVC) bound to a PV whose
  ``spec.csi.driver`` is tandem's;
- pods are deleted (mode delete-pods only) with grace period 0 and a UID precondition. Grace
  0 because the kubelet that would finish a graceful deletion is gone: a graceful delete
  would leave the pod Terminating for as long as the node is down. The UID precondition
  keeps a StatefulSet's replacement pod, which has the same name, from being deleted by a
  stale listing;
- Events are core/v1 Events in ``default`` (where Node events live) with the Node as
  involvedObject, reporting component ``tandem-controller``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from csi_driver import node_down as nd
from csi_driver.config import DRIVER_NAME, ConfigError
from csi_driver.state import errors as store_errors
from csi_driver.state.store import Store

log = logging.getLogger(__name__)

NODE_LEASE_NAMESPACE = "kube-node-lease"
EVENT_NAMESPACE = "default"
COMPONENT = "tandem-controller"
PATCH_ATTEMPTS = 5
EVENT_MESSAGE_MAX = 1024
INTERVAL_S = 1.0
# Volume records change rarely and only matter for nodes this process never saw live.
REFERENCED_REFRESH_S = 15.0

# (taints as JSON, annotations) -> the new (taints, annotations), or None: nothing to change.
NodeChange = Callable[
    [list[dict[str, Any]], dict[str, str]],
    tuple[list[dict[str, Any]], dict[str, str]] | None,
]


class KubeConflictError(RuntimeError):
    """A Node kept changing under our read-modify-write."""


def connect(kubeconfig: Path | None, api_server: str | None = None) -> KubeApi:
    """A client from the in-cluster service account, or from ``kubeconfig``; ``api_server``
    replaces the API address either gives (the Service address needs kube-proxy, which a
    cluster may lack: the sidecars have the same override).

    Raises ConfigError (exit 2) if the ``kubernetes`` package is missing or no
    configuration can be loaded.
    """
    try:
        from kubernetes import client, config
    except ImportError as exc:
        raise ConfigError(
            "--node-down-responder needs the Python package 'kubernetes': "
            "pip install 'tandem-csi[kubernetes]'"
        ) from exc
    try:
        if kubeconfig is not None:
            config.load_kube_config(config_file=str(kubeconfig))
        else:
            config.load_incluster_config()
    except (config.ConfigException, OSError, ValueError) as exc:
        where = f"--kubeconfig {kubeconfig}" if kubeconfig else "the in-cluster service account"
        raise ConfigError(f"--node-down-responder: cannot load {where}: {exc}") from exc
    if api_server is None:
        return KubeApi(client.CoreV1Api(), client.CoordinationV1Api())
    settings = client.Configuration.get_default_copy()
    settings.host = api_server
    api = client.ApiClient(settings)
    return KubeApi(client.CoreV1Api(api), client.CoordinationV1Api(api))


def _models() -> Any:
    from kubernetes import client

    return client


def _status(exc: BaseException) -> int | None:
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) else None


def _api_exception() -> type[Exception]:
    from kubernetes.client.exceptions import ApiException

    return ApiException  # type: ignore[no-any-return]


def _rfc3339(value: object) -> str:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return str(value)


def _marker(value: object) -> str:
    """A kubelet Lease renewTime as an opaque value (full precision: every renewal differs)."""
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _taint_json(taint: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"key": taint.key, "effect": taint.effect}
    if taint.value is not None:
        out["value"] = taint.value
    if taint.time_added is not None:
        out["timeAdded"] = _rfc3339(taint.time_added)
    return out


def _claims(pod: Any) -> list[str]:
    names = []
    for volume in pod.spec.volumes or []:
        if volume.persistent_volume_claim is not None:
            names.append(volume.persistent_volume_claim.claim_name)
        elif volume.ephemeral is not None:
            # A generic ephemeral volume's PVC is named <pod>-<volume>.
            names.append(f"{pod.metadata.name}-{volume.name}")
    return names


class KubeApi:
    """The few CoreV1Api / CoordinationV1Api calls the responder makes (synchronous)."""

    def __init__(self, core: Any, coordination: Any, instance: str | None = None) -> None:
        self._core = core
        self._coordination = coordination
        self._instance = instance or socket.gethostname()

    # -- reads ----------------------------------------------------------------------------

    def nodes(self) -> list[nd.KubeNode]:
        leases = {
            lease.metadata.name: lease
            for lease in self._coordination.list_namespaced_lease(
                NODE_LEASE_NAMESPACE, resource_version="0"
            ).items
        }
        return [self._node(node, leases.get(node.metadata.name))
                for node in self._core.list_node(resource_version="0").items]

    @staticmethod
    def _node(node: Any, lease: Any) -> nd.KubeNode:
        taints = (node.spec.taints if node.spec is not None else None) or []
        annotations = node.metadata.annotations or {}
        heartbeat: str | None = None
        period = nd.DEFAULT_KUBELET_LEASE_S
        if lease is not None and lease.spec is not None and lease.spec.renew_time is not None:
            heartbeat = _marker(lease.spec.renew_time)
            period = float(lease.spec.lease_duration_seconds or period)
        return nd.KubeNode(
            name=node.metadata.name,
            uid=node.metadata.uid or "",
            out_of_service=any(t.key == nd.TAINT_KEY for t in taints),
            ours=annotations.get(nd.OWNER_ANNOTATION) == nd.OWNER_VALUE,
            heartbeat=heartbeat,
            heartbeat_period_s=period,
        )

    def pod_facts(self, node: str) -> list[nd.PodFacts]:
        """The pods bound to ``node``, each with whether it uses a tandem volume."""
        pods = self._core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={node}")
        verdicts: dict[tuple[str, str], bool] = {}
        drivers: dict[str, str | None] = {}
        facts = []
        for pod in pods.items:
            meta = pod.metadata
            uses = any(self._claim_is_tandem(meta.namespace, claim, verdicts, drivers)
                       for claim in _claims(pod))
            daemon = any(ref.kind == "DaemonSet" for ref in meta.owner_references or [])
            facts.append(nd.PodFacts(nd.PodRef(meta.namespace, meta.name, meta.uid or ""),
                                     uses_tandem=uses, daemon_set=daemon))
        return facts

    def _claim_is_tandem(
        self, namespace: str, claim: str, verdicts: dict[tuple[str, str], bool],
        drivers: dict[str, str | None],
    ) -> bool:
        key = (namespace, claim)
        if key not in verdicts:
            verdicts[key] = self._pv_driver(namespace, claim, drivers) == DRIVER_NAME
        return verdicts[key]

    def _pv_driver(self, namespace: str, claim: str, drivers: dict[str, str | None]) -> str | None:
        api_exception = _api_exception()
        try:
            pvc = self._core.read_namespaced_persistent_volume_claim(claim, namespace)
        except api_exception as exc:
            if _status(exc) == 404:
                return None
            raise
        volume = pvc.spec.volume_name if pvc.spec is not None else None
        if not volume:
            return None
        if volume not in drivers:
            try:
                pv = self._core.read_persistent_volume(volume)
            except api_exception as exc:
                if _status(exc) != 404:
                    raise
                drivers[volume] = None
            else:
                csi = pv.spec.csi if pv.spec is not None else None
                drivers[volume] = csi.driver if csi is not None else None
        return drivers[volume]

    # -- writes ---------------------------------------------------------------------------

    def apply_taint(self, node: str) -> bool:
        """Add the out-of-service taint and our annotation; False if the node already has an
        out-of-service taint (anyone's: then we neither add nor claim one)."""

        def change(
            taints: list[dict[str, Any]], annotations: dict[str, str]
        ) -> tuple[list[dict[str, Any]], dict[str, str]] | None:
            if any(t["key"] == nd.TAINT_KEY for t in taints):
                return None
            taint = {"key": nd.TAINT_KEY, "value": nd.TAINT_VALUE, "effect": nd.TAINT_EFFECT,
                     "timeAdded": _rfc3339(datetime.now(UTC))}
            return [*taints, taint], {**annotations, nd.OWNER_ANNOTATION: nd.OWNER_VALUE}

        return self._update_node(node, change)

    def remove_taint(self, node: str) -> bool:
        """Remove the out-of-service taint and our annotation, only if the annotation (read
        in the same read-modify-write) says tandem applied it."""

        def change(
            taints: list[dict[str, Any]], annotations: dict[str, str]
        ) -> tuple[list[dict[str, Any]], dict[str, str]] | None:
            if annotations.get(nd.OWNER_ANNOTATION) != nd.OWNER_VALUE:
                return None
            kept = [t for t in taints
                    if not (t["key"] == nd.TAINT_KEY and t["effect"] == nd.TAINT_EFFECT)]
            rest = {k: v for k, v in annotations.items() if k != nd.OWNER_ANNOTATION}
            return kept, rest

        return self._update_node(node, change)

    def _update_node(self, name: str, change: NodeChange) -> bool:
        api_exception = _api_exception()
        for _ in range(PATCH_ATTEMPTS):
            node = self._core.read_node(name)
            taints = [_taint_json(t) for t in (node.spec.taints if node.spec else None) or []]
            changed = change(taints, dict(node.metadata.annotations or {}))
            if changed is None:
                return False
            new_taints, new_annotations = changed
            patch = [
                # Optimistic concurrency: the API server answers 409 if the Node moved on.
                {"op": "replace", "path": "/metadata/resourceVersion",
                 "value": node.metadata.resource_version},
                {"op": "add", "path": "/spec/taints", "value": new_taints},
                {"op": "add", "path": "/metadata/annotations", "value": new_annotations},
            ]
            try:
                self._core.patch_node(name, patch)
            except api_exception as exc:
                if _status(exc) != 409:
                    raise
                log.info("node=%s changed while we updated it; reading it again", name)
                continue
            return True
        raise KubeConflictError(f"node {name} kept changing; gave up after {PATCH_ATTEMPTS}")

    def delete_pod(self, pod: nd.PodRef) -> bool:
        """Force-delete (grace 0) exactly this pod (UID precondition); False if it is gone
        or its name now belongs to another pod."""
        client = _models()
        options = client.V1DeleteOptions(
            grace_period_seconds=0, preconditions=client.V1Preconditions(uid=pod.uid)
        )
        try:
            self._core.delete_namespaced_pod(pod.name, pod.namespace, body=options)
        except _api_exception() as exc:
            if _status(exc) in (404, 409):
                return False
            raise
        return True

    def create_event(self, node: str, node_uid: str, reason: str, message: str,
                     type_: str) -> None:
        client = _models()
        now = datetime.now(UTC)
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(name=f"{node}.{time.time_ns():x}",
                                         namespace=EVENT_NAMESPACE),
            involved_object=client.V1ObjectReference(api_version="v1", kind="Node", name=node,
                                                     uid=node_uid or None),
            reason=reason,
            message=message[:EVENT_MESSAGE_MAX],
            type=type_,
            source=client.V1EventSource(component=COMPONENT),
            first_timestamp=now,
            last_timestamp=now,
            count=1,
            reporting_component=COMPONENT,
            reporting_instance=self._instance,
        )
        self._core.create_namespaced_event(EVENT_NAMESPACE, body)


# -- the loop -----------------------------------------------------------------------------


class NodeDownResponder:
    """Every round: liveness from etcd, nodes from Kubernetes, ``node_down.decide``, apply.

    Errors (etcd, API) are logged and the round is retried next time; nothing here stops
    the controller. One log line per action: ``node=... action=...``.
    """

    def __init__(
        self, store: Store, api: KubeApi, policy: nd.Policy,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._api = api
        self._policy = policy
        self._monotonic = monotonic
        self.memory = nd.Memory()
        self._referenced: frozenset[str] | None = None
        self._referenced_at = 0.0
        self._last_error = ""

    async def run_forever(self, interval_s: float = INTERVAL_S) -> None:
        log.info("node-down responder mode=%s grace=%.0fs max-fraction=%g",
                 self._policy.mode, self._policy.grace_s, self._policy.max_fraction)
        while True:
            try:
                await self.run_once()
            except Exception as exc:  # never let the responder take the controller down
                self._error("node-down round failed", exc)
            await asyncio.sleep(interval_s)

    async def run_once(self) -> tuple[nd.Action, ...]:
        view = await self._tandem_view()
        if view is None:
            return ()
        try:
            nodes = await asyncio.to_thread(self._api.nodes)
        except Exception as exc:
            self._error("node-down: listing nodes failed", exc)
            return ()
        now = self._monotonic()
        pods: dict[str, list[nd.PodFacts]] = {}
        complete = True
        for name in sorted(nd.pods_needed(now, self._policy, nodes, view, self.memory)):
            try:
                pods[name] = await asyncio.to_thread(self._api.pod_facts, name)
            except Exception as exc:
                complete = False
                self._error(f"node={name} node-down: listing pods failed", exc)
        if complete:
            self._last_error = ""  # the next failure is news again
        decision = nd.decide(now, self._policy, nodes, view, pods, self.memory)
        self.memory = decision.memory
        uids = {n.name: n.uid for n in nodes}
        skip_events: set[str] = set()  # the action an event reports failed or did nothing
        for action in decision.actions:
            if isinstance(action, nd.Event) and action.node in skip_events:
                continue
            try:
                if not await self._apply(action, uids):
                    skip_events.add(action.node)
            except Exception as exc:
                skip_events.add(action.node)
                log.warning("node=%s action=%s failed: %s", action.node, _name(action), exc)
        return decision.actions

    async def _apply(self, action: nd.Action, uids: dict[str, str]) -> bool:
        """Carry out one action; False when it turned out to be a no-op."""
        if isinstance(action, nd.ApplyTaint):
            done = await asyncio.to_thread(self._api.apply_taint, action.node)
            log.info("node=%s action=apply-taint taint=%s:%s applied=%s", action.node,
                     nd.TAINT_KEY, nd.TAINT_EFFECT, done)
            return done
        if isinstance(action, nd.RemoveTaint):
            done = await asyncio.to_thread(self._api.remove_taint, action.node)
            log.info("node=%s action=remove-taint taint=%s:%s removed=%s", action.node,
                     nd.TAINT_KEY, nd.TAINT_EFFECT, done)
            return done
        if isinstance(action, nd.DeletePods):
            deleted = [p for p in action.pods
                       if await asyncio.to_thread(self._api.delete_pod, p)]
            log.info("node=%s action=delete-pods grace=0 pods=%s deleted=%d", action.node,
                     ",".join(str(p) for p in action.pods), len(deleted))
            return bool(deleted)
        await asyncio.to_thread(self._api.create_event, action.node, uids.get(action.node, ""),
                                action.reason, action.message, action.type)
        log.info("node=%s action=event type=%s reason=%s", action.node, action.type,
                 action.reason)
        return True

    async def _tandem_view(self) -> nd.TandemView | None:
        """Liveness from etcd; None when etcd cannot be read (then nothing is decided)."""
        try:
            live = frozenset(v.value.node_id for v in await self._store.list_nodes())
            now = self._monotonic()
            if self._referenced is None or now - self._referenced_at >= REFERENCED_REFRESH_S:
                named: set[str] = set()
                for versioned in await self._store.list_volumes():
                    record = versioned.value
                    named.update(record.replica_nodes(), record.isr)
                    if record.owner:
                        named.add(record.owner)
                self._referenced, self._referenced_at = frozenset(named), now
        except store_errors.StoreError as exc:
            self._error("node-down: etcd unreadable, no decision this round", exc)
            return None
        return nd.TandemView(live=live, referenced=self._referenced)

    def _error(self, what: str, exc: BaseException) -> None:
        text = f"{what}: {exc}"
        if text != self._last_error:
            log.warning("%s", text)
            self._last_error = text
        else:
            log.debug("%s", text)


def _name(action: nd.Action) -> str:
    return {nd.ApplyTaint: "apply-taint", nd.RemoveTaint: "remove-taint",
            nd.DeletePods: "delete-pods", nd.Event: "event"}[type(action)]
