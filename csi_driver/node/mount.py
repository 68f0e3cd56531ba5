"""Filesystems and mounts: the node's thin I/O edge over blkid, mkfs, mount and umount.

Every command goes through ``replication.command`` (argv lists, no shell, typed errors).
``parse_mountinfo`` is pure so the idempotency checks ("already mounted here, from the same
source?") are unit-tested without mounting anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from replication.command import CommandError, run_async

MKFS = {"ext4": ["mkfs.ext4", "-q", "-F", "-E", "nodiscard"], "xfs": ["mkfs.xfs", "-q", "-f", "-K"]}


@dataclass(frozen=True)
class MountEntry:
    mount_point: str
    root: str
    source: str
    fs_type: str
    options: tuple[str, ...]
    major_minor: str


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    return (
        field.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
    )


def parse_mountinfo(text: str) -> list[MountEntry]:
    entries = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields = left.split()
        rest = right.split()
        if len(fields) < 6 or len(rest) < 2:
            continue
        entries.append(
            MountEntry(
                mount_point=_unescape(fields[4]),
                root=_unescape(fields[3]),
                source=_unescape(rest[1]),
                fs_type=rest[0],
                options=tuple(fields[5].split(",")),
                major_minor=fields[2],
            )
        )
    return entries


def mounts_at(path: str | Path) -> list[MountEntry]:
    target = os.path.realpath(path)
    text = Path("/proc/self/mountinfo").read_text()
    return [m for m in parse_mountinfo(text) if m.mount_point == target]


def device_numbers(device: str) -> str:
    st = os.stat(device)
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


async def filesystem_type(device: str) -> str | None:
    """The filesystem signature on ``device``, or None when it is blank (blkid rc 2)."""
    result = await run_async(
        ["blkid", "-p", "-o", "value", "-s", "TYPE", device], check=False, timeout=30
    )
    if result.returncode == 2:
        return None
    if result.returncode != 0:
        raise CommandError(result.argv, result.returncode, result.stderr)
    return result.stdout.strip() or None


async def make_filesystem(device: str, fs_type: str) -> None:
    await run_async([*MKFS[fs_type], device], timeout=300)


async def mount(source: str, target: str, fs_type: str, options: list[str]) -> None:
    argv = ["mount", "-t", fs_type]
    if options:
        argv += ["-o", ",".join(options)]
    await run_async([*argv, source, target], timeout=60)


async def bind_mount(source: str, target: str, readonly: bool, options: list[str]) -> None:
    await run_async(["mount", "--bind", source, target], timeout=60)
    if readonly or options:
        # A bind mount ignores most flags on the first call; a remount applies them.
        flags = ["remount", "bind", *(["ro"] if readonly else []), *options]
        await run_async(["mount", "-o", ",".join(flags), target], timeout=60)


async def unmount(target: str) -> None:
    """Unmount every layer at ``target`` (idempotent)."""
    while mounts_at(target):
        await run_async(["umount", target], timeout=60)


async def grow_filesystem(device: str, mount_point: str, fs_type: str) -> None:
    """Grow a mounted filesystem to its device. ext4 online needs CAP_SYS_RESOURCE, which
    some nodes lack: ext4 is grown offline at stage (``grow_ext4_offline``) instead."""
    if fs_type == "xfs":
        await run_async(["xfs_growfs", mount_point], timeout=300)
    else:
        await run_async(["resize2fs", device], timeout=300)


async def ext4_size_bytes(device: str) -> int:
    """The size the ext4 filesystem on ``device`` spans (its superblock, ``dumpe2fs -h``)."""
    result = await run_async(["dumpe2fs", "-h", device], timeout=60)
    fields = dict(line.split(":", 1) for line in result.stdout.splitlines() if ":" in line)
    try:
        return int(fields["Block count"]) * int(fields["Block size"])
    except (KeyError, ValueError) as exc:
        raise CommandError(result.argv, 0, f"no block count in dumpe2fs output: {exc}") from exc


async def filesystem_fills(device: str, fs_type: str, device_size: int) -> bool:
    """Whether the filesystem already spans the device (nothing to grow)."""
    if fs_type != "ext4":
        return False  # xfs_growfs is a no-op when there is nothing to grow
    return await ext4_size_bytes(device) >= device_size


async def grow_ext4_to_device(device: str) -> tuple[int, int] | None:
    """Grow an unmounted ext4 that is smaller than its device: (old, new) size, or None."""
    fs_size, dev_size = await ext4_size_bytes(device), await block_size_bytes(device)
    if fs_size >= dev_size:
        return None
    await grow_ext4_offline(device)
    return fs_size, dev_size


async def grow_ext4_offline(device: str) -> None:
    """Grow an unmounted ext4 to its device: resize2fs wants a fresh check first, and
    offline it needs no capability beyond opening the device."""
    check = await run_async(["e2fsck", "-f", "-p", device], check=False, timeout=1800)
    if check.returncode >= 4:  # 1 and 2: errors were corrected
        raise CommandError(check.argv, check.returncode, check.stderr or check.stdout)
    await run_async(["resize2fs", device], timeout=1800)


async def block_size_bytes(device: str) -> int:
    result = await run_async(["blockdev", "--getsize64", device], timeout=30)
    return int(result.stdout.strip())


async def flush_buffers(device: str) -> None:
    await run_async(["blockdev", "--flushbufs", device], timeout=60)
