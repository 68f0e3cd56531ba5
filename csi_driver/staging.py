"""Node-side volume lifecycle: stage (own + attach + mkfs + mount), publish, and back.

What is staged on this node is persisted as one small JSON file per volume under the node's
state directory, so unstage after a restart still knows the device. Every step checks "already
done" first (the CO repeats calls), and a failed stage undoes what it did.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from csi_driver import errors, mount
from csi_driver.attach import LoopAttacher
from csi_driver.ownership import Ownership
from replication.pool.base import Pool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StagedVolume:
    volume_id: str
    staging_path: str
    access_type: str
    fs_type: str
    backing_file: str
    device: str
    epoch: int
    published: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class VolumeStats:
    total_bytes: int
    used_bytes: int
    available_bytes: int
    total_inodes: int
    used_inodes: int
    available_inodes: int
    is_block: bool
    abnormal: bool
    message: str


class StagedStates:
    """The per-volume JSON files under ``<state_dir>/staged``."""

    def __init__(self, state_dir: Path) -> None:
        self._dir = state_dir / "staged"
        self._dir.mkdir(parents=True, exist_ok=True)

    def load(self, volume_id: str) -> StagedVolume | None:
        path = self._dir / f"{volume_id}.json"
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        data["published"] = tuple(data.get("published", ()))
        return StagedVolume(**data)

    def save(self, staged: StagedVolume) -> None:
        path = self._dir / f"{staged.volume_id}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(staged)))
        os.replace(tmp, path)

    def remove(self, volume_id: str) -> None:
        (self._dir / f"{volume_id}.json").unlink(missing_ok=True)

    def all(self) -> list[StagedVolume]:
        return [s for p in sorted(self._dir.glob("*.json")) if (s := self.load(p.stem))]


class StagingService:
    def __init__(self, node_id: str, pool: Pool, ownership: Ownership, state_dir: Path) -> None:
        self._node_id = node_id
        self._pool = pool
        self._ownership = ownership
        self._states = StagedStates(state_dir)
        self._loop = LoopAttacher()

    def staged(self, volume_id: str) -> StagedVolume | None:
        return self._states.load(volume_id)

    def staged_count(self) -> int:
        return len(self._states.all())

    async def stage(
        self, volume_id: str, staging_path: str, access_type: str, fs_type: str,
        mount_flags: list[str],
    ) -> StagedVolume:
        existing = self._states.load(volume_id)
        if existing is not None:
            if existing.staging_path != staging_path or existing.access_type != access_type:
                raise errors.AlreadyExistsError(
                    f"volume {volume_id} is already staged at {existing.staging_path} "
                    f"as {existing.access_type}"
                )
            return existing
        record = await self._ownership.acquire(volume_id)
        try:
            return await self._attach_and_mount(
                volume_id, staging_path, access_type, fs_type or record.fs_type or "ext4",
                mount_flags, record.epoch,
            )
        except BaseException:
            await self._ownership.release(volume_id)
            raise

    async def _attach_and_mount(
        self, volume_id: str, staging_path: str, access_type: str, fs_type: str,
        mount_flags: list[str], epoch: int,
    ) -> StagedVolume:
        replica = await asyncio.to_thread(self._pool.get, volume_id)
        if replica is None:
            raise errors.FailedPreconditionError(
                f"node {self._node_id} holds no replica of {volume_id}; stage it on a replica "
                "node (its accessible topology)"
            )
        device = await self._loop.attach(replica.path)
        try:
            if access_type == "mount":
                await self._format_and_mount(device, staging_path, fs_type, mount_flags)
        except BaseException:
            await self._loop.detach(replica.path)
            raise
        staged = StagedVolume(
            volume_id=volume_id, staging_path=staging_path, access_type=access_type,
            fs_type=fs_type if access_type == "mount" else "", backing_file=replica.path,
            device=device, epoch=epoch,
        )
        self._states.save(staged)
        log.info("volume=%s node=%s epoch=%d staged device=%s", volume_id, self._node_id,
                 epoch, device)
        return staged

    async def _format_and_mount(
        self, device: str, staging_path: str, fs_type: str, mount_flags: list[str]
    ) -> None:
        found = await mount.filesystem_type(device)
        if found is None:
            await mount.make_filesystem(device, fs_type)
        elif found != fs_type:
            raise errors.FailedPreconditionError(
                f"the volume holds a {found} filesystem, not {fs_type}"
            )
        Path(staging_path).mkdir(parents=True, exist_ok=True)
        if not mount.mounts_at(staging_path):
            await mount.mount(device, staging_path, fs_type, mount_flags)

    async def unstage(self, volume_id: str, staging_path: str) -> None:
        staged = self._states.load(volume_id)
        if staged is not None and staged.published:
            for target in staged.published:
                await mount.unmount(target)
        await mount.unmount(staging_path)
        if staged is not None:
            if staged.access_type == "block":
                with contextlib.suppress(Exception):
                    await mount.flush_buffers(staged.device)
            await self._loop.detach(staged.backing_file)
            self._states.remove(volume_id)
        await self._ownership.release(volume_id)
        log.info("volume=%s node=%s unstaged", volume_id, self._node_id)

    def require_staged(self, volume_id: str, staging_path: str) -> StagedVolume:
        staged = self._states.load(volume_id)
        if staged is None or staged.staging_path != staging_path:
            raise errors.FailedPreconditionError(
                f"volume {volume_id} is not staged at {staging_path}"
            )
        return staged

    async def publish(
        self, volume_id: str, staging_path: str, target_path: str, access_type: str,
        readonly: bool, mount_flags: list[str],
    ) -> None:
        staged = self.require_staged(volume_id, staging_path)
        if staged.access_type != access_type:
            raise errors.FailedPreconditionError(
                f"volume {volume_id} is a {staged.access_type} volume"
            )
        source = staged.staging_path if access_type == "mount" else staged.device
        existing = mount.mounts_at(target_path)
        if existing:
            top = existing[-1]
            if self._same_source(top, staged) and ("ro" in top.options) == readonly:
                return
            raise errors.AlreadyExistsError(
                f"{target_path} is already mounted from another source or with other flags"
            )
        target = Path(target_path)
        if access_type == "mount":
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch(exist_ok=True)
        await mount.bind_mount(source, target_path, readonly, mount_flags)
        self._states.save(replace(staged, published=(*staged.published, target_path)))

    @staticmethod
    def _same_source(entry: mount.MountEntry, staged: StagedVolume) -> bool:
        try:
            return entry.major_minor == mount.device_numbers(staged.device) or (
                entry.source == staged.device
            )
        except OSError:
            return False

    async def unpublish(self, volume_id: str, target_path: str) -> None:
        await mount.unmount(target_path)
        target = Path(target_path)
        if target.is_dir():
            with contextlib.suppress(OSError):
                target.rmdir()
        elif target.exists():
            target.unlink()
        staged = self._states.load(volume_id)
        if staged is not None and target_path in staged.published:
            published = tuple(p for p in staged.published if p != target_path)
            self._states.save(replace(staged, published=published))

    async def stats(self, volume_id: str, volume_path: str) -> VolumeStats:
        staged = self._states.load(volume_id)
        if staged is None or not os.path.exists(volume_path):
            raise errors.NotFoundError(f"volume {volume_id} is not available at {volume_path}")
        if volume_path not in (staged.staging_path, *staged.published):
            raise errors.NotFoundError(f"{volume_path} is not a path of volume {volume_id}")
        device_ok = os.path.exists(staged.device)
        message = "healthy" if device_ok else f"block device {staged.device} is gone"
        if staged.access_type == "block" or os.path.isfile(volume_path):
            size = await mount.block_size_bytes(staged.device) if device_ok else 0
            return VolumeStats(size, 0, 0, 0, 0, 0, True, not device_ok, message)
        st = os.statvfs(volume_path)
        return VolumeStats(
            total_bytes=st.f_blocks * st.f_frsize,
            used_bytes=(st.f_blocks - st.f_bfree) * st.f_frsize,
            available_bytes=st.f_bavail * st.f_frsize,
            total_inodes=st.f_files,
            used_inodes=st.f_files - st.f_ffree,
            available_inodes=st.f_favail,
            is_block=False,
            abnormal=not device_ok,
            message=message,
        )

    async def expand(self, volume_id: str, volume_path: str) -> int:
        staged = self._states.load(volume_id)
        if staged is None:
            raise errors.NotFoundError(f"volume {volume_id} is not staged on {self._node_id}")
        if volume_path not in (staged.staging_path, *staged.published):
            raise errors.NotFoundError(f"{volume_path} is not a path of volume {volume_id}")
        await self._loop.refresh_size(staged.device)
        if staged.access_type == "mount":
            await mount.grow_filesystem(staged.device, staged.staging_path, staged.fs_type)
        return await mount.block_size_bytes(staged.device)
