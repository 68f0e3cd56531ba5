"""Replicas as LVM logical volumes in one volume group, thick or from a thin pool.

This module owns the volume id -> LV name mapping (``tandem-<id>``), the lvm command lines
and the parsing of their JSON reports. Argv builders and parsers are pure functions, tested
without LVM. It must not start a process except through its runner (``command.run`` by
default), touch an LV without the ``tandem-`` prefix, or run anything that could prompt.

Sizes: LVM allocates whole extents (4 MiB by default), so a replica's ``size_bytes`` is the
real device size, the request rounded up to the VG's extent size. Idempotency and shrink
checks compare rounded sizes, so repeating a request for a size LVM rounded is a no-op.
"""

from __future__ import annotations

import builtins
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from replication import command
from replication.command import CommandError, CommandResult
from replication.errors import (
    InvalidReplicaIdError,
    InvalidSizeError,
    PoolError,
    PoolFullError,
    ReplicaConflictError,
    ReplicaNotFoundError,
)
from replication.pool.base import (
    Pool,
    PoolCapacity,
    ReplicaInfo,
    check_range,
    check_size,
    check_volume_id,
    is_valid_volume_id,
)

LV_PREFIX = "tandem-"
# DM_NAME_LEN is 128 including the NUL; the dm name is "<vg>-<lv>" with every "-" doubled.
_DM_NAME_MAX = 127
# lvcreate refuses LV names containing these (lib/misc/lvm-string.c, LVM 2.03).
_RESERVED_RE = re.compile(
    r"_(cdata|cmeta|corig|cpool|cvol|wcorig|mimage|mlog|rimage|rmeta|tdata|tmeta|vdata|imeta"
    r"|iorig|pmspare|vorigin)"
)
_LVM_NAME_RE = re.compile(r"^[A-Za-z0-9_.+][A-Za-z0-9_.+-]{0,126}$")
_LVS_FIELDS = "lv_name,lv_size,lv_path,data_percent,lv_attr"
_VGS_FIELDS = "vg_size,vg_free,vg_extent_size"
_REPORT_OPTIONS = ("--reportformat", "json", "--units", "b", "--nosuffix")
# LVM warns on stderr about any inherited fd; command.run closes them, other runners may not.
_LVM_ENV = {"LVM_SUPPRESS_FD_WARNINGS": "1"}
# blkdiscard refuses ranges not aligned to the device's logical sector (512 at least).
_SECTOR = 512


class Runner(Protocol):
    """The shape of ``command.run``; tests pass a runner that adds LVM ``--config``."""

    def __call__(
        self,
        argv: Sequence[str],
        *,
        timeout: float = ...,
        input: bytes | None = ...,
        check: bool = ...,
        env_extra: Mapping[str, str] | None = ...,
    ) -> CommandResult: ...


@dataclass(frozen=True)
class LvReport:
    name: str
    size_bytes: int
    path: str
    data_percent: float | None  # None for thick LVs (and inactive thin ones)
    attr: str


@dataclass(frozen=True)
class VgReport:
    size_bytes: int
    free_bytes: int
    extent_size_bytes: int


def lv_name_for(volume_id: str, vg: str) -> str:
    """The LV name of ``volume_id``; InvalidReplicaIdError when LVM or dm would refuse it."""
    check_volume_id(volume_id)
    name = LV_PREFIX + volume_id
    reserved = _RESERVED_RE.search(name)
    if reserved:
        raise InvalidReplicaIdError(
            f"volume id {volume_id!r} contains {reserved.group()!r}, reserved by LVM"
        )
    if len(dm_name(vg, name)) > _DM_NAME_MAX:
        raise InvalidReplicaIdError(
            f"volume id {volume_id!r} is too long for an LV in VG {vg!r} "
            f"(device-mapper names are at most {_DM_NAME_MAX} characters)"
        )
    return name


def volume_id_of(lv_name: str) -> str | None:
    """The volume id an LV name stands for, or None when the LV is not ours."""
    volume_id = lv_name.removeprefix(LV_PREFIX)
    return volume_id if volume_id != lv_name and is_valid_volume_id(volume_id) else None


def dm_name(vg: str, lv_name: str) -> str:
    """The device-mapper name LVM gives an active LV (``/dev/mapper/<this>``)."""
    return f"{vg.replace('-', '--')}-{lv_name.replace('-', '--')}"


def round_up(size_bytes: int, extent_bytes: int) -> int:
    return -(-size_bytes // extent_bytes) * extent_bytes


def build_lvcreate_argv(
    vg: str, lv_name: str, size_bytes: int, thin_pool: str | None = None
) -> list[str]:
    """lvcreate for a thick LV, or a thin LV of virtual size ``size_bytes`` in ``thin_pool``.

    ``-y``: with no terminal a prompt (e.g. "wipe signature?") would fail the command.
    Thick LVs add ``--wipesignatures y`` whatever lvm.conf says: the extents may hold a
    deleted replica's filesystem, which blkid and "format if blank" checks would otherwise
    find on the new volume. Thin LVs rely on the pool zeroing newly provisioned blocks
    (LVM's default; a pool built with ``-Z n`` is the operator's choice to skip that).
    """
    size = f"{size_bytes}b"
    if thin_pool is None:
        return ["lvcreate", "-y", "--wipesignatures", "y", "-L", size, "-n", lv_name, vg]
    return ["lvcreate", "-y", "-V", size, "-T", f"{vg}/{thin_pool}", "-n", lv_name]


def build_lvremove_argv(vg: str, lv_name: str) -> list[str]:
    # -y answers "really remove active logical volume?"; an open LV still fails ("in use").
    return ["lvremove", "-y", f"{vg}/{lv_name}"]


def build_lvextend_argv(vg: str, lv_name: str, size_bytes: int) -> list[str]:
    # An absolute size, not "+N": a retried request then cannot grow the LV twice.
    return ["lvextend", "-L", f"{size_bytes}b", f"{vg}/{lv_name}"]


def build_lvs_argv(vg: str, lv_name: str | None = None) -> list[str]:
    target = vg if lv_name is None else f"{vg}/{lv_name}"
    return ["lvs", *_REPORT_OPTIONS, "-o", _LVS_FIELDS, target]


def build_vgs_argv(vg: str) -> list[str]:
    return ["vgs", *_REPORT_OPTIONS, "-o", _VGS_FIELDS, vg]


def build_blkdiscard_argv(path: str, offset: int, length: int) -> list[str]:
    # -f: the replica is normally held open by the data path, and blkdiscard would refuse
    # (O_EXCL open, "contains existing file system") exactly the devices TRIM is meant for.
    return ["blkdiscard", "-f", "-o", str(offset), "-l", str(length), path]


def parse_lvs(json_text: str) -> list[LvReport]:
    """Rows of ``lvs --reportformat json --units b --nosuffix -o <_LVS_FIELDS>``."""
    try:
        return [
            LvReport(
                name=str(row["lv_name"]),
                size_bytes=int(row["lv_size"]),
                path=str(row.get("lv_path", "")),
                data_percent=_percent(row.get("data_percent", "")),
                attr=str(row.get("lv_attr", "")),
            )
            for row in _report_rows(json_text, "lv")
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise PoolError(f"unexpected lvs output: {exc!r}") from exc


def parse_vgs(json_text: str) -> VgReport:
    """The one row of ``vgs --reportformat json --units b --nosuffix -o <_VGS_FIELDS> <vg>``."""
    rows = _report_rows(json_text, "vg")
    if len(rows) != 1:
        raise PoolError(f"expected one volume group in vgs output, got {len(rows)}")
    try:
        row = rows[0]
        return VgReport(
            size_bytes=int(row["vg_size"]),
            free_bytes=int(row["vg_free"]),
            extent_size_bytes=int(row["vg_extent_size"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise PoolError(f"unexpected vgs output: {exc!r}") from exc


def is_insufficient_space(stderr: str) -> bool:
    """Whether a failed lvcreate/lvextend ran out of space.

    LVM gives no structured signal for this: the exit status is ECMD_FAILED (5) for every
    processing failure, and even its JSON command log reports log_errno -1 with ret_code 5.
    Only the message differs, so it is matched, case-insensitively and in the C locale
    (``command.run`` sets LC_ALL=C). LVM 2.03 says 'Volume group "vg" has insufficient free
    space (N extents): M required.' (lvcreate) and 'Insufficient free space: N extents
    needed, but only M available' (lvextend, thin pools). Callers check free space from
    ``vgs`` before running the command; this only classifies a race lost to another writer.
    """
    return "insufficient free space" in stderr.lower()


def _report_rows(json_text: str, key: str) -> list[dict[str, Any]]:
    # An lvm.conf with log/report_command_log=1 adds a "log" list beside "report"; only the
    # report matters. Several report entries (one per VG) are concatenated.
    try:
        document = json.loads(json_text)
        rows: list[dict[str, Any]] = []
        for entry in document["report"]:
            rows.extend(entry.get(key, []))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise PoolError(f"unparseable LVM JSON report: {exc!r}") from exc
    return rows


def _percent(value: object) -> float | None:
    # "json" reports numbers as strings, "" when not applicable; "json_std" uses numbers.
    return None if value is None or value == "" else float(str(value))


def _check_lvm_name(name: str, what: str) -> None:
    if not _LVM_NAME_RE.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"invalid LVM {what} name {name!r}")


class LvmPool(Pool):
    """Replicas as LVs in ``vg``: thick, or thin in ``thin_pool`` when given.

    Capacity is the VG's size and free space for thick pools. For thin pools it is the thin
    pool's data size and its unused part: thin LVs over-commit by design, so only physical
    use is reported, and creation fails only when LVM refuses it. No lock here: LVM's own
    VG lock serialises the commands and its allocator is what refuses to over-commit.
    """

    kind = "lvm"

    def __init__(
        self,
        vg: str,
        thin_pool: str | None = None,
        runner: Runner = command.run,
        timeout: float = 120,
    ) -> None:
        _check_lvm_name(vg, "volume group")
        if thin_pool is not None:
            _check_lvm_name(thin_pool, "thin pool")
        self._vg = vg
        self._thin_pool = thin_pool
        self._runner = runner
        self._timeout = timeout

    def capacity(self) -> PoolCapacity:
        if self._thin_pool is None:
            vg = self._report_vg()
            return PoolCapacity(vg.size_bytes, vg.free_bytes)
        rows = parse_lvs(self._run(build_lvs_argv(self._vg, self._thin_pool)).stdout)
        percent = rows[0].data_percent if len(rows) == 1 else None
        if percent is None:
            raise PoolError(f"thin pool {self._vg}/{self._thin_pool}: usage unknown (inactive?)")
        total = rows[0].size_bytes
        return PoolCapacity(total, max(total - int(total * percent / 100), 0))

    def create(self, volume_id: str, size_bytes: int) -> ReplicaInfo:
        check_size(size_bytes)
        lv_name = lv_name_for(volume_id, self._vg)
        vg = self._report_vg()
        wanted = round_up(size_bytes, vg.extent_size_bytes)
        existing = self.get(volume_id)
        if existing is not None:
            if existing.size_bytes != wanted:
                raise ReplicaConflictError(
                    f"replica {volume_id} exists with size {existing.size_bytes}, not {wanted}"
                )
            return existing
        if self._thin_pool is None and wanted > vg.free_bytes:
            raise PoolFullError(
                f"replica {volume_id} needs {wanted} bytes, VG {self._vg} has {vg.free_bytes}"
            )
        argv = build_lvcreate_argv(self._vg, lv_name, wanted, self._thin_pool)
        try:
            self._run(argv)
        except CommandError as exc:
            # Re-read the VG rather than parse "already exists": a concurrent create of the
            # same replica (or a timed-out one that finished) is a success.
            raced = self.get(volume_id)
            if raced is not None and raced.size_bytes == wanted:
                return raced
            raise self._classify(exc, f"creating replica {volume_id}") from exc
        return self._require(volume_id)

    def delete(self, volume_id: str) -> None:
        lv_name = lv_name_for(volume_id, self._vg)
        if self.get(volume_id) is None:
            return
        try:
            self._run(build_lvremove_argv(self._vg, lv_name))
        except CommandError as exc:
            if self.get(volume_id) is None:
                return  # removed concurrently: the goal is reached
            raise PoolError(f"removing replica {volume_id}: {exc}") from exc

    def resize(self, volume_id: str, size_bytes: int) -> ReplicaInfo:
        check_size(size_bytes)
        lv_name = lv_name_for(volume_id, self._vg)
        current = self._require(volume_id)
        vg = self._report_vg()
        wanted = round_up(size_bytes, vg.extent_size_bytes)
        if wanted == current.size_bytes:
            return current
        if wanted < current.size_bytes:
            raise ReplicaConflictError(
                f"replica {volume_id} is {current.size_bytes} bytes; shrinking to "
                f"{size_bytes} is not supported"
            )
        growth = wanted - current.size_bytes
        if self._thin_pool is None and growth > vg.free_bytes:
            raise PoolFullError(
                f"growing {volume_id} needs {growth} bytes, VG {self._vg} has {vg.free_bytes}"
            )
        try:
            self._run(build_lvextend_argv(self._vg, lv_name, wanted))
        except CommandError as exc:
            now = self.get(volume_id)
            if now is not None and now.size_bytes >= wanted:
                return now
            raise self._classify(exc, f"growing replica {volume_id}") from exc
        return self._require(volume_id)

    def get(self, volume_id: str) -> ReplicaInfo | None:
        lv_name = lv_name_for(volume_id, self._vg)
        # The whole VG, filtered here: "lvs vg/lv" fails for a missing LV with the same
        # exit status as for any other failure, so absence could only be told from stderr.
        for lv in self._report_lvs():
            if lv.name == lv_name:
                return self._info(volume_id, lv)
        return None

    def list(self) -> list[ReplicaInfo]:
        replicas = []
        for lv in self._report_lvs():
            volume_id = volume_id_of(lv.name)
            if volume_id is not None and lv.name != self._thin_pool:
                replicas.append(self._info(volume_id, lv))
        return sorted(replicas, key=lambda info: info.volume_id)

    def punch_hole(self, volume_id: str, offset: int, length: int) -> None:
        current = self._require(volume_id)
        check_range(offset, length, current.size_bytes)
        if offset % _SECTOR or length % _SECTOR:
            raise InvalidSizeError(f"discard range must be {_SECTOR}-byte aligned")
        if length == 0:
            return
        try:
            self._run(build_blkdiscard_argv(current.path, offset, length))
        except CommandError as exc:
            raise PoolError(f"discarding in replica {volume_id}: {exc}") from exc

    def _run(self, argv: Sequence[str]) -> CommandResult:
        return self._runner(argv, timeout=self._timeout, env_extra=_LVM_ENV)

    def _report_vg(self) -> VgReport:
        try:
            return parse_vgs(self._run(build_vgs_argv(self._vg)).stdout)
        except CommandError as exc:
            raise PoolError(f"volume group {self._vg}: {exc}") from exc

    def _report_lvs(self) -> builtins.list[LvReport]:
        try:
            return parse_lvs(self._run(build_lvs_argv(self._vg)).stdout)
        except CommandError as exc:
            raise PoolError(f"volume group {self._vg}: {exc}") from exc

    def _require(self, volume_id: str) -> ReplicaInfo:
        info = self.get(volume_id)
        if info is None:
            raise ReplicaNotFoundError(f"replica {volume_id} does not exist")
        return info

    def _info(self, volume_id: str, lv: LvReport) -> ReplicaInfo:
        allocated = lv.size_bytes
        # lv_attr's first letter is the volume type; "V" = thin volume, allocated on write.
        if lv.attr.startswith("V") and lv.data_percent is not None:
            allocated = int(lv.size_bytes * lv.data_percent / 100)
        path = lv.path or f"/dev/{self._vg}/{lv.name}"
        return ReplicaInfo(volume_id, lv.size_bytes, path, allocated)

    @staticmethod
    def _classify(exc: CommandError, doing: str) -> PoolError:
        if is_insufficient_space(exc.stderr):
            return PoolFullError(f"{doing}: {exc}")
        return PoolError(f"{doing}: {exc}")
