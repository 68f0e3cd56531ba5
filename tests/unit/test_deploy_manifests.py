"""The Kubernetes manifests (deploy/): the kustomize base, its overlays and components.

Renders every entry point (the base, each overlay of deploy/overlays, and the base and an
overlay with the components of deploy/components, as the docs tell users to combine them)
with real ``kubectl kustomize`` (kubectl is on these machines; ``make test`` installs one
into the venv where it is not). A Python stand-in used to render them; it assumed the wrong
order of generators and components, and the external-etcd pattern the docs recommended
silently kept placeholder endpoints in a real cluster. The documented overlay is rendered
verbatim from docs/kubernetes.md.

Every rendered object (and the example in deploy/examples) is validated strictly against the
API schemas ``kubernetes-validate`` bundles, at both ends of the Kubernetes range we support,
and the facts the design depends on are checked (architecture.md section 5): no attach step,
storage capacity tracking, the provisioner's topology and capacity flags, a privileged
host-network node plugin whose kubelet mounts propagate back to the host, RBAC for every
sidecar and for the node-down responder, a 3-member etcd, the two StorageClasses, each
overlay's pool, and daemon flags the tandem CLI itself accepts. deploy/e2e/testdriver.yaml is
checked against the manifests and the e2e suite's capability names. No cluster is needed and
nothing here talks to a network.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped,unused-ignore]
import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]

from csi_driver import capabilities, cli, validation
from csi_driver.config import TOPOLOGY_KEY

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
BASE = DEPLOY / "base"
EXAMPLE = DEPLOY / "examples" / "statefulset.yaml"
TESTDRIVER = DEPLOY / "e2e" / "testdriver.yaml"
NAMESPACE = "tandem-system"
DRIVER = "tandem.csi.io"
PLUGIN_DIR = f"/var/lib/kubelet/plugins/{DRIVER}"
DATAPLANE_DIR = "/var/lib/tandem-dataplane"
# Oldest and newest Kubernetes releases the manifests must be valid for: csi-provisioner v6
# and csi-resizer v2 need 1.34 (storage/v1 VolumeAttributesClass); 1.37 is the newest the
# installed kubernetes-validate bundles (kubernetes_validate.utils.all_versions()).
KUBERNETES_VERSIONS = ("1.34", "1.37")

OVERLAYS = ("kind", "minikube", "lvm")
EXTERNAL_ETCD = "external-etcd"
RESPONDER = "node-down-responder"
# What gets rendered: name -> (kustomization directory, components applied on top of it).
TARGETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "base": ("base", ()),
    **{o: (f"overlays/{o}", ()) for o in OVERLAYS},
    f"base+{EXTERNAL_ETCD}": ("base", (EXTERNAL_ETCD,)),
    f"base+{RESPONDER}": ("base", (RESPONDER,)),
    f"lvm+{EXTERNAL_ETCD}+{RESPONDER}": ("overlays/lvm", (EXTERNAL_ETCD, RESPONDER)),
}
# The pool each overlay appends to `tandem node`, and the host paths behind it.
POOL_ARGS = {
    "kind": ["--pool", "file", "--pool-dir", "/var/lib/tandem-pool", "--pool-size", "10G"],
    "minikube": ["--pool", "file", "--pool-dir", "/var/lib/tandem-pool", "--pool-size", "10G"],
    "lvm": ["--pool", "lvm", "--lvm-vg", "tandem"],
}
POOL_HOST_PATHS = {  # container path -> host path, beyond the base's mounts
    "kind": {"/var/lib/tandem-pool": "/var/lib/tandem-pool"},
    "minikube": {"/var/lib/tandem-pool": "/data/tandem/pool"},
    "lvm": {"/run/lvm": "/run/lvm"},
}
STATE_HOST_PATH = {"kind": "/var/lib/tandem", "minikube": "/data/tandem/state",
                   "lvm": "/var/lib/tandem"}
# Objects each overlay may change relative to the base (it sets what differs, nothing else).
OVERLAY_CHANGES = {
    "kind": {("DaemonSet", "tandem-node")},
    "minikube": {("DaemonSet", "tandem-node"), ("StatefulSet", "tandem-etcd")},
    "lvm": {("DaemonSet", "tandem-node")},
}
ETCD_OBJECTS = {("StatefulSet", "tandem-etcd"), ("Service", "tandem-etcd"),
                ("Service", "tandem-etcd-peer"), ("PodDisruptionBudget", "tandem-etcd")}
SIDECARS = {"csi-provisioner", "csi-resizer", "livenessprobe", "csi-node-driver-registrar"}

Doc = dict[str, Any]


# --- rendering -------------------------------------------------------------------------


def _kubectl() -> str:
    """kubectl on PATH, or the one `make test` put in the venv (scripts/ensure-kubectl.sh)."""
    venv_bin = str(Path(sys.executable).parent)
    found = shutil.which("kubectl") or shutil.which("kubectl", path=venv_bin)
    if found is None:
        pytest.fail("kubectl is not installed: `make test` installs it "
                    "(scripts/ensure-kubectl.sh)")
    return found


def kustomize(directory: Path) -> list[Doc]:
    result = subprocess.run([_kubectl(), "kustomize", str(directory)], capture_output=True,
                            text=True, timeout=120, check=False)
    if result.returncode != 0:
        pytest.fail(f"kubectl kustomize {directory} failed:\n{result.stderr}")
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def documented_overlay() -> str:
    """The external-etcd overlay exactly as docs/kubernetes.md shows it."""
    text = (REPO / "docs" / "kubernetes.md").read_text()
    blocks = re.findall(r"```yaml\n(# my-cluster/kustomization.yaml, next to a checkout.*?)```",
                        text, re.S)
    assert len(blocks) == 1, "docs/kubernetes.md must show the external-etcd overlay once"
    return str(blocks[0])


def documented_endpoints() -> str:
    (gen,) = yaml.safe_load(documented_overlay())["configMapGenerator"]
    (literal,) = gen["literals"]
    key, _, value = str(literal).partition("=")
    assert (key, gen["behavior"]) == ("ETCD_ENDPOINTS", "merge")
    return value


class Renderer:
    """Renders each target once (targets with components via a kustomization laid out as
    the docs tell users to write theirs: the external-etcd one with its endpoints)."""

    def __init__(self, workdir: Path) -> None:
        self._workdir = workdir
        self._cache: dict[str, list[Doc]] = {}

    def directory(self, target: str) -> Path:
        path, components = TARGETS[target]
        if not components:
            return DEPLOY / path
        here = self._workdir / target
        here.mkdir(parents=True, exist_ok=True)
        kustomization: dict[str, Any] = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [os.path.relpath(DEPLOY / path, here)],
            "components": [os.path.relpath(DEPLOY / "components" / c, here)
                           for c in components],
        }
        if EXTERNAL_ETCD in components:
            documented = yaml.safe_load(documented_overlay())
            kustomization["configMapGenerator"] = documented["configMapGenerator"]
        (here / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        return here

    def render(self, target: str) -> list[Doc]:
        if target not in self._cache:
            docs = kustomize(self.directory(target))
            assert docs, f"{target} rendered no objects"
            self._cache[target] = docs
        return self._cache[target]


@pytest.fixture(scope="module")
def renderer(tmp_path_factory: pytest.TempPathFactory) -> Renderer:
    return Renderer(tmp_path_factory.mktemp("kustomize"))


@pytest.fixture(scope="module")
def rendered(renderer: Renderer) -> dict[str, list[Doc]]:
    return {target: renderer.render(target) for target in TARGETS}


# --- helpers ---------------------------------------------------------------------------


def _find(docs: list[Doc], kind: str, name: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]


def _one(docs: list[Doc], kind: str, name: str) -> Doc:
    found = _find(docs, kind, name)
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


def _ids(docs: list[Doc]) -> set[tuple[str, str]]:
    return {(d["kind"], d["metadata"]["name"]) for d in docs if d["kind"] != "ConfigMap"}


def _config(docs: list[Doc]) -> dict[str, str]:
    (config,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert config["metadata"]["name"].startswith("tandem-config-"), "no hash suffix"
    data: dict[str, str] = config["data"]
    return data


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command and args ($$ escapes)."""
    return re.sub(r"\$\$|\$\((\w+)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
                  value)


def _env(docs: list[Doc], container: dict[str, Any], **field_refs: str) -> dict[str, str]:
    """The container's env with ConfigMap values resolved and fieldRefs from ``field_refs``."""
    config = _config(docs)
    env = {}
    for e in container.get("env", []):
        source = e.get("valueFrom", {})
        if "configMapKeyRef" in source:
            env[e["name"]] = config[source["configMapKeyRef"]["key"]]
        elif "fieldRef" in source:
            env[e["name"]] = field_refs[source["fieldRef"]["fieldPath"]]
        else:
            env[e["name"]] = e["value"]
    return env


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


def _validate(docs: list[Doc], version: str) -> list[str]:
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
    return problems


# --- the documented overlay, verbatim ----------------------------------------------------


def test_the_documented_external_etcd_overlay_uses_your_endpoints(tmp_path: Path) -> None:
    """Issue 12 #1: with the overlay the docs showed, real kustomize (v5.5, v5.8) kept the
    component's placeholder etcd-*.example.internal endpoints. Laid out exactly as the docs
    say (my-cluster/ beside deploy/), it must render the user's endpoints and no etcd."""
    (tmp_path / "deploy").symlink_to(DEPLOY)
    mine = tmp_path / "my-cluster"
    mine.mkdir()
    (mine / "kustomization.yaml").write_text(documented_overlay())
    docs = kustomize(mine)
    assert _config(docs)["ETCD_ENDPOINTS"] == documented_endpoints()
    assert "example.internal" not in yaml.safe_dump_all(docs)
    assert not [d for d in docs if "etcd" in d["metadata"]["name"]]
    component = yaml.safe_load((DEPLOY / "components" / EXTERNAL_ETCD /
                                "kustomization.yaml").read_text())
    assert "configMapGenerator" not in component, (
        "a generator in the component runs after the overlay's and replaces its value")


# --- schema validation -----------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("target", TARGETS)
def test_every_document_validates_strictly(
    rendered: dict[str, list[Doc]], target: str, version: str
) -> None:
    problems = _validate(rendered[target], version)
    assert not problems, f"{target} invalid against Kubernetes {version}:\n" + "\n".join(problems)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_example_validates_strictly(version: str) -> None:
    docs = [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]
    problems = _validate(docs, version)
    assert not problems, f"{EXAMPLE.name} invalid against {version}:\n" + "\n".join(problems)


def test_strict_validation_rejects_unknown_fields(rendered: dict[str, list[Doc]]) -> None:
    """Guards the tests above: a misspelt field must not pass as valid."""
    bad = yaml.safe_load(yaml.safe_dump(_one(rendered["base"], "CSIDriver", DRIVER)))
    bad["spec"]["attachRequried"] = False
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSIONS[-1], strict=True)


# --- what is rendered ------------------------------------------------------------------


BASE_OBJECTS = {
    ("Namespace", NAMESPACE),
    ("CSIDriver", DRIVER),
    ("StorageClass", "tandem-r3"),
    ("StorageClass", "tandem-r2"),
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
    ("ClusterRole", "tandem-node-down-fenced"),
    ("ClusterRoleBinding", "tandem-node-down-fenced"),
    *ETCD_OBJECTS,
    ("Deployment", "tandem-controller"),
    ("DaemonSet", "tandem-node"),
    ("DaemonSet", "tandem-csi-node"),
}
RESPONDER_OBJECTS = {(kind, "tandem-node-down-responder")
                     for kind in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")}
# The responder reads the kubelets' Leases there (its Role and RoleBinding only).
NODE_LEASE_NAMESPACE = "kube-node-lease"


@pytest.mark.parametrize("target", TARGETS)
def test_each_target_renders_exactly_these_objects(
    rendered: dict[str, list[Doc]], target: str
) -> None:
    docs = rendered[target]
    _, components = TARGETS[target]
    expected = set(BASE_OBJECTS)
    if EXTERNAL_ETCD in components:
        expected -= ETCD_OBJECTS
    if RESPONDER in components:
        expected |= RESPONDER_OBJECTS
    assert _ids(docs) == expected
    assert len([d for d in docs if d["kind"] == "ConfigMap"]) == 1
    cluster_scoped = {"Namespace", "CSIDriver", "StorageClass", "ClusterRole",
                      "ClusterRoleBinding"}
    for d in docs:
        if d["kind"] not in cluster_scoped:
            namespace = (NODE_LEASE_NAMESPACE
                         if (d["kind"], d["metadata"]["name"]) in RESPONDER_OBJECTS
                         else NAMESPACE)
            assert d["metadata"].get("namespace") == namespace, d["metadata"]["name"]
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "tandem", d["kind"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_sets_only_what_differs(rendered: dict[str, list[Doc]], overlay: str) -> None:
    base = {(d["kind"], d["metadata"]["name"]): d for d in rendered["base"]}
    changed = set()
    for d in rendered[overlay]:
        key = (d["kind"], d["metadata"]["name"])
        if d != base.get(key):
            changed.add(key)
    assert changed == OVERLAY_CHANGES[overlay]
    base_args = _container(_pod_spec(rendered["base"], "DaemonSet", "tandem-node"),
                           "tandem")["args"]
    args = _container(_pod_spec(rendered[overlay], "DaemonSet", "tandem-node"), "tandem")["args"]
    assert args[: len(base_args)] == base_args, "an overlay only appends to the node flags"


# --- CSIDriver and StorageClasses ------------------------------------------------------


def test_csidriver(rendered: dict[str, list[Doc]]) -> None:
    spec = _one(rendered["base"], "CSIDriver", DRIVER)["spec"]
    assert spec == {
        "attachRequired": False,
        "podInfoOnMount": False,
        "fsGroupPolicy": "File",
        "volumeLifecycleModes": ["Persistent"],
        "storageCapacity": True,
    }


@pytest.mark.parametrize("target", TARGETS)
def test_storageclasses(rendered: dict[str, list[Doc]], target: str) -> None:
    for name, replicas in (("tandem-r3", "3"), ("tandem-r2", "2")):
        sc = _one(rendered[target], "StorageClass", name)
        assert sc["provisioner"] == DRIVER
        assert sc["parameters"] == {"replicas": replicas, "csi.storage.k8s.io/fstype": "ext4"}
        assert sc["volumeBindingMode"] == "WaitForFirstConsumer"
        assert sc["allowVolumeExpansion"] is True
        assert sc["reclaimPolicy"] == "Delete"
        # What CreateVolume will make of the class (it rejects unknown parameters).
        params = validation.parse_parameters(sc["parameters"], default_replicas=3)
        assert (params.replicas, params.fs_type) == (int(replicas), "ext4")


# --- controller ------------------------------------------------------------------------


def _fake_server(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Run the real `tandem controller|node` argument handling up to the daemon start."""
    started: list[Any] = []
    server = types.ModuleType("csi_driver.server")
    server.run_controller = started.append  # type: ignore[attr-defined]
    server.run_node = started.append  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "csi_driver.server", server)
    monkeypatch.setattr(cli, "_run", lambda coro: None)
    # The Secret's file exists only in a pod: the path is checked, not read.
    monkeypatch.setattr(cli, "load_secret", lambda path: started.append(str(path)))
    monkeypatch.setattr(cli, "load_public_keys", lambda path: started.append(str(path)))
    monkeypatch.setattr(cli, "load_signer", lambda path: started.append(str(path)))
    return started


def _controller_options() -> set[str]:
    (sub,) = [a for a in cli.build_parser()._actions
              if isinstance(a, argparse._SubParsersAction)]
    return set(sub.choices["controller"]._option_string_actions)


@pytest.mark.parametrize("target", TARGETS)
def test_controller_deployment(
    rendered: dict[str, list[Doc]], target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = rendered[target]
    deployment = _one(docs, "Deployment", "tandem-controller")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = _pod_spec(docs, "Deployment", "tandem-controller")
    assert pod["serviceAccountName"] == "tandem-controller"
    assert [c["name"] for c in pod["containers"]] == [
        "tandem", "csi-provisioner", "csi-resizer", "liveness-probe",
    ]
    tandem = _container(pod, "tandem")
    argv = _argv(tandem)
    assert argv[:12] == [
        "tandem", "controller", "--csi-endpoint", "unix:///csi/csi.sock",
        "--etcd-endpoints", "$(ETCD_ENDPOINTS)",
        "--agent-key-file", "/etc/tandem/controller-credentials/agent.key",
        "--default-replicas", "3", "--replace-dead-after", "300",
    ]
    responder = argv[12:]
    default = ["--node-down-responder", "fenced"]
    if RESPONDER in TARGETS[target][1]:
        # appended: the last --node-down-responder wins
        assert responder == [*default, "--node-down-responder", "taint",
                             "--node-down-grace", "30"]
    else:
        assert responder == default
    for c in pod["containers"]:
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert mounts.get("/csi") == "socket-dir", f"{c['name']} does not share the socket"
    (creds,) = [v for v in pod["volumes"] if v["name"] == "controller-credentials"]
    assert creds["secret"] == {"secretName": "tandem-controller-credentials",
                               "defaultMode": 0o400}
    # The real CLI accepts the flags.
    assert "--node-down-responder" in _controller_options()
    started = _fake_server(monkeypatch)
    args = cli.build_parser().parse_args([_expand(a, _env(docs, tandem)) for a in argv[1:]])
    assert args.func(args) == 0
    key_path, config = started
    assert key_path == "/etc/tandem/controller-credentials/agent.key"
    assert config.default_replicas == 3
    assert config.replace_after_s == 300
    if RESPONDER in TARGETS[target][1]:
        assert (config.node_down_mode, config.node_down_grace_s) == ("taint", 30)
    else:
        assert config.node_down_mode == "fenced"


def test_provisioner_flags(rendered: dict[str, list[Doc]]) -> None:
    provisioner = _container(_pod_spec(rendered["base"], "Deployment", "tandem-controller"),
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
        "--leader-election",
    ):
        assert flag in args, f"csi-provisioner lacks {flag}"
    # --enable-capacity finds its owner (the Deployment) through these.
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in provisioner["env"]}
    assert env == {"NAMESPACE": "metadata.namespace", "POD_NAME": "metadata.name"}


# --- node plugin -----------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_node_daemonset_is_privileged_on_the_host_network(
    rendered: dict[str, list[Doc]], target: str
) -> None:
    pod = _pod_spec(rendered[target], "DaemonSet", "tandem-node")
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["serviceAccountName"] == "tandem-node"
    # tandem first: the overlays' JSON patches append to containers[0]. No registrar: the
    # kubelet-facing plugin is tandem-csi-node.
    assert [c["name"] for c in pod["containers"]] == ["tandem", "liveness-probe"]
    tandem = _container(pod, "tandem")
    assert tandem["securityContext"]["privileged"] is True
    assert _argv(tandem)[:20] == [
        "tandem", "node", "--node-id", "$(NODE_NAME)",
        "--csi-endpoint", "unix:///dataplane/csi.sock",
        "--agent-listen", "$(POD_IP):7001", "--replica-listen", "$(POD_IP):7002",
        "--etcd-endpoints", "$(ETCD_ENDPOINTS)", "--state-dir", "/var/lib/tandem",
        "--cluster-secret-file", "/etc/tandem/credentials/cluster-secret",
        "--agent-public-key-file", "/etc/tandem/credentials/agent.pub",
        "--health-listen", "$(POD_IP):9810",
    ]
    (creds,) = [v for v in pod["volumes"] if v["name"] == "credentials"]
    assert creds["secret"] == {"secretName": "tandem-credentials", "defaultMode": 0o400}
    (mount,) = [m for m in tandem["volumeMounts"] if m["name"] == "credentials"]
    assert mount == {"name": "credentials", "mountPath": "/etc/tandem/credentials",
                     "readOnly": True}
    assert tandem["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert tandem["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "readyz"}
    for c in pod["containers"]:
        resources = c["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]), c["name"]
        assert "memory" in resources["limits"], c["name"]


@pytest.mark.parametrize("target", TARGETS)
def test_node_mounts(rendered: dict[str, list[Doc]], target: str) -> None:
    pod = _pod_spec(rendered[target], "DaemonSet", "tandem-node")
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    tandem = _container(pod, "tandem")
    by_container = {m["mountPath"]: m for m in tandem["volumeMounts"]}
    kubelet = by_container["/var/lib/kubelet"]
    assert host_paths[kubelet["name"]] == "/var/lib/kubelet"
    assert kubelet["mountPropagation"] == "Bidirectional"
    assert "/csi" not in by_container  # kubelet's plugin socket belongs to tandem-csi-node
    assert host_paths[by_container["/dataplane"]["name"]] == DATAPLANE_DIR
    assert host_paths[by_container["/dev"]["name"]] == "/dev"
    overlay = TARGETS[target][0].removeprefix("overlays/")
    state = STATE_HOST_PATH.get(overlay, "/var/lib/tandem")
    assert host_paths[by_container["/var/lib/tandem"]["name"]] == state
    probe = _container(pod, "liveness-probe")
    assert "--csi-address=/dataplane/csi.sock" in probe["args"]


@pytest.mark.parametrize("target", TARGETS)
def test_data_plane_is_upgraded_only_by_drain_and_the_front_rolls(
    rendered: dict[str, list[Doc]], target: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    docs = rendered[target]
    data_plane = _one(docs, "DaemonSet", "tandem-node")
    assert data_plane["spec"]["updateStrategy"] == {"type": "OnDelete"}
    csi_node = _one(docs, "DaemonSet", "tandem-csi-node")
    assert csi_node["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    pod = _pod_spec(docs, "DaemonSet", "tandem-csi-node")
    assert pod["automountServiceAccountToken"] is False
    assert not pod.get("hostNetwork")
    assert [c["name"] for c in pod["containers"]] == [
        "front", "node-driver-registrar", "liveness-probe"]
    front = _container(pod, "front")
    assert not front.get("securityContext", {}).get("privileged")
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    mounts = {m["mountPath"]: host_paths[m["name"]] for m in front["volumeMounts"]}
    assert mounts == {"/csi": PLUGIN_DIR, "/dataplane": DATAPLANE_DIR}
    registrar = _container(pod, "node-driver-registrar")
    assert f"--kubelet-registration-path={PLUGIN_DIR}/csi.sock" in registrar["args"]
    reg_mounts = {host_paths[m["name"]]: m["mountPath"] for m in registrar["volumeMounts"]}
    assert reg_mounts == {PLUGIN_DIR: "/csi", "/var/lib/kubelet/plugins_registry": "/registration"}
    # The front forwards to the socket the data plane serves.
    data_plane_argv = _argv(_container(_pod_spec(docs, "DaemonSet", "tandem-node"), "tandem"))
    backend = data_plane_argv[data_plane_argv.index("--csi-endpoint") + 1]
    assert _argv(front) == ["tandem", "node-front", "--csi-endpoint", "unix:///csi/csi.sock",
                            "--data-plane-endpoint", backend]
    # The real CLI accepts them.
    served: list[tuple[object, str]] = []

    async def fake_run(csi_socket: object, backend_target: str) -> None:
        served.append((csi_socket, backend_target))

    monkeypatch.setattr("csi_driver.node.front.run", fake_run)
    args = cli.build_parser().parse_args(_argv(front)[1:])
    assert args.func(args) == 0
    assert served == [(Path("/csi/csi.sock"), "unix:///dataplane/csi.sock")]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_pool(
    rendered: dict[str, list[Doc]], overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = rendered[overlay]
    pod = _pod_spec(docs, "DaemonSet", "tandem-node")
    tandem = _container(pod, "tandem")
    assert tandem["args"][-len(POOL_ARGS[overlay]):] == POOL_ARGS[overlay]
    base_pod = _pod_spec(rendered["base"], "DaemonSet", "tandem-node")
    base_mounts = {m["mountPath"] for m in _container(base_pod, "tandem")["volumeMounts"]}
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    extra = {m["mountPath"]: host_paths[m["name"]] for m in tandem["volumeMounts"]
             if m["mountPath"] not in base_mounts}
    assert extra == POOL_HOST_PATHS[overlay]
    # The real `tandem node` accepts the flags and the pool configuration is complete.
    started = _fake_server(monkeypatch)
    env = _env(docs, tandem, **{"spec.nodeName": "node-a", "status.podIP": "10.0.0.1"})
    args = cli.build_parser().parse_args([_expand(a, env) for a in _argv(tandem)[1:]])
    assert args.func(args) == 0
    secret_path, public_key_path, config = started
    assert secret_path == "/etc/tandem/credentials/cluster-secret"
    assert public_key_path == "/etc/tandem/credentials/agent.pub"
    if overlay == "lvm":
        assert (config.pool_kind, config.lvm_vg) == ("lvm", "tandem")
    else:
        assert (config.pool_kind, str(config.pool_dir)) == ("file", "/var/lib/tandem-pool")
        assert config.pool_size == 10 * 1024**3
    assert config.node_id == "node-a"
    assert config.agent_address == "10.0.0.1:7001"
    assert config.health_listen == ("10.0.0.1", 9810)  # the readinessProbe's port


def test_minikube_etcd_volumes_are_node_local(rendered: dict[str, list[Doc]]) -> None:
    etcd = _one(rendered["minikube"], "StatefulSet", "tandem-etcd")
    (template,) = etcd["spec"]["volumeClaimTemplates"]
    assert template["spec"]["storageClassName"] == "local-path"
    (base_template,) = _one(rendered["base"], "StatefulSet",
                            "tandem-etcd")["spec"]["volumeClaimTemplates"]
    assert "storageClassName" not in base_template["spec"], "the base uses the default class"


# --- RBAC ------------------------------------------------------------------------------


PROVISIONER_AND_RESIZER = {
    ("", "persistentvolumes", "create"), ("", "persistentvolumes", "delete"),
    ("", "persistentvolumeclaims", "watch"), ("storage.k8s.io", "storageclasses", "watch"),
    ("storage.k8s.io", "csinodes", "list"), ("", "nodes", "watch"),
    ("", "events", "create"), ("coordination.k8s.io", "leases", "update"),
    ("", "pods", "get"), ("apps", "replicasets", "get"),
    ("", "persistentvolumes", "patch"), ("", "persistentvolumeclaims/status", "patch"),
    *(("storage.k8s.io", "csistoragecapacities", verb)
      for verb in ("get", "list", "watch", "create", "update", "patch", "delete")),
}
# The default mode (fenced) can delete pods, never patch a node or read kubelet Leases.
FENCED_GRANTS = {
    ("", "nodes", "get"), ("", "nodes", "list"), ("", "pods", "list"), ("", "pods", "delete"),
    ("", "events", "create"), ("", "events", "patch"),
    ("", "persistentvolumeclaims", "get"), ("", "persistentvolumes", "get"),
}
RESPONDER_GRANTS = FENCED_GRANTS | {
    ("", "nodes", "watch"), ("", "nodes", "patch"), ("coordination.k8s.io", "leases", "list"),
}


@pytest.mark.parametrize("target", TARGETS)
def test_rbac(rendered: dict[str, list[Doc]], target: str) -> None:
    docs = rendered[target]
    controller = _granted(docs, "tandem-controller")
    missing = PROVISIONER_AND_RESIZER - controller
    assert not missing, f"controller lacks {sorted(missing)}"
    assert _granted(docs, "tandem-node") == {("", "nodes", "get")}
    # Nothing may touch secrets; deleting pods only through the responder's roles, patching
    # nodes only through the role its component binds.
    assert not any(resource == "secrets" for _, resource, _ in controller)
    responders = {("ClusterRoleBinding", "tandem-node-down-responder"),
                  ("ClusterRoleBinding", "tandem-node-down-fenced")}
    others = [d for d in docs if (d["kind"], d["metadata"]["name"]) not in responders]
    powerful = {("", "pods", "delete"), ("", "nodes", "patch")}
    assert not powerful & _granted(others, "tandem-controller")
    assert not FENCED_GRANTS - controller, sorted(FENCED_GRANTS - controller)
    if RESPONDER in TARGETS[target][1]:
        assert not RESPONDER_GRANTS - controller, sorted(RESPONDER_GRANTS - controller)
        # Kubelet Leases: read-only, and only in their own namespace.
        binding = _one(docs, "RoleBinding", "tandem-node-down-responder")
        role = _one(docs, "Role", binding["roleRef"]["name"])
        for obj in (binding, role):
            assert obj["metadata"]["namespace"] == NODE_LEASE_NAMESPACE
        assert role["rules"] == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                                  "verbs": ["get", "list"]}]
    else:
        assert ("", "nodes", "patch") not in controller
        assert not [d for d in docs if d["metadata"].get("namespace") == NODE_LEASE_NAMESPACE]


# --- images, env -----------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_images_are_pinned(rendered: dict[str, list[Doc]], target: str) -> None:
    seen = set()
    for where, _pod, c in _containers(rendered[target]):
        name, _, tag = c["image"].rpartition(":")
        assert name and re.fullmatch(r"v?\d+(\.\d+)+(-\d+)?", tag), f"{where}: {c['image']}"
        short = name.rsplit("/", 1)[-1]
        if short in SIDECARS:
            assert name == f"registry.k8s.io/sig-storage/{short}", where
            seen.add(short)
        if c["name"] == "tandem":
            assert c["image"] == "localhost/tandem:0.1.0", where
    assert seen == SIDECARS


@pytest.mark.parametrize("target", TARGETS)
def test_every_referenced_variable_is_defined(
    rendered: dict[str, list[Doc]], target: str
) -> None:
    docs = rendered[target]
    config_maps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    for where, _pod, c in _containers(docs):
        env = {e["name"]: e for e in c.get("env", [])}
        for var in re.findall(r"(?<!\$)\$\((\w+)\)", " ".join(_argv(c))):
            assert var in env, f"{where}: $({var}) is not defined"
        for e in env.values():
            ref = e.get("valueFrom", {}).get("configMapKeyRef")
            if ref:
                assert ref["key"] in config_maps.get(ref["name"], {}), f"{where}: {ref}"


# --- etcd ------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [t for t, (_, c) in TARGETS.items() if EXTERNAL_ETCD not in c])
def test_etcd_is_a_three_member_cluster(rendered: dict[str, list[Doc]], target: str) -> None:
    docs = rendered[target]
    etcd = _one(docs, "StatefulSet", "tandem-etcd")
    spec = etcd["spec"]
    assert spec["replicas"] == 3
    assert spec["podManagementPolicy"] == "Parallel", "OrderedReady never reaches quorum"
    (claim,) = spec["volumeClaimTemplates"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    (mount,) = container["volumeMounts"]
    assert mount["name"] == claim["metadata"]["name"], "etcd data is not on the PVC"
    assert not pod.get("volumes"), "no emptyDir for etcd data"
    labels = spec["template"]["metadata"]["labels"]

    peer = _one(docs, "Service", spec["serviceName"])
    assert peer["spec"]["clusterIP"] == "None"
    assert peer["spec"]["publishNotReadyAddresses"] is True
    assert peer["spec"]["selector"].items() <= labels.items()
    assert 2380 in [p["port"] for p in peer["spec"]["ports"]]

    # --initial-cluster names every member by its stable pod DNS name.
    pods = [f"tandem-etcd-{i}" for i in range(spec["replicas"])]
    argv = {}
    for pod_name in pods:
        env = _env(docs, container, **{"metadata.name": pod_name,
                                       "metadata.namespace": NAMESPACE})
        flags = dict(_expand(a, env).split("=", 1) for a in container["args"])
        argv[pod_name] = flags
        dns = f"{pod_name}.{spec['serviceName']}.{NAMESPACE}.svc"
        assert flags["--name"] == pod_name
        assert flags["--initial-advertise-peer-urls"] == f"http://{dns}:2380"
        assert flags["--advertise-client-urls"] == f"http://{dns}:2379"
        assert flags["--initial-cluster-state"] == "new"
    initial = {flags["--initial-cluster"] for flags in argv.values()}
    assert len(initial) == 1
    members = dict(m.split("=", 1) for m in initial.pop().split(","))
    assert members == {
        p: f"http://{p}.{spec['serviceName']}.{NAMESPACE}.svc:2380" for p in pods
    }

    # Clients use the client Service, which reaches the members' client port.
    client = _one(docs, "Service", "tandem-etcd")
    assert client["spec"].get("clusterIP") != "None"
    assert client["spec"]["selector"].items() <= labels.items()
    assert [p["port"] for p in client["spec"]["ports"]] == [2379]
    assert _config(docs)["ETCD_ENDPOINTS"] == f"http://tandem-etcd.{NAMESPACE}.svc:2379"
    pdb = _one(docs, "PodDisruptionBudget", "tandem-etcd")
    assert pdb["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize("target", [t for t, (_, c) in TARGETS.items() if EXTERNAL_ETCD in c])
def test_external_etcd(rendered: dict[str, list[Doc]], target: str) -> None:
    docs = rendered[target]
    assert not _ids(docs) & ETCD_OBJECTS
    assert not [d for d in docs if "etcd" in d["metadata"]["name"]]
    assert _config(docs)["ETCD_ENDPOINTS"] == documented_endpoints()
    (base_config,) = [d for d in rendered["base"] if d["kind"] == "ConfigMap"]
    (config,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert config["metadata"]["name"] != base_config["metadata"]["name"], (
        "new data, new name: the pods roll")


# --- example and e2e driver definition -------------------------------------------------


def test_example_statefulset_uses_tandem_r3(rendered: dict[str, list[Doc]]) -> None:
    docs = [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]
    (sts,) = [d for d in docs if d["kind"] == "StatefulSet"]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["storageClassName"] == "tandem-r3"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    _one(rendered["kind"], "StorageClass", "tandem-r3")
    mounts = [m["name"] for c in sts["spec"]["template"]["spec"]["containers"]
              for m in c["volumeMounts"]]
    assert claim["metadata"]["name"] in mounts
    (service,) = [d for d in docs if d["kind"] == "Service"]
    assert service["metadata"]["name"] == sts["spec"]["serviceName"]
    assert service["spec"]["clusterIP"] == "None"


# kubernetes/kubernetes test/e2e/storage/framework/testdriver.go: the Cap* constants, and
# the fields of DriverInfo and of driverDefinition (test/e2e/storage/external/external.go).
E2E_CAPABILITIES = {
    "persistence", "block", "fsGroup", "volumeMountGroup", "exec", "snapshotDataSource",
    "pvcDataSource", "multipods", "RWX", "RWXFilesystemOnly", "RWXBlockOnly",
    "controllerExpansion", "nodeExpansion", "offlineExpansion", "onlineExpansion",
    "volumeLimits", "singleNodeVolume", "topology", "capacity",
    "FSResizeFromSourceNotSupported", "readWriteOncePod", "multiplePVsSameID",
    "capReadOnlyMany",
}
E2E_DRIVER_INFO_FIELDS = {
    "Name", "InTreePluginName", "FeatureTag", "MaxFileSize", "SupportedSizeRange",
    "SupportedFsType", "SupportedMountOption", "RequiredMountOption", "Capabilities",
    "RequiredAccessModes", "TopologyKeys", "NumAllowedTopologies", "StressTestOptions",
    "VolumeSnapshotStressTestOptions", "PerformanceTestOptions",
}
E2E_DEFINITION_FIELDS = {
    "DriverInfo", "StorageClass", "SnapshotClass", "InlineVolumes", "ClientNodeName",
    "Timeouts",
}


def test_e2e_testdriver(rendered: dict[str, list[Doc]]) -> None:
    driver = yaml.safe_load(TESTDRIVER.read_text())
    assert set(driver) <= E2E_DEFINITION_FIELDS
    assert "SnapshotClass" not in driver, "tandem has no snapshots"
    info = driver["DriverInfo"]
    assert set(info) <= E2E_DRIVER_INFO_FIELDS
    assert info["Name"] == DRIVER
    assert info["TopologyKeys"] == [TOPOLOGY_KEY]
    assert set(info["SupportedFsType"]) <= set(validation.SUPPORTED_FS_TYPES)
    assert set(info["SupportedSizeRange"]) == {"Min", "Max"}

    # The class the suite copies is the one the manifests install under that name.
    (source,) = driver["StorageClass"].values()
    assert list(driver["StorageClass"]) == ["FromFile"]
    (sc,) = [d for d in yaml.safe_load_all((REPO / source).read_text()) if d]
    installed = _one(rendered["kind"], "StorageClass", sc["metadata"]["name"])
    assert sc["provisioner"] == DRIVER
    for key in ("parameters", "volumeBindingMode", "allowVolumeExpansion", "reclaimPolicy"):
        assert sc[key] == installed[key], key

    caps = info["Capabilities"]
    unknown = set(caps) - E2E_CAPABILITIES
    assert not unknown, f"capabilities the e2e suite does not know: {unknown}"
    # The capabilities say what the driver does.
    ctl = set(capabilities.CONTROLLER_CAPABILITIES)
    node = set(capabilities.NODE_CAPABILITIES)
    rpc_c, rpc_n = capabilities._C, capabilities._N
    assert caps["controllerExpansion"] == (rpc_c.EXPAND_VOLUME in ctl)
    assert caps["nodeExpansion"] == (rpc_n.EXPAND_VOLUME in node)
    assert caps["capacity"] == (rpc_c.GET_CAPACITY in ctl)
    assert caps["snapshotDataSource"] == (rpc_c.CREATE_DELETE_SNAPSHOT in ctl)
    assert caps["pvcDataSource"] == (rpc_c.CLONE_VOLUME in ctl)
    assert caps["multipods"] == (rpc_n.SINGLE_NODE_MULTI_WRITER in node)
    identity = (REPO / "csi_driver" / "identity.py").read_text()
    assert caps["onlineExpansion"] == ("VolumeExpansion.ONLINE" in identity)
    assert caps["offlineExpansion"] == ("VolumeExpansion.OFFLINE" in identity)
    assert caps["topology"] == ("VOLUME_ACCESSIBILITY_CONSTRAINTS" in identity)
    assert caps["RWX"] is False
    csidriver = _one(rendered["base"], "CSIDriver", DRIVER)["spec"]
    assert caps["fsGroup"] == (csidriver["fsGroupPolicy"] == "File")


# --- cert-manager TLS component ----------------------------------------------------------


def test_cert_manager_tls_component(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replication TLS from cert-manager (issue 11): a CA of tandem's own, one client+server
    certificate every node presents, its Secret mounted read-only 0400, and the node flags
    the real CLI accepts (certificate, key, and the CA as trust)."""
    (tmp_path / "deploy").symlink_to(DEPLOY)
    mine = tmp_path / "my-cluster"
    mine.mkdir()
    (mine / "kustomization.yaml").write_text(
        "resources: [../deploy/overlays/lvm]\n"
        "components: [../deploy/components/cert-manager-tls]\n")
    docs = kustomize(mine)
    builtin = [d for d in docs if not d["apiVersion"].startswith("cert-manager.io/")]
    for version in KUBERNETES_VERSIONS:
        assert not _validate(builtin, version)
    certs = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Certificate"}
    issuers = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Issuer"}
    ca, leaf = certs["tandem-replication-ca"], certs["tandem-replication"]
    assert ca["spec"]["isCA"] and issuers[ca["spec"]["issuerRef"]["name"]]["spec"] == {
        "selfSigned": {}}
    assert issuers[leaf["spec"]["issuerRef"]["name"]]["spec"]["ca"]["secretName"] == \
        ca["spec"]["secretName"]
    assert {"server auth", "client auth"} <= set(leaf["spec"]["usages"])
    assert all(d["metadata"]["namespace"] == NAMESPACE for d in [*certs.values(),
                                                                  *issuers.values()])
    pod = _pod_spec(docs, "DaemonSet", "tandem-node")
    (volume,) = [v for v in pod["volumes"] if v["name"] == "replication-tls"]
    assert volume["secret"] == {"secretName": leaf["spec"]["secretName"], "defaultMode": 0o400}
    tandem = _container(pod, "tandem")
    (mount,) = [m for m in tandem["volumeMounts"] if m["name"] == "replication-tls"]
    assert mount["readOnly"] is True
    argv = _argv(tandem)
    assert argv[-6:] == [
        "--tls-cert-file", f"{mount['mountPath']}/tls.crt",
        "--tls-key-file", f"{mount['mountPath']}/tls.key",
        "--tls-trust-file", f"{mount['mountPath']}/ca.crt"]
    started = _fake_server(monkeypatch)
    monkeypatch.setattr(cli, "load_peer_tls", lambda *paths: started.append(paths))
    env = _env(docs, tandem, **{"spec.nodeName": "node-a", "status.podIP": "10.0.0.1"})
    args = cli.build_parser().parse_args([_expand(a, env) for a in argv[1:]])
    assert args.func(args) == 0
    config = started[-1]
    assert config.tls_trust_file == Path(mount["mountPath"]) / "ca.crt"
