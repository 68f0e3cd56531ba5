"""The node-down responder's Kubernetes API edge (its loop: ``node_down_loop``).

``KubeApi`` is a thin translation between the official ``kubernetes`` client (synchronous:
the loop calls it through ``asyncio.to_thread``) and the plain records of
``csi_driver.controller.node_down``, which makes every decision. The package is imported
only when the responder is enabled (``connect``), so the controller runs without it.

API calls, and why each is shaped the way it is:

- nodes and kubelet Leases (``kube-node-lease``) are listed with ``resourceVersion=0``,
  served from the API server's watch cache: two cheap LISTs a second;
- a taint change is a read-modify-write: read the Node, compute the new taint list and
  annotations, send a JSON Patch that also sets ``metadata.resourceVersion`` to the value
  read. If the Node changed in between (another controller, an admin) the API server
  answers 409 and we read again, so a concurrent change is never overwritten. The taint
  and our annotation change in the same write;
- pods on a node: ``spec.nodeName`` field selector;
- a pod's volumes: each PVC (or generic ephemeral volume's PVC) is read, then its PV:
  tandem's PVs give the volume handle, any other PV and any inline network volume is named
  as storage tandem cannot fence;
- pods are deleted (modes fenced and delete-pods) with grace period 0 and a UID precondition. Grace
  0 because the kubelet that would finish a graceful deletion is gone: a graceful delete
  would leave the pod Terminating for as long as the node is down. The UID precondition
  keeps a StatefulSet's replacement pod, which has the same name, from being deleted by a
  stale listing;
- Events are core/v1 Events in ``default`` (where Node events live) with the Node as
  involvedObject, reporting component ``tandem-controller``.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from csi_driver.config import DRIVER_NAME, ConfigError
from csi_driver.controller import node_down as nd

log = logging.getLogger(__name__)

NODE_LEASE_NAMESPACE = "kube-node-lease"
EVENT_NAMESPACE = "default"
COMPONENT = "tandem-controller"
PATCH_ATTEMPTS = 5
EVENT_MESSAGE_MAX = 1024

# (taints as JSON, annotations) -> the new (taints, annotations), or None: nothing to change.
PvInfo = tuple[str | None, str]  # (CSI driver or None, volume handle)
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


# Inline volume kinds that live and die with the node (or are read-only API data): a pod's
# use of them cannot conflict with a copy of the pod elsewhere. Any other inline kind (nfs,
# iscsi, an inline CSI volume, ...) is storage tandem cannot fence.
NODE_LOCAL_KINDS = frozenset({
    "empty_dir", "config_map", "secret", "projected", "downward_api", "host_path", "image",
})


def _claim(pod: Any, volume: Any) -> str | None:
    if volume.persistent_volume_claim is not None:
        return str(volume.persistent_volume_claim.claim_name)
    if volume.ephemeral is not None:
        # A generic ephemeral volume's PVC is named <pod>-<volume>.
        return f"{pod.metadata.name}-{volume.name}"
    return None


def _inline_kind(volume: Any) -> str:
    for attribute in volume.attribute_map:
        if attribute != "name" and getattr(volume, attribute, None) is not None:
            return str(attribute)
    return "empty_dir"  # a volume with no source is an emptyDir


class KubeApi:
    """The few CoreV1Api / CoordinationV1Api calls the responder makes (synchronous)."""

    def __init__(self, core: Any, coordination: Any, instance: str | None = None) -> None:
        self._core = core
        self._coordination = coordination
        self._instance = instance or socket.gethostname()

    # -- reads ----------------------------------------------------------------------------

    def nodes(self, heartbeats: bool = True) -> list[nd.KubeNode]:
        """Every Node; with ``heartbeats``, each with its kubelet Lease (the fenced modes do
        without, and their RBAC does not grant Leases)."""
        leases = {
            lease.metadata.name: lease
            for lease in self._coordination.list_namespaced_lease(
                NODE_LEASE_NAMESPACE, resource_version="0"
            ).items
        } if heartbeats else {}
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
        """The pods bound to ``node``: the handles of their tandem volumes, and the storage
        they use that tandem cannot fence (another driver's or a non-CSI PV, an inline
        network volume). A claim that is missing or unbound holds no storage."""
        pods = self._core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={node}")
        claims: dict[tuple[str, str], PvInfo | None] = {}
        volumes: dict[str, PvInfo] = {}
        facts = []
        for pod in pods.items:
            meta = pod.metadata
            handles: list[str] = []
            blockers: list[str] = []
            for volume in (pod.spec.volumes if pod.spec is not None else None) or []:
                claim = _claim(pod, volume)
                if claim is None:
                    kind = _inline_kind(volume)
                    if kind not in NODE_LOCAL_KINDS:
                        blockers.append(f"volume {volume.name} ({kind})")
                    continue
                key = (meta.namespace, claim)
                if key not in claims:
                    claims[key] = self._claim_volume(meta.namespace, claim, volumes)
                info = claims[key]
                if info is None:
                    continue
                driver, handle = info
                if driver == DRIVER_NAME:
                    handles.append(handle)
                else:
                    blockers.append(f"claim {claim} ({driver or 'not a CSI volume'})")
            daemon = any(ref.kind == "DaemonSet" for ref in meta.owner_references or [])
            phase = pod.status.phase if pod.status is not None else None
            facts.append(nd.PodFacts(
                nd.PodRef(meta.namespace, meta.name, meta.uid or ""),
                daemon_set=daemon, tandem_volumes=tuple(handles),
                blockers=tuple(blockers), finished=phase in ("Succeeded", "Failed"),
            ))
        return facts

    def _claim_volume(
        self, namespace: str, claim: str, volumes: dict[str, PvInfo]
    ) -> PvInfo | None:
        """(CSI driver or None, volume handle) of the PV bound to the claim; None when the
        claim or its PV does not exist or the claim is not bound."""
        api_exception = _api_exception()
        try:
            pvc = self._core.read_namespaced_persistent_volume_claim(claim, namespace)
        except api_exception as exc:
            if _status(exc) == 404:
                return None
            raise
        name = pvc.spec.volume_name if pvc.spec is not None else None
        if not name:
            return None
        if name not in volumes:
            try:
                pv = self._core.read_persistent_volume(name)
            except api_exception as exc:
                if _status(exc) != 404:
                    raise
                return None
            csi = pv.spec.csi if pv.spec is not None else None
            volumes[name] = (csi.driver, csi.volume_handle) if csi is not None else (None, "")
        return volumes[name]

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
