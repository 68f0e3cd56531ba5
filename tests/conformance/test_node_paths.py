"""Node paths the plugin does not own (spec: NodeStage/NodeUnpublish "the SP MUST delete the
file or directory it created", and "Field Requirements").

A CO may name a path that already holds someone else's filesystem, file or directory, or a
path that is relative, holds a NUL byte or exceeds the kernel's limits. The plugin must
refuse to stage onto a foreign filesystem (FAILED_PRECONDITION), leave foreign paths exactly
as they were on unpublish/unstage (OK: idempotent), and refuse malformed paths and ids with
INVALID_ARGUMENT before touching anything. Foreign mounts are real tmpfs mounts, always
unmounted by the ``foreign`` fixture.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from csi_driver._gen import csi_pb2
from csi_driver.client import CsiClient, block_capability, mount_capability
from tests.conformance.conftest import (
    MIB,
    Cluster,
    create_request,
    created_volume,
    expect_code,
    mount_at,
    mounts,
    published,
    replica_nodes,
    stage_refused,
    stage_request,
    staged,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

Code = grpc.StatusCode
MISSING_ID = "vol-doesnotexist0000"
FOREIGN = "tandem-test-foreign"  # the source name of the tests' tmpfs mounts
MARK = "someone else's data"


@dataclass(frozen=True)
class Vol:
    id: str
    node: CsiClient
    other: CsiClient  # a node without the replica: any node can stage any volume
    staging: Path
    target: Path


@pytest.fixture
def vol(cluster: Cluster, workdir: Path) -> Iterator[Vol]:
    """A 32 MiB single-replica mount volume (not staged)."""
    with created_volume(cluster.controller, create_request(size=32 * MIB)) as volume:
        home = replica_nodes(volume)[0]
        away = next(n for n in cluster.node_ids if n != home)
        yield Vol(volume.volume_id, cluster.node(home), cluster.node(away),
                  workdir / "staging", workdir / "pods" / "target")


MountTmpfs = Callable[[Path], Path]


@pytest.fixture
def foreign(workdir: Path) -> Iterator[MountTmpfs]:
    """``foreign(dir)``: mount a small tmpfs holding a ``mark`` file at ``dir``; every mount
    the test made is unmounted afterwards, whatever happened."""
    made: list[Path] = []

    def mount_tmpfs(path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", FOREIGN, str(path)],
                       check=True)
        made.append(path)
        (path / "mark").write_text(MARK)
        return path

    try:
        yield mount_tmpfs
    finally:
        for path in reversed(made):
            for _ in range(8):  # every layer, bounded: a stuck umount must not hang the suite
                if mount_at(path) is None:
                    break
                subprocess.run(["umount", "-l", str(path)], check=False)


def assert_foreign_mount_intact(path: Path) -> None:
    layers = [m for m in mounts() if m.mount_point == os.path.realpath(path)]
    assert [(m.source, m.fs_type) for m in layers] == [(FOREIGN, "tmpfs")], layers
    assert (path / "mark").read_text() == MARK


def unstage(node: CsiClient, volume_id: str, path: Path | str) -> None:
    node.node.NodeUnstageVolume(
        csi_pb2.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=str(path)))


def unpublish(node: CsiClient, volume_id: str, path: Path | str) -> None:
    node.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(path)))


# --- staging onto a foreign filesystem ------------------------------------------------------


def test_stage_onto_a_foreign_mount_is_failed_precondition(vol: Vol, foreign: MountTmpfs) -> None:
    foreign(vol.staging)
    for _ in range(2):  # the answer is stable and nothing half-done changes it
        stage_refused(vol.node, stage_request(vol.id, vol.staging), Code.FAILED_PRECONDITION)
        assert_foreign_mount_intact(vol.staging)
    # The refusal undid everything, ownership included: another node can stage the volume.
    other = vol.staging.with_name("other-node")
    with staged(vol.other, vol.id, other):
        found = mount_at(other)
        assert found is not None and found.fs_type == "ext4"
    assert_foreign_mount_intact(vol.staging)


def test_stage_onto_a_free_path_then_repeat_is_ok(vol: Vol) -> None:
    """The idempotent repeat: the mount at the path is the volume's own device."""
    with staged(vol.node, vol.id, vol.staging):
        vol.node.node.NodeStageVolume(stage_request(vol.id, vol.staging))
        layers = [m for m in mounts() if m.mount_point == os.path.realpath(vol.staging)]
        assert len(layers) == 1 and layers[0].fs_type == "ext4"
    assert mount_at(vol.staging) is None


# --- unpublish / unstage of what the node did not make -------------------------------------


def foreign_paths(workdir: Path, foreign: MountTmpfs) -> tuple[Path, Path, Path]:
    """A foreign regular file, empty directory and tmpfs mount."""
    file, directory = workdir / "foreign-file", workdir / "foreign-dir"
    file.write_text(MARK)
    directory.mkdir()
    return file, directory, foreign(workdir / "foreign-mount")


def assert_intact(file: Path, directory: Path, mounted: Path) -> None:
    assert file.read_text() == MARK
    assert directory.is_dir() and not any(directory.iterdir())
    assert_foreign_mount_intact(mounted)


def test_unpublish_and_unstage_of_an_unknown_volume_touch_nothing(
    cluster: Cluster, workdir: Path, foreign: MountTmpfs
) -> None:
    file, directory, mounted = foreign_paths(workdir, foreign)
    node = cluster.node(cluster.node_ids[0])
    for _ in range(2):
        for path in (file, directory, mounted):
            unpublish(node, MISSING_ID, path)
            unstage(node, MISSING_ID, path)
        assert_intact(file, directory, mounted)


def test_a_volume_releases_only_its_own_paths(
    vol: Vol, workdir: Path, foreign: MountTmpfs
) -> None:
    """A known volume, staged and published, asked to unpublish/unstage paths it never
    made: OK, the foreign paths untouched, and its own publish still in place."""
    file, directory, mounted = foreign_paths(workdir, foreign)
    for path in (file, directory, mounted):  # not staged yet
        unpublish(vol.node, vol.id, path)
        unstage(vol.node, vol.id, path)
    assert_intact(file, directory, mounted)
    with staged(vol.node, vol.id, vol.staging), published(
        vol.node, vol.id, vol.staging, vol.target
    ):
        for path in (file, directory, mounted):
            unpublish(vol.node, vol.id, path)
        assert_intact(file, directory, mounted)
        (vol.target / "still").write_text("here")
        assert (vol.staging / "still").read_text() == "here"
    assert mount_at(vol.target) is None and not vol.target.exists()
    assert mount_at(vol.staging) is None
    assert_intact(file, directory, mounted)


def test_block_publish_removes_only_the_file_it_made(cluster: Cluster, workdir: Path) -> None:
    cap = block_capability()
    with created_volume(cluster.controller, create_request(size=16 * MIB, caps=[cap])) as v:
        node = cluster.node(replica_nodes(v)[0])
        made, given = workdir / "dev" / "made", workdir / "dev" / "given"
        given.parent.mkdir(parents=True)
        given.touch()  # the CO made this one
        with staged(node, v.volume_id, workdir / "s", cap):
            with published(node, v.volume_id, workdir / "s", made, cap), published(
                node, v.volume_id, workdir / "s", given, cap
            ):
                assert made.is_block_device() or mount_at(made) is not None
            assert not made.exists(), "spec: the SP deletes the file it created"
            assert given.is_file(), "a file the CO made is not the plugin's to delete"


# --- malformed paths and ids ------------------------------------------------------------------


def bad_paths(workdir: Path) -> dict[str, str]:
    return {
        "relative": "relative/tandem-staging",
        "nul": f"{workdir}/a\0b",
        "5000-chars": f"{workdir}/" + "a" * 5000,
        "deep-5000-chars": str(workdir) + "/d" * 2500,
        "component-above-name-max": f"{workdir}/" + "n" * 300,
    }


def node_requests(volume_id: str, path: str, staging: str, target: str) -> dict[str, object]:
    """Every node RPC that takes a path, with ``path`` in one path field and the given good
    ``staging`` and ``target`` paths in the others."""
    cap = mount_capability()
    return {
        "stage": csi_pb2.NodeStageVolumeRequest(
            volume_id=volume_id, staging_target_path=path, volume_capability=cap),
        "unstage": csi_pb2.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=path),
        "publish-target": csi_pb2.NodePublishVolumeRequest(
            volume_id=volume_id, staging_target_path=staging, target_path=path,
            volume_capability=cap),
        "publish-staging": csi_pb2.NodePublishVolumeRequest(
            volume_id=volume_id, staging_target_path=path, target_path=target,
            volume_capability=cap),
        "unpublish": csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=path),
        "stats": csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=path),
        "expand": csi_pb2.NodeExpandVolumeRequest(volume_id=volume_id, volume_path=path),
    }


def call(node: CsiClient, request: object) -> None:
    method = {
        csi_pb2.NodeStageVolumeRequest: node.node.NodeStageVolume,
        csi_pb2.NodeUnstageVolumeRequest: node.node.NodeUnstageVolume,
        csi_pb2.NodePublishVolumeRequest: node.node.NodePublishVolume,
        csi_pb2.NodeUnpublishVolumeRequest: node.node.NodeUnpublishVolume,
        csi_pb2.NodeGetVolumeStatsRequest: node.node.NodeGetVolumeStats,
        csi_pb2.NodeExpandVolumeRequest: node.node.NodeExpandVolume,
    }[type(request)]
    method(request)  # type: ignore[operator]


def call_refused(node: CsiClient, request: object) -> None:
    """The call must be INVALID_ARGUMENT; a stage or publish it does anyway is undone."""
    done = False
    try:
        with expect_code(Code.INVALID_ARGUMENT) as failure:
            call(node, request)
            done = True
        assert len(failure.message) < 1000, "a status message must stay small"
    finally:
        if done and isinstance(request, csi_pb2.NodePublishVolumeRequest):
            unpublish(node, request.volume_id, request.target_path)
        if done and isinstance(request, csi_pb2.NodeStageVolumeRequest):
            unstage(node, request.volume_id, request.staging_target_path)


@pytest.mark.parametrize("case", sorted(bad_paths(Path("/w"))))
def test_malformed_paths_are_invalid_argument(vol: Vol, workdir: Path, case: str) -> None:
    path = bad_paths(workdir)[case]

    def ours() -> list[str]:  # other tests on the machine share the mount namespace
        prefix = str(workdir.resolve())
        return sorted(m.mount_point for m in mounts()
                      if m.mount_point.startswith(prefix) or "tandem-staging" in m.mount_point)

    before = ours()
    requests = node_requests(vol.id, path, str(vol.staging), str(vol.target))
    # Stage and unstage while the volume is not staged: they would act on the path itself.
    for name in ("stage", "unstage"):
        print(f"{case}: {name}")
        call_refused(vol.node, requests.pop(name))
    with staged(vol.node, vol.id, vol.staging):
        for name, request in requests.items():
            print(f"{case}: {name}")
            call_refused(vol.node, request)
        assert mount_at(vol.staging) is not None, "the volume's own stage is untouched"
    assert ours() == before, "a mount was made or removed"
    assert not list(workdir.rglob("d")) and not list(workdir.glob("n*")), "a path was made"


@pytest.mark.parametrize("volume_id", ["x" * (2 << 20), "vol-a\0b", "vol-a\n", "../vol-a"],
                         ids=["2MiB", "nul", "newline", "dotdot"])
def test_malformed_volume_ids_are_invalid_argument(vol: Vol, volume_id: str) -> None:
    vol.staging.mkdir(parents=True)
    for request in node_requests(volume_id, str(vol.staging), str(vol.staging),
                                 str(vol.target)).values():
        call_refused(vol.node, request)
    assert mount_at(vol.staging) is None
