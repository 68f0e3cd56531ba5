"""A small kustomize in Python: exactly the features deploy/ uses, for machines without kubectl.

``tests/unit/test_deploy_manifests.py`` renders deploy/ with ``kubectl kustomize`` when kubectl
is on PATH and with :func:`render` otherwise (or when ``TANDEM_KUSTOMIZE=python``); a test
there renders every target both ways and compares the objects, so this module cannot drift
from kustomize unnoticed while kubectl is around.

Supported, with kustomize's (v5) semantics as far as deploy/ exercises them:

- ``Kustomization`` and ``Component`` files (``kustomization.yaml``); ``resources`` (YAML files
  and directories), ``components``;
- ``configMapGenerator`` (``literals``, ``envs``; ``behavior`` create, merge, replace) with the
  content hash suffix kustomize appends to generated names, and the rewriting of every
  ``configMapKeyRef`` / ``configMapRef`` / ``configMap`` volume reference to the hashed name;
  ``generatorOptions.disableNameSuffixHash``;
- ``patches`` (inline ``patch`` or ``path``, optional ``target``): JSON6902 operation lists
  (add, remove, replace, test) and strategic merge patches (maps merge, ``null`` deletes a
  key, lists of containers / volumes / volumeMounts / env merge by their keys, other lists are
  replaced, ``$patch: delete`` on a whole object or a keyed list element);
- ``namespace``, ``labels`` (``includeSelectors: false`` only), ``images``.

Anything else in a kustomization file raises :class:`KustomizeError` instead of being ignored.
Transformers of one kustomization run in kustomize's order: resources, components, generators,
then patches, namespace, labels, images.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped,unused-ignore]

Obj = dict[str, Any]

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")

_ALLOWED_FIELDS = {
    "apiVersion", "kind", "resources", "components", "namespace", "labels", "images",
    "configMapGenerator", "generatorOptions", "patches",
}

# Kinds without a namespace (the ones a CSI driver deployment may contain).
CLUSTER_SCOPED = frozenset({
    "Namespace", "Node", "PersistentVolume", "StorageClass", "CSIDriver", "CSINode",
    "VolumeAttachment", "VolumeAttributesClass", "ClusterRole", "ClusterRoleBinding",
    "PriorityClass", "RuntimeClass", "IngressClass", "CustomResourceDefinition", "APIService",
    "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration",
})

# Strategic merge keys of the list fields deploy/ patches (from the Kubernetes API's
# x-kubernetes-patch-merge-key); any other list is replaced by the patch's list.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "env": "name",
    "imagePullSecrets": "name",
}

# Characters kustomize substitutes in the hash suffix (api/hasher: encode), so that a
# suffix never spells a word.
_HASH_SUBSTITUTIONS = str.maketrans({"0": "g", "1": "h", "3": "k", "a": "m", "e": "t"})


class KustomizeError(Exception):
    """The kustomization uses something this renderer does not support, or is wrong."""


@dataclass
class _Resource:
    obj: Obj
    # For generated ConfigMaps: the name before the hash suffix, and whether to add it.
    generated_name: str | None = None
    hashed: bool = False

    def key(self) -> tuple[str, str, str, str]:
        meta = self.obj.get("metadata", {})
        name = self.generated_name or meta.get("name", "")
        return (_group(self.obj), self.obj.get("kind", ""), meta.get("namespace", ""), name)


@dataclass
class _Accumulator:
    resources: list[_Resource] = field(default_factory=list)

    def add(self, res: _Resource, where: str) -> None:
        if any(r.key() == res.key() for r in self.resources):
            raise KustomizeError(f"{where}: {_describe(res.obj)} is already a resource")
        self.resources.append(res)


def render(path: str | Path) -> list[Obj]:
    """Build the kustomization in directory ``path`` like ``kubectl kustomize path``."""
    acc = _build(Path(path).resolve())
    _apply_hash_suffixes(acc)
    return [copy.deepcopy(r.obj) for r in acc.resources]


# --- loading ------------------------------------------------------------------------------


def _load_kustomization(directory: Path, kind: str) -> Obj:
    for name in KUSTOMIZATION_FILES:
        path = directory / name
        if path.is_file():
            break
    else:
        raise KustomizeError(f"{directory}: no kustomization file")
    doc = yaml.safe_load(path.read_text()) or {}
    if not isinstance(doc, dict):
        raise KustomizeError(f"{path}: not a mapping")
    found = doc.get("kind", "Kustomization")
    if found != kind:
        raise KustomizeError(f"{path}: expected kind {kind}, found {found}")
    unknown = set(doc) - _ALLOWED_FIELDS
    if unknown:
        raise KustomizeError(f"{path}: unsupported fields {sorted(unknown)}")
    return doc


def _load_objects(path: Path) -> list[Obj]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for d in docs:
        if not isinstance(d, dict) or "kind" not in d or "metadata" not in d:
            raise KustomizeError(f"{path}: not a Kubernetes object: {str(d)[:80]}")
    return docs


def _build(directory: Path) -> _Accumulator:
    acc = _Accumulator()
    _accumulate(directory, _load_kustomization(directory, "Kustomization"), acc)
    return acc


def _accumulate(directory: Path, kust: Obj, acc: _Accumulator) -> None:
    for entry in kust.get("resources") or []:
        path = (directory / entry).resolve()
        if path.is_dir():
            for res in _build(path).resources:
                acc.add(res, str(path))
        elif path.is_file():
            for obj in _load_objects(path):
                acc.add(_Resource(obj), str(path))
        else:
            raise KustomizeError(f"{directory}: resource {entry!r} not found (no remote URLs)")
    for entry in kust.get("components") or []:
        path = (directory / entry).resolve()
        _accumulate(path, _load_kustomization(path, "Component"), acc)
    _run_generators(directory, kust, acc)
    for patch in kust.get("patches") or []:
        _apply_patch(directory, patch, acc)
    if kust.get("namespace"):
        _set_namespace(str(kust["namespace"]), acc)
    for entry in kust.get("labels") or []:
        _add_labels(entry, acc)
    for entry in kust.get("images") or []:
        _set_images(entry, acc)


# --- generators ---------------------------------------------------------------------------


def _run_generators(directory: Path, kust: Obj, acc: _Accumulator) -> None:
    options = kust.get("generatorOptions") or {}
    unknown = set(options) - {"disableNameSuffixHash"}
    if unknown:
        raise KustomizeError(f"{directory}: unsupported generatorOptions {sorted(unknown)}")
    hashed = not options.get("disableNameSuffixHash", False)
    for gen in kust.get("configMapGenerator") or []:
        unknown = set(gen) - {"name", "namespace", "behavior", "literals", "envs"}
        if unknown:
            raise KustomizeError(f"{directory}: unsupported configMapGenerator {sorted(unknown)}")
        name = gen["name"]
        data: dict[str, str] = {}
        for literal in gen.get("literals") or []:
            key, sep, value = str(literal).partition("=")
            if not sep:
                raise KustomizeError(f"{directory}: literal {literal!r} has no '='")
            data[key] = _unquote(value)
        for env_file in gen.get("envs") or []:
            data.update(_read_env_file(directory / env_file))
        behavior = gen.get("behavior", "create")
        if behavior == "create":
            meta: Obj = {"name": name}
            if gen.get("namespace"):
                meta["namespace"] = gen["namespace"]
            obj: Obj = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}
            acc.add(_Resource(obj, generated_name=name, hashed=hashed), str(directory))
        elif behavior in ("merge", "replace"):
            matches = [
                r for r in acc.resources
                if r.generated_name == name and r.obj["kind"] == "ConfigMap"
                and gen.get("namespace", r.obj["metadata"].get("namespace"))
                == r.obj["metadata"].get("namespace")
            ]
            if len(matches) != 1:
                raise KustomizeError(f"{directory}: {behavior} of ConfigMap {name!r} matches "
                                     f"{len(matches)} generated ConfigMaps")
            target = matches[0].obj
            target["data"] = {**target.get("data", {}), **data} if behavior == "merge" else data
        else:
            raise KustomizeError(f"{directory}: unsupported behavior {behavior!r}")


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def _read_env_file(path: Path) -> dict[str, str]:
    data: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise KustomizeError(f"{path}: line {line!r} has no '='")
        data[key] = value
    return data


def config_map_hash(data: dict[str, str]) -> str:
    """kustomize's hash suffix of a generated ConfigMap holding ``data``.

    kustomize (api/hasher) hashes the JSON of {"data", "kind", "name"} with sorted keys, the
    name empty, takes 10 hex digits of the SHA-256 and substitutes some characters.
    """
    encoded = json.dumps({"data": data, "kind": "ConfigMap", "name": ""},
                         sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    # Go's encoding/json escapes these; Python's does not.
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                         ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        encoded = encoded.replace(char, escape)
    digest = hashlib.sha256(encoded.encode()).hexdigest()
    return digest[:10].translate(_HASH_SUBSTITUTIONS)


def _apply_hash_suffixes(acc: _Accumulator) -> None:
    renames: dict[tuple[str, str], str] = {}
    for res in acc.resources:
        if res.generated_name is not None and res.hashed:
            meta = res.obj["metadata"]
            meta["name"] = f"{res.generated_name}-{config_map_hash(res.obj.get('data', {}))}"
            renames[(meta.get("namespace", ""), res.generated_name)] = meta["name"]
    for res in acc.resources:
        namespace = res.obj["metadata"].get("namespace", "")
        _rename_config_map_refs(res.obj, namespace, renames)


def _rename_config_map_refs(node: Any, namespace: str,
                            renames: dict[tuple[str, str], str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if (key in ("configMapKeyRef", "configMapRef", "configMap")
                    and isinstance(value, dict) and (namespace, value.get("name")) in renames):
                value["name"] = renames[(namespace, value["name"])]
            else:
                _rename_config_map_refs(value, namespace, renames)
    elif isinstance(node, list):
        for item in node:
            _rename_config_map_refs(item, namespace, renames)


# --- patches ------------------------------------------------------------------------------


def _apply_patch(directory: Path, entry: Obj, acc: _Accumulator) -> None:
    unknown = set(entry) - {"path", "patch", "target"}
    if unknown:
        raise KustomizeError(f"{directory}: unsupported patch fields {sorted(unknown)}")
    if ("path" in entry) == ("patch" in entry):
        raise KustomizeError(f"{directory}: a patch needs exactly one of path, patch")
    text = (directory / entry["path"]).read_text() if "path" in entry else entry["patch"]
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    target = entry.get("target")
    if docs and isinstance(docs[0], list):
        if target is None or len(docs) != 1:
            raise KustomizeError(f"{directory}: a JSON6902 patch needs a target and one list")
        matches = _select(acc, target, directory)
        for res in matches:
            res.obj = _json6902(res.obj, docs[0])
        return
    for doc in docs:
        if not isinstance(doc, dict):
            raise KustomizeError(f"{directory}: a strategic merge patch must be a mapping")
        if target is not None:
            matches = _select(acc, target, directory)
        else:
            meta = doc.get("metadata") or {}
            selector = {"kind": doc.get("kind"), "name": meta.get("name")}
            if "namespace" in meta:
                selector["namespace"] = meta["namespace"]
            matches = _select(acc, selector, directory, regex=False)
        if doc.get("$patch") == "delete":
            acc.resources = [r for r in acc.resources if all(r is not m for m in matches)]
            continue
        if "$patch" in doc:
            raise KustomizeError(f"{directory}: unsupported $patch: {doc['$patch']}")
        patch_body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind")}
        for res in matches:
            res.obj = _merge(res.obj, patch_body, "")


def _select(acc: _Accumulator, target: Obj, directory: Path, regex: bool = True) -> list[_Resource]:
    unknown = set(target) - {"group", "version", "kind", "name", "namespace"}
    if unknown:
        raise KustomizeError(f"{directory}: unsupported target fields {sorted(unknown)}")

    def matches(res: _Resource) -> bool:
        obj = res.obj
        group, _, version = obj.get("apiVersion", "").rpartition("/")
        actual = {
            "group": group, "version": version, "kind": obj.get("kind", ""),
            "name": res.generated_name or obj["metadata"].get("name", ""),
            "namespace": obj["metadata"].get("namespace", ""),
        }
        for key, want in target.items():
            if want is None:
                continue
            if regex and key in ("name", "namespace"):
                if not re.fullmatch(str(want), actual[key]):
                    return False
            elif str(want) != actual[key]:
                return False
        return True

    found = [r for r in acc.resources if matches(r)]
    if not found:
        raise KustomizeError(f"{directory}: no resource matches patch target {target}")
    return found


def _merge(dst: Any, src: Any, field_name: str) -> Any:
    """Strategic merge of ``src`` into (a copy of) ``dst``; ``field_name`` names ``dst``."""
    if isinstance(src, dict) and isinstance(dst, dict):
        out = dict(dst)
        for key, value in src.items():
            if key.startswith("$"):
                raise KustomizeError(f"unsupported directive {key} in {field_name or 'patch'}")
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = _merge(out[key], value, key)
            else:
                out[key] = _strip_directives(copy.deepcopy(value))
        return out
    if isinstance(src, list) and isinstance(dst, list) and field_name in MERGE_KEYS:
        return _merge_keyed_list(dst, src, MERGE_KEYS[field_name], field_name)
    return _strip_directives(copy.deepcopy(src))


def _merge_keyed_list(dst: list[Any], src: list[Any], key: str, field_name: str) -> list[Any]:
    rest = [copy.deepcopy(item) for item in dst]
    patched: list[Any] = []
    for item in src:
        if not isinstance(item, dict) or key not in item:
            raise KustomizeError(f"{field_name}: patch element without merge key {key!r}")
        index = next((i for i, d in enumerate(rest) if d.get(key) == item[key]), None)
        existing = rest.pop(index) if index is not None else None
        directive = item.get("$patch")
        if directive == "delete":
            continue
        if directive is not None:
            raise KustomizeError(f"{field_name}: unsupported $patch: {directive}")
        patched.append(_strip_directives(copy.deepcopy(item)) if existing is None
                       else _merge(existing, item, ""))
    # kustomize (kyaml merge2) lists the elements the patch names first, in the patch's
    # order, then the others in their original order.
    return patched + rest


def _strip_directives(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_directives(v) for k, v in value.items() if not k.startswith("$")}
    if isinstance(value, list):
        return [_strip_directives(v) for v in value]
    return value


def _json6902(obj: Obj, ops: list[Any]) -> Obj:
    doc = copy.deepcopy(obj)
    for op in ops:
        kind, path = op.get("op"), op.get("path")
        if not isinstance(path, str) or not path.startswith("/"):
            raise KustomizeError(f"JSON6902: bad path {path!r}")
        tokens = [t.replace("~1", "/").replace("~0", "~") for t in path[1:].split("/")]
        parent = doc
        for token in tokens[:-1]:
            parent = _step(parent, token, path)
        last = tokens[-1]
        if kind == "test":
            if _step(parent, last, path) != op.get("value"):
                raise KustomizeError(f"JSON6902 test failed: {path} is not {op.get('value')!r}")
        elif kind == "add":
            value = copy.deepcopy(op["value"])
            if isinstance(parent, list):
                if last == "-":
                    parent.append(value)
                else:
                    parent.insert(_index(parent, last, path, allow_end=True), value)
            elif isinstance(parent, dict):
                parent[last] = value
            else:
                raise KustomizeError(f"JSON6902: cannot add at {path}")
        elif kind == "replace":
            _step(parent, last, path)  # must exist
            if isinstance(parent, list):
                parent[_index(parent, last, path)] = copy.deepcopy(op["value"])
            else:
                parent[last] = copy.deepcopy(op["value"])
        elif kind == "remove":
            _step(parent, last, path)
            if isinstance(parent, list):
                del parent[_index(parent, last, path)]
            else:
                del parent[last]
        else:
            raise KustomizeError(f"JSON6902: unsupported op {kind!r}")
    return doc


def _index(seq: list[Any], token: str, path: str, allow_end: bool = False) -> int:
    if not token.isdigit():
        raise KustomizeError(f"JSON6902: {token!r} in {path} is not a list index")
    index = int(token)
    if index > len(seq) or (index == len(seq) and not allow_end):
        raise KustomizeError(f"JSON6902: index {index} out of range in {path}")
    return index


def _step(node: Any, token: str, path: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, token, path)]
    if isinstance(node, dict) and token in node:
        return node[token]
    raise KustomizeError(f"JSON6902: {path} does not exist")


# --- namespace, labels, images ------------------------------------------------------------


def _set_namespace(namespace: str, acc: _Accumulator) -> None:
    for res in acc.resources:
        obj = res.obj
        if obj["kind"] not in CLUSTER_SCOPED:
            obj["metadata"]["namespace"] = namespace
        if obj["kind"] in ("RoleBinding", "ClusterRoleBinding"):
            # kustomize's default (setRoleBindingSubjects: defaultOnly).
            for subject in obj.get("subjects") or []:
                if subject.get("kind") == "ServiceAccount" and subject.get(
                        "namespace", "default") == "default":
                    subject["namespace"] = namespace


def _add_labels(entry: Obj, acc: _Accumulator) -> None:
    unknown = set(entry) - {"pairs", "includeSelectors", "includeTemplates"}
    if unknown or entry.get("includeSelectors") or entry.get("includeTemplates"):
        raise KustomizeError(f"labels: only pairs with includeSelectors: false ({entry})")
    for res in acc.resources:
        labels = res.obj["metadata"].setdefault("labels", {})
        labels.update({k: str(v) for k, v in entry.get("pairs", {}).items()})


def _set_images(entry: Obj, acc: _Accumulator) -> None:
    unknown = set(entry) - {"name", "newName", "newTag", "digest"}
    if unknown:
        raise KustomizeError(f"images: unsupported fields {sorted(unknown)}")
    for res in acc.resources:
        for container in _containers(res.obj):
            image = container.get("image")
            if not isinstance(image, str):
                continue
            name, suffix = _split_image(image)
            if name != entry["name"]:
                continue
            if "digest" in entry:
                suffix = "@" + entry["digest"]
            elif "newTag" in entry:
                suffix = ":" + str(entry["newTag"])
            container["image"] = entry.get("newName", name) + suffix


def _split_image(image: str) -> tuple[str, str]:
    """``registry/repo:tag`` -> (``registry/repo``, ``:tag``); digests likewise."""
    if "@" in image:
        name, _, digest = image.partition("@")
        return name, "@" + digest
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        return image[:colon], image[colon:]
    return image, ""


def _containers(node: Any) -> Iterator[Obj]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers", "ephemeralContainers") and isinstance(
                    value, list):
                yield from (c for c in value if isinstance(c, dict))
            else:
                yield from _containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from _containers(item)


def _group(obj: Obj) -> str:
    api_version = str(obj.get("apiVersion", ""))
    return api_version.rpartition("/")[0]


def _describe(obj: Obj) -> str:
    meta = obj.get("metadata", {})
    where = f"{meta.get('namespace')}/" if meta.get("namespace") else ""
    return f"{obj.get('kind')} {where}{meta.get('name')}"
