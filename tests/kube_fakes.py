"""Fakes of the few ``kubernetes.client`` CoreV1Api / CoordinationV1Api methods the node-down
responder's edge (csi_driver.controller.kube_api) calls: no Kubernetes API server can be
installed on this machine. They hold and return the client's real model objects
(``V1Node``, ``V1Pod``, ...), so attribute names are the client's own, and they enforce what
the API server would for our requests: a JSON Patch that sets ``metadata.resourceVersion``
is refused with 409 when the Node moved on, a delete's UID precondition is honoured, 404 for
what does not exist.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from csi_driver.controller.kube_api import KubeApi

# -- fakes ------------------------------------------------------------------------------------


def node(name: str, taints: list[k8s.V1Taint] | None = None,
          annotations: dict[str, str] | None = None) -> k8s.V1Node:
    return k8s.V1Node(
        metadata=k8s.V1ObjectMeta(name=name, uid=f"uid-{name}", resource_version="1",
                                  annotations=annotations),
        spec=k8s.V1NodeSpec(taints=taints),
    )


def pod(name: str, node: str, claims: Sequence[str] = (), *, ns: str = "ns",
         ephemeral: Sequence[str] = (), owner: str | None = None) -> k8s.V1Pod:
    volumes = [
        k8s.V1Volume(name=f"v-{c}", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
            claim_name=c))
        for c in claims
    ]
    volumes += [k8s.V1Volume(name=e, ephemeral=k8s.V1EphemeralVolumeSource()) for e in ephemeral]
    volumes.append(k8s.V1Volume(name="tmp", empty_dir=k8s.V1EmptyDirVolumeSource()))
    owners = [k8s.V1OwnerReference(api_version="apps/v1", kind=owner, name="o", uid="o")] \
        if owner else None
    return k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name=name, namespace=ns, uid=f"uid-{name}",
                                  owner_references=owners),
        spec=k8s.V1PodSpec(node_name=node, containers=[k8s.V1Container(name="c")],
                           volumes=volumes),
    )


def not_found() -> ApiException:
    return ApiException(status=404, reason="Not Found")


@dataclass
class FakeCore:
    """The CoreV1Api methods kube_api calls, over an in-memory cluster."""

    nodes: dict[str, k8s.V1Node] = field(default_factory=dict)
    pods: list[k8s.V1Pod] = field(default_factory=list)
    pvcs: dict[tuple[str, str], k8s.V1PersistentVolumeClaim] = field(default_factory=dict)
    pvs: dict[str, k8s.V1PersistentVolume] = field(default_factory=dict)
    events: list[tuple[str, k8s.CoreV1Event]] = field(default_factory=list)
    deletes: list[tuple[str, str, k8s.V1DeleteOptions]] = field(default_factory=list)
    patches: list[list[dict[str, Any]]] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    after_read: Callable[[str], None] | None = None  # runs after read_node: a concurrent writer
    fail: dict[str, ApiException] = field(default_factory=dict)  # method -> error to raise

    def _call(self, method: str) -> None:
        self.calls.append(method)
        if method in self.fail:
            raise self.fail[method]

    def list_node(self, resource_version: str | None = None) -> k8s.V1NodeList:
        self._call("list_node")
        assert resource_version == "0"  # from the watch cache
        return k8s.V1NodeList(items=[copy.deepcopy(n) for n in self.nodes.values()])

    def read_node(self, name: str) -> k8s.V1Node:
        self._call("read_node")
        if name not in self.nodes:
            raise not_found()
        out = copy.deepcopy(self.nodes[name])
        if self.after_read is not None:
            self.after_read(name)
        return out

    def patch_node(self, name: str, body: Any) -> k8s.V1Node:
        self._call("patch_node")
        assert isinstance(body, list), "a JSON Patch (list) in every client version"
        json.dumps(body)  # plain JSON, nothing the client would have to serialize
        node = self.nodes[name]
        ops = {op["path"]: op for op in body}
        assert set(ops) == {"/metadata/resourceVersion", "/spec/taints", "/metadata/annotations"}
        assert ops["/metadata/resourceVersion"]["op"] == "replace"
        if ops["/metadata/resourceVersion"]["value"] != node.metadata.resource_version:
            raise ApiException(status=409, reason="Conflict")
        new = copy.deepcopy(node)
        new.spec.taints = [k8s.V1Taint(key=t["key"], effect=t["effect"], value=t.get("value"),
                                       time_added=t.get("timeAdded"))
                           for t in ops["/spec/taints"]["value"]] or None
        new.metadata.annotations = dict(ops["/metadata/annotations"]["value"]) or None
        new.metadata.resource_version = str(int(node.metadata.resource_version) + 1)
        self.nodes[name] = new
        self.patches.append(body)
        return copy.deepcopy(new)

    def touch(self, name: str, **changes: Any) -> None:
        """Another writer changes the Node (bumps its resourceVersion)."""
        node = self.nodes[name]
        for key, value in changes.items():
            setattr(node.spec if key == "taints" else node.metadata, key, value)
        node.metadata.resource_version = str(int(node.metadata.resource_version) + 1)

    def list_pod_for_all_namespaces(self, field_selector: str) -> k8s.V1PodList:
        self._call("list_pod_for_all_namespaces")
        key, _, node = field_selector.partition("=")
        assert key == "spec.nodeName"
        return k8s.V1PodList(items=[copy.deepcopy(p) for p in self.pods
                                    if p.spec.node_name == node])

    def read_namespaced_persistent_volume_claim(
        self, name: str, namespace: str
    ) -> k8s.V1PersistentVolumeClaim:
        self._call("read_namespaced_persistent_volume_claim")
        if (namespace, name) not in self.pvcs:
            raise not_found()
        return self.pvcs[(namespace, name)]

    def read_persistent_volume(self, name: str) -> k8s.V1PersistentVolume:
        self._call("read_persistent_volume")
        if name not in self.pvs:
            raise not_found()
        return self.pvs[name]

    def delete_namespaced_pod(self, name: str, namespace: str,
                              body: k8s.V1DeleteOptions) -> k8s.V1Pod:
        self._call("delete_namespaced_pod")
        self.deletes.append((namespace, name, body))
        for p in self.pods:
            if (p.metadata.namespace, p.metadata.name) == (namespace, name):
                if body.preconditions and body.preconditions.uid != p.metadata.uid:
                    raise ApiException(status=409, reason="Conflict")
                self.pods.remove(p)
                return p
        raise not_found()

    def create_namespaced_event(self, namespace: str, body: k8s.CoreV1Event) -> k8s.CoreV1Event:
        self._call("create_namespaced_event")
        self.events.append((namespace, body))
        return body

    # -- building the cluster --

    def bind(self, ns: str, claim: str, pv: str | None, driver: str | None) -> None:
        self.pvcs[(ns, claim)] = k8s.V1PersistentVolumeClaim(
            metadata=k8s.V1ObjectMeta(name=claim, namespace=ns),
            spec=k8s.V1PersistentVolumeClaimSpec(volume_name=pv),
        )
        if pv is not None and driver is not None:
            self.pvs[pv] = k8s.V1PersistentVolume(
                metadata=k8s.V1ObjectMeta(name=pv),
                spec=k8s.V1PersistentVolumeSpec(
                    csi=k8s.V1CSIPersistentVolumeSource(driver=driver, volume_handle=pv)),
            )
        elif pv is not None:  # not a CSI volume at all
            self.pvs[pv] = k8s.V1PersistentVolume(
                metadata=k8s.V1ObjectMeta(name=pv),
                spec=k8s.V1PersistentVolumeSpec(
                    host_path=k8s.V1HostPathVolumeSource(path="/x")),
            )


@dataclass
class FakeCoordination:
    """kubelet Leases in kube-node-lease; ``renew`` is what a live kubelet does."""

    leases: dict[str, k8s.V1Lease] = field(default_factory=dict)
    ticks: int = 0
    lists: int = 0

    def renew(self, node: str) -> None:
        self.ticks += 1
        when = datetime(2025, 1, 1, tzinfo=UTC) + timedelta(microseconds=self.ticks)
        self.leases[node] = k8s.V1Lease(
            metadata=k8s.V1ObjectMeta(name=node, namespace="kube-node-lease"),
            spec=k8s.V1LeaseSpec(holder_identity=node, lease_duration_seconds=40,
                                 renew_time=when),
        )

    def list_namespaced_lease(self, namespace: str,
                              resource_version: str | None = None) -> k8s.V1LeaseList:
        assert namespace == "kube-node-lease" and resource_version == "0"
        self.lists += 1
        return k8s.V1LeaseList(items=list(self.leases.values()))


def api(core: FakeCore, coordination: FakeCoordination | None = None) -> KubeApi:
    return KubeApi(core, coordination or FakeCoordination(), instance="ctl-0")


