"""Guards the generated stubs: csi_driver/_gen must match proto/*.proto exactly.

Also pins the CSI wire contract (field numbers, enum values) by reading the
compiled descriptors, so an edit to proto/csi.proto that drifts from the spec
fails here rather than against a real kubelet.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
GEN_DIR = REPO_ROOT / "csi_driver" / "_gen"
STALE = "stubs are stale: run python proto/generate.py"


def _load_generator() -> ModuleType:
    # proto/ is a directory of sources, not a package: load the script by path.
    spec = importlib.util.spec_from_file_location(
        "tandem_proto_generate", REPO_ROOT / "proto" / "generate.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    generator = _load_generator()
    fresh: list[Path] = generator.generate(tmp_path / "_gen")
    assert fresh, "generator produced no files"
    suffixes: tuple[str, ...] = generator.GENERATED_SUFFIXES
    committed = {p.name for p in GEN_DIR.iterdir() if p.name.endswith(suffixes)}
    expected = {p.name for p in fresh}
    if committed != expected:
        pytest.fail(f"{STALE} (missing: {sorted(expected - committed)}, "
                    f"extra: {sorted(committed - expected)})")
    differing = [p.name for p in fresh if p.read_bytes() != (GEN_DIR / p.name).read_bytes()]
    if differing:
        pytest.fail(f"{STALE} (differs: {differing})")


def _field_numbers(message: type) -> dict[str, int]:
    return {f.name: f.number for f in message.DESCRIPTOR.fields}  # type: ignore[attr-defined]


def test_create_volume_request_fields() -> None:
    from csi_driver._gen import csi_pb2

    assert _field_numbers(csi_pb2.CreateVolumeRequest) == {
        "name": 1,
        "capacity_range": 2,
        "volume_capabilities": 3,
        "parameters": 4,
        "secrets": 5,
        "volume_content_source": 6,
        "accessibility_requirements": 7,
        "mutable_parameters": 8,
    }


def test_node_stage_volume_request_fields() -> None:
    from csi_driver._gen import csi_pb2

    assert _field_numbers(csi_pb2.NodeStageVolumeRequest) == {
        "volume_id": 1,
        "publish_context": 2,
        "staging_target_path": 3,
        "volume_capability": 4,
        "secrets": 5,
        "volume_context": 6,
    }


def test_node_publish_volume_request_fields() -> None:
    from csi_driver._gen import csi_pb2

    assert _field_numbers(csi_pb2.NodePublishVolumeRequest) == {
        "volume_id": 1,
        "publish_context": 2,
        "staging_target_path": 3,
        "target_path": 4,
        "volume_capability": 5,
        "readonly": 6,
        "secrets": 7,
        "volume_context": 8,
    }


def test_access_mode_enum_values() -> None:
    from csi_driver._gen import csi_pb2

    mode = csi_pb2.VolumeCapability.AccessMode
    assert dict(mode.Mode.items()) == {
        "UNKNOWN": 0,
        "SINGLE_NODE_WRITER": 1,
        "SINGLE_NODE_READER_ONLY": 2,
        "MULTI_NODE_READER_ONLY": 3,
        "MULTI_NODE_SINGLE_WRITER": 4,
        "MULTI_NODE_MULTI_WRITER": 5,
        "SINGLE_NODE_SINGLE_WRITER": 6,
        "SINGLE_NODE_MULTI_WRITER": 7,
    }
    assert _field_numbers(csi_pb2.VolumeCapability) == {
        "block": 1,
        "mount": 2,
        "access_mode": 3,
    }


def test_csi_option_extensions_and_services() -> None:
    from csi_driver._gen import csi_pb2

    fd = csi_pb2.DESCRIPTOR
    assert fd.package == "csi.v1"
    numbers = {name: ext.number for name, ext in fd.extensions_by_name.items()}
    assert numbers == {
        "alpha_enum": 1060,
        "alpha_enum_value": 1060,
        "csi_secret": 1059,
        "alpha_field": 1060,
        "alpha_message": 1060,
        "alpha_method": 1060,
        "alpha_service": 1060,
    }
    secrets = csi_pb2.CreateVolumeRequest.DESCRIPTOR.fields_by_name["secrets"]
    assert "[csi.v1.csi_secret]: true" in str(secrets.GetOptions())
    assert set(fd.services_by_name) == {
        "Identity", "Controller", "GroupController", "SnapshotMetadata", "Node"
    }


def test_etcd_and_agent_service_paths() -> None:
    from csi_driver._gen import agent_pb2, etcd_pb2

    etcd = etcd_pb2.DESCRIPTOR
    assert etcd.package == "etcdserverpb"
    methods = {s.full_name: [m.name for m in s.methods] for s in etcd.services_by_name.values()}
    assert methods == {
        "etcdserverpb.KV": ["Range", "Put", "DeleteRange", "Txn", "Compact"],
        "etcdserverpb.Watch": ["Watch"],
        "etcdserverpb.Lease": ["LeaseGrant", "LeaseRevoke", "LeaseKeepAlive", "LeaseTimeToLive"],
        "etcdserverpb.Maintenance": ["Status"],
    }
    agent = agent_pb2.DESCRIPTOR.services_by_name["Agent"]
    assert agent.full_name == "tandem.agent.v1.Agent"
    assert _field_numbers(agent_pb2.ReplicaInfo) == {
        "volume_id": 1, "size_bytes": 2, "path": 3, "allocated_bytes": 4
    }
