"""LvmPool against real LVM on a throw-away loop device (root only).

Three levels, so that each kernel tests as much as it can:
- ``vgs``/``lvs`` work without device-mapper: capacity and listing always run.
- With activation disabled (``--config global/activation=0``) LVM still edits VG metadata:
  create/resize/delete and the real error messages run even on a kernel without dm.
- The full lifecycle (active LVs, blkdiscard) needs /dev/mapper/control.
Every VG, PV and loop device made here is removed in a ``finally``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from replication import command
from replication.command import CommandError, CommandResult
from replication.errors import PoolFullError, ReplicaConflictError, ReplicaNotFoundError
from replication.pool.base import PoolCapacity
from replication.pool.lvm import (
    LvmPool,
    build_lvcreate_argv,
    build_lvextend_argv,
    is_insufficient_space,
)

pytestmark = pytest.mark.integration

MIB = 1 << 20
EXTENT = 4 * MIB  # vgcreate's default extent size


def _device_mapper_problem() -> str | None:
    """Why device-mapper cannot be used here, or None when it can."""
    control = Path("/dev/mapper/control")
    if not control.exists():
        return (
            "device-mapper is not available in this kernel (/dev/mapper/control missing): "
            "lvcreate cannot run here"
        )
    # libdevmapper mknods the control node itself when it is missing, so after any lvm
    # command the node exists even on a kernel without dm; only opening it tells.
    try:
        os.close(os.open(control, os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        return (
            f"device-mapper is not available in this kernel (/dev/mapper/control: "
            f"{exc.strerror}): lvcreate cannot run here"
        )
    return None


DM_PROBLEM = _device_mapper_problem()
# Tell LVM it may not touch device-mapper: it then only edits the VG metadata.
METADATA_ONLY = ("--config", "global/activation=0")


def _lvm(*argv: str) -> CommandResult:
    return command.run(argv, env_extra={"LVM_SUPPRESS_FD_WARNINGS": "1"})


def metadata_only_runner(
    argv: Sequence[str],
    *,
    timeout: float = 60,
    input: bytes | None = None,
    check: bool = True,
    env_extra: Mapping[str, str] | None = None,
) -> CommandResult:
    """command.run, with LVM told not to activate anything (argv[0] is an lvm command)."""
    if argv[0] in ("lvcreate", "lvremove", "lvextend", "lvs", "vgs"):
        argv = [argv[0], *METADATA_ONLY, *argv[1:]]
    return command.run(argv, timeout=timeout, input=input, check=check, env_extra=env_extra)


@pytest.fixture
def loop_vg(tmp_path: Path) -> Iterator[str]:
    """A fresh VG on a 64 MiB loop device; yields its name."""
    if os.geteuid() != 0:
        pytest.skip("needs root (losetup, pvcreate, vgcreate)")
    for tool in ("losetup", "pvcreate", "vgcreate", "vgs"):
        if shutil.which(tool) is None:
            # `make test` installs lvm2: missing tools are a broken install, not a machine limit.
            pytest.fail(f"{tool} is not installed (apt-get install lvm2)")
    backing = tmp_path / "pv.img"
    backing.touch()
    os.truncate(backing, 64 * MIB)
    vg = f"tandemtest{secrets.token_hex(4)}"
    loop = command.run(["losetup", "--find", "--show", str(backing)]).stdout.strip()
    try:
        _lvm("pvcreate", "-y", loop)
        _lvm("vgcreate", vg, loop)
        yield vg
    finally:
        # Each step on its own: a failed vgremove must not leave the loop device behind.
        extra = METADATA_ONLY if DM_PROBLEM else ()
        with contextlib.suppress(CommandError):
            _lvm("vgremove", *extra, "-f", "-y", vg)
        with contextlib.suppress(CommandError):
            _lvm("pvremove", "-y", loop)
        command.run(["losetup", "-d", loop])


def test_capacity_and_listing_from_real_vgs_and_lvs(loop_vg: str) -> None:
    pool = LvmPool(loop_vg)
    capacity = pool.capacity()
    # 64 MiB minus the PV metadata area, in whole 4 MiB extents.
    assert capacity.total_bytes % EXTENT == 0
    assert 48 * MIB <= capacity.total_bytes < 64 * MIB
    assert capacity.free_bytes == capacity.total_bytes
    assert pool.list() == []
    assert pool.get("nothing") is None


def test_metadata_lifecycle_without_activation(loop_vg: str) -> None:
    pool = LvmPool(loop_vg, runner=metadata_only_runner)
    total = pool.capacity().total_bytes

    info = pool.create("vol-1", MIB)  # rounded up to one extent
    assert (info.volume_id, info.size_bytes) == ("vol-1", EXTENT)
    assert info.path == f"/dev/{loop_vg}/tandem-vol-1"
    assert pool.create("vol-1", MIB) == info  # same request: idempotent
    assert pool.create("vol-1", EXTENT) == info  # same after rounding
    with pytest.raises(ReplicaConflictError):
        pool.create("vol-1", 2 * EXTENT)
    assert pool.capacity() == PoolCapacity(total, total - EXTENT)

    with pytest.raises(PoolFullError):
        pool.create("huge", total)  # refused by the vgs pre-check
    assert pool.get("huge") is None

    assert pool.resize("vol-1", 2 * EXTENT).size_bytes == 2 * EXTENT
    assert pool.resize("vol-1", 2 * EXTENT - MIB).size_bytes == 2 * EXTENT  # no-op
    with pytest.raises(ReplicaConflictError):
        pool.resize("vol-1", EXTENT)
    with pytest.raises(PoolFullError):
        pool.resize("vol-1", total + EXTENT)
    with pytest.raises(ReplicaNotFoundError):
        pool.resize("ghost", EXTENT)

    pool.create("vol-0", EXTENT)
    assert [r.volume_id for r in pool.list()] == ["vol-0", "vol-1"]
    assert pool.capacity().free_bytes == total - 3 * EXTENT

    pool.delete("vol-1")
    pool.delete("vol-1")
    pool.delete("ghost")
    assert [r.volume_id for r in pool.list()] == ["vol-0"]
    assert pool.capacity().free_bytes == total - EXTENT


def test_real_out_of_space_messages_are_recognised(loop_vg: str) -> None:
    """The stderr match in is_insufficient_space, checked against this LVM's own words."""
    too_big = build_lvcreate_argv(loop_vg, "tandem-big", 1 << 30)
    with pytest.raises(CommandError) as created:
        metadata_only_runner(too_big, env_extra={"LVM_SUPPRESS_FD_WARNINGS": "1"})
    assert created.value.returncode == 5
    assert is_insufficient_space(created.value.stderr), created.value.stderr

    LvmPool(loop_vg, runner=metadata_only_runner).create("small", EXTENT)
    grow = build_lvextend_argv(loop_vg, "tandem-small", 1 << 30)
    with pytest.raises(CommandError) as extended:
        metadata_only_runner(grow, env_extra={"LVM_SUPPRESS_FD_WARNINGS": "1"})
    assert is_insufficient_space(extended.value.stderr), extended.value.stderr


def test_full_lifecycle_with_device_mapper(loop_vg: str) -> None:
    if DM_PROBLEM:
        pytest.skip(DM_PROBLEM)
    pool = LvmPool(loop_vg)
    info = pool.create("vol-1", 8 * MIB)
    device = Path(info.path)
    assert device.exists()
    with open(device, "r+b") as f:
        f.write(b"\xaa" * MIB)
        f.flush()
        os.fsync(f.fileno())
    pool.punch_hole("vol-1", 0, MIB)  # a loop device on a file supports discard
    assert pool.resize("vol-1", 12 * MIB).size_bytes == 12 * MIB
    pool.delete("vol-1")
    assert pool.get("vol-1") is None
    assert not device.exists()
