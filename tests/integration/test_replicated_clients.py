"""Real clients against a 3-replica volume: NBD tools on the export, devices through attach.

One 3-node dev cluster for the module (etcd, controller, nodes in network namespaces). The
first tests serve a volume's NBD export with ``export_volume`` (ownership as node-1, the
target in the root namespace) and drive it with nbdinfo, qemu-io, nbdcopy and fio's nbd
engine; after each one the export is stopped and the replicas must be identical, both by
the replica servers' checksums (``verify_volume``) and byte for byte in the pool files. The
last two move a raw block volume and an ext4 volume between nodes through the CSI node
service (nbdfuse + loop) and read the data back on another replica node.

A missing client tool fails the test: it is part of the development image.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import shutil
import stat
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from csi_driver import errors
from csi_driver._gen import csi_pb2
from csi_driver.client import CsiClient, block_capability, mount_capability
from csi_driver.state.etcd import EtcdStore
from csi_driver.verify import VerifyReport, verify_volume
from devtools import devcluster
from devtools.devcluster.mounts import loop_devices, mounts
from devtools.export import ExportHandle, export_volume
from tests.credentials import cluster_auth

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="namespaces, loop devices and mounts need root"),
    pytest.mark.timeout(180),
]

MiB = 1 << 20
NODES = ("node-1", "node-2", "node-3")
NBD_VOLUME_SIZE = 128 * MiB


@dataclass(frozen=True)
class Cluster:
    spec: devcluster.ClusterSpec
    controller: CsiClient

    @property
    def dir(self) -> Path:
        return Path(self.spec.dir)

    def node(self, node_id: str) -> CsiClient:
        return CsiClient(self.spec.node(node_id).csi_endpoint)


def run(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    tool = shutil.which(argv[0])
    assert tool is not None, f"{argv[0]} is not installed"
    result = subprocess.run(
        [tool, *argv[1:]], capture_output=True, text=True, timeout=timeout, check=False,
        env={**os.environ, "LC_ALL": "C"},
    )
    assert result.returncode == 0, f"{argv} rc={result.returncode}\n{result.stdout}{result.stderr}"
    return result


@contextlib.contextmanager
def running_cluster(directory: Path, lease_ttl_s: float = 3.0) -> Iterator[Cluster]:
    """A 3-node cluster; on exit its mounts and loop devices must be gone too.

    down() raises if it could not stop a process or delete a namespace. Namespaces are not
    re-checked by name afterwards: on a shared machine another cluster may reuse the name.
    """
    try:
        spec = devcluster.up(directory, len(NODES), 2 << 30, lease_ttl_s=lease_ttl_s)
        with CsiClient(spec.controller.csi_endpoint) as controller:
            yield Cluster(spec, controller)
    finally:
        devcluster.down(directory)
        prefix = str(directory.resolve()) + "/"
        left = loop_devices(directory) + [m.target for m in mounts()
                                          if m.target.startswith(prefix)]
        assert not left, f"left behind after down(): {left}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("clients")) as c:
        yield c


def create_volume(
    cluster: Cluster, size: int, cap: csi_pb2.VolumeCapability, replicas: int = 3
) -> str:
    volume = cluster.controller.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name=f"it-{uuid.uuid4().hex[:10]}", capacity_range=csi_pb2.CapacityRange(
            required_bytes=size), volume_capabilities=[cap],
        parameters={"replicas": str(replicas)},
    ), timeout=60).volume
    return str(volume.volume_id)


@contextlib.contextmanager
def volume(cluster: Cluster, size: int, cap: csi_pb2.VolumeCapability) -> Iterator[str]:
    volume_id = create_volume(cluster, size, cap)
    try:
        yield volume_id
    finally:
        cluster.controller.controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=volume_id), timeout=60)


@pytest.fixture(scope="module")
def nbd_volume(cluster: Cluster) -> Iterator[str]:
    with volume(cluster, NBD_VOLUME_SIZE, block_capability()) as volume_id:
        yield volume_id


@contextlib.contextmanager
def exported(cluster: Cluster, volume_id: str, node_id: str = "node-1") -> Iterator[ExportHandle]:
    """Serve the volume's NBD export; on exit stop it, which must flush cleanly (rc 0)."""
    sock = cluster.dir / f"export-{uuid.uuid4().hex[:8]}.sock"
    handle = asyncio.run(export_volume(cluster.dir, volume_id, node_id, sock))
    try:
        yield handle
        assert handle.running(), f"target died during the test:\n{handle.log_path.read_text()}"
    finally:
        rc = asyncio.run(handle.stop())
    assert rc == 0, f"target exit status {rc}:\n{handle.log_path.read_text()}"
    assert not sock.exists(), "the target left its socket behind"


async def _verify(spec: devcluster.ClusterSpec, volume_id: str) -> VerifyReport:
    store = EtcdStore([spec.etcd_host_endpoint], prefix=spec.etcd_prefix)
    try:
        return await verify_volume(store, volume_id, cluster_auth(spec.dir))
    finally:
        await store.close()


def pool_image(cluster: Cluster, node_id: str, volume_id: str) -> Path:
    return cluster.dir / "pools" / node_id / f"{volume_id}.img"


def read_image(cluster: Cluster, node_id: str, volume_id: str, offset: int, n: int) -> bytes:
    with open(pool_image(cluster, node_id, volume_id), "rb") as f:
        f.seek(offset)
        return f.read(n)


def assert_replicas_identical(
    cluster: Cluster, volume_id: str, nodes: tuple[str, ...] = NODES
) -> None:
    """verify_volume finds no divergence among ``nodes`` (all in the ISR), and their pool
    files are equal byte for byte."""
    report = asyncio.run(_verify(cluster.spec, volume_id))
    assert set(report.isr) == set(nodes), report
    verdicts = {r.node_id: r for r in report.replicas}
    for node_id in nodes:
        assert verdicts[node_id].reachable and verdicts[node_id].differing_bytes == 0, report
    assert report.identical, report
    files = [open(pool_image(cluster, n, volume_id), "rb") for n in nodes]  # noqa: SIM115
    try:
        sizes = {os.fstat(f.fileno()).st_size for f in files}
        assert len(sizes) == 1, f"replica sizes differ: {sizes}"
        for offset in range(0, sizes.pop(), 4 * MiB):  # bounded by the file size
            chunks = [f.read(4 * MiB) for f in files]
            if any(c != chunks[0] for c in chunks[1:]):
                pytest.fail(f"replica files differ in the 4 MiB chunk at {offset}")
    finally:
        for f in files:
            f.close()


# -- NBD clients on the export ------------------------------------------------------------


def test_nbdinfo_reports_size_and_capabilities(cluster: Cluster, nbd_volume: str) -> None:
    with exported(cluster, nbd_volume) as export:
        info = json.loads(run(["nbdinfo", "--json", export.uri]).stdout)
    [e] = info["exports"]
    assert e["export-size"] == NBD_VOLUME_SIZE
    for cap in ("can_fua", "can_flush", "can_trim", "can_zero"):
        assert e[cap] is True, cap
    assert e["is_read_only"] is False
    assert_replicas_identical(cluster, nbd_volume)


def test_qemu_io_patterns_zeroes_and_discard(cluster: Cluster, nbd_volume: str) -> None:
    commands = [
        "write -P 0xee 0 4M", "flush",  # non-zero data where zeroing and discard must land
        "write -P 0xab 0 1M", "read -P 0xab 0 1M",
        "write -z 1M 1M", "read -P 0 1M 1M",
        "discard 2M 1M", "read -P 0 2M 1M",
        "write -f -P 0x11 3M 64k", "read -P 0x11 3M 64k", "read -P 0xee 3136k 1k",
        "write -P 0x22 4095k 2k", "read -P 0x22 4095k 2k",  # unaligned to 4k
        "write -P 0x33 127M 1M", "read -P 0x33 127M 1M",  # the last MiB
        "flush",
    ]  # fmt: skip
    with exported(cluster, nbd_volume) as export:
        argv = ["qemu-io", "--image-opts",
                f"driver=nbd,server.type=unix,server.path={export.socket_path}"]
        for command in commands:
            argv += ["-c", command]
        out = run(argv).stdout
    assert "fail" not in out.lower() and "error" not in out.lower(), out
    for node_id in NODES:  # every replica holds what the client wrote
        assert read_image(cluster, node_id, nbd_volume, 0, MiB) == b"\xab" * MiB
        assert read_image(cluster, node_id, nbd_volume, MiB, 2 * MiB) == bytes(2 * MiB)
        assert read_image(cluster, node_id, nbd_volume, 3 * MiB, 64 << 10) == b"\x11" * (64 << 10)
        assert read_image(cluster, node_id, nbd_volume, 4095 << 10, 2048) == b"\x22" * 2048
        assert read_image(cluster, node_id, nbd_volume, 127 * MiB, MiB) == b"\x33" * MiB
    assert_replicas_identical(cluster, nbd_volume)


def test_nbdcopy_in_and_out(cluster: Cluster, nbd_volume: str, tmp_path: Path) -> None:
    source, back = tmp_path / "source.bin", tmp_path / "back.bin"
    payload = random.Random(11).randbytes(16 * MiB)
    source.write_bytes(payload)
    with exported(cluster, nbd_volume) as export:
        run(["nbdcopy", str(source), export.uri])
        run(["nbdcopy", export.uri, str(back)])
    with open(back, "rb") as f:
        assert f.read(16 * MiB) == payload
    assert back.stat().st_size == NBD_VOLUME_SIZE
    assert read_image(cluster, "node-3", nbd_volume, 0, 16 * MiB) == payload
    assert_replicas_identical(cluster, nbd_volume)


def test_fio_random_writes_verify(cluster: Cluster, nbd_volume: str) -> None:
    with exported(cluster, nbd_volume) as export:
        out = run([
            "fio", "--name=verify", "--ioengine=nbd", f"--uri={export.uri}",
            "--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=64M",
            "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
            "--output-format=json",
        ], timeout=150).stdout  # fmt: skip
    job = json.loads(out[out.index("{"):])["jobs"][0]  # the nbd engine chats first
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 64 * MiB
    assert job["read"]["io_bytes"] == 64 * MiB  # the verify pass read everything back
    assert_replicas_identical(cluster, nbd_volume)


async def _owner(spec: devcluster.ClusterSpec, volume_id: str) -> str | None:
    store = EtcdStore([spec.etcd_host_endpoint], prefix=spec.etcd_prefix)
    try:
        found = await store.get_volume(volume_id)
    finally:
        await store.close()
    assert found is not None
    return found.value.owner


def test_export_holds_ownership_until_stopped(cluster: Cluster, nbd_volume: str) -> None:
    with exported(cluster, nbd_volume, "node-2"):
        assert asyncio.run(_owner(cluster.spec, nbd_volume)) == "node-2"
        with pytest.raises(errors.FailedPreconditionError, match="node-2"):
            asyncio.run(export_volume(cluster.dir, nbd_volume, "node-3", cluster.dir / "x.sock"))
    assert asyncio.run(_owner(cluster.spec, nbd_volume)) is None
    assert_replicas_identical(cluster, nbd_volume)


def test_a_target_stopped_as_soon_as_it_is_ready_exits_cleanly(
    cluster: Cluster, nbd_volume: str
) -> None:
    """A SIGTERM right after READY used to find no handler yet (the default action killed
    the target, exit -15, no flush); the handlers are now in place before READY."""
    for _ in range(3):
        with exported(cluster, nbd_volume, "node-2"):
            pass  # exported() asserts a clean stop (exit status 0) and no socket left


# -- through the attach path (nbdfuse + loop) -----------------------------------------------


def stage_publish(node: CsiClient, volume_id: str, work: Path,
                  cap: csi_pb2.VolumeCapability) -> Path:
    staging, target = work / "staging", work / "pod" / "vol"
    staging.mkdir(parents=True, exist_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    node.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id=volume_id, staging_target_path=str(staging), volume_capability=cap,
    ), timeout=120)
    node.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=volume_id, staging_target_path=str(staging), target_path=str(target),
        volume_capability=cap,
    ), timeout=60)
    return target


def unpublish_unstage(node: CsiClient, volume_id: str, work: Path) -> None:
    node.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=volume_id, target_path=str(work / "pod" / "vol")), timeout=60)
    node.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id=volume_id, staging_target_path=str(work / "staging")), timeout=120)


@contextlib.contextmanager
def published_on(cluster: Cluster, node_id: str, volume_id: str,
                 cap: csi_pb2.VolumeCapability) -> Iterator[Path]:
    """Stage + publish on a node (work paths below the cluster dir, so down() cleans up)."""
    work = cluster.dir / "work" / uuid.uuid4().hex[:8]
    with cluster.node(node_id) as node:
        try:
            yield stage_publish(node, volume_id, work, cap)
        finally:
            unpublish_unstage(node, volume_id, work)


def test_raw_block_volume_moves_between_nodes(cluster: Cluster, tmp_path: Path) -> None:
    cap = block_capability()
    source, back = tmp_path / "data.bin", tmp_path / "back.bin"
    source.write_bytes(os.urandom(8 * MiB))
    with volume(cluster, 64 * MiB, cap) as volume_id:
        with published_on(cluster, "node-1", volume_id, cap) as device:
            assert stat.S_ISBLK(os.stat(device).st_mode)
            run(["dd", f"if={source}", f"of={device}", "bs=1M", "count=8", "oflag=direct",
                 "conv=fsync,notrunc"])
        with published_on(cluster, "node-3", volume_id, cap) as device:
            run(["dd", f"if={device}", f"of={back}", "bs=1M", "count=8", "iflag=direct"])
        assert back.read_bytes() == source.read_bytes()
        assert_replicas_identical(cluster, volume_id)


def test_filesystem_volume_moves_between_nodes(cluster: Cluster) -> None:
    cap = mount_capability("ext4")
    with volume(cluster, 64 * MiB, cap) as volume_id:
        sums: dict[str, str] = {}
        with published_on(cluster, "node-1", volume_id, cap) as mnt:
            assert (mnt / "lost+found").is_dir(), "mkfs.ext4 ran through the attach path"
            for i in range(6):
                payload = os.urandom(random.Random(i).randint(1, 3 * MiB))
                (mnt / f"f{i}.bin").write_bytes(payload)
                sums[f"f{i}.bin"] = hashlib.sha256(payload).hexdigest()
            os.sync()
        with published_on(cluster, "node-2", volume_id, cap) as mnt:
            found = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                     for p in mnt.glob("f*.bin")}
        assert found == sums
        assert_replicas_identical(cluster, volume_id)
