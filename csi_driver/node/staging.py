"""Node-side volume lifecycle: stage (own + target + attach + mkfs + mount), publish, back.

Stage = take ownership (epoch CAS) -> start the volume's target process (fences the
replicas, serves NBD) -> attach the export as a block device -> mkfs when blank -> mount.
Any node can stage any volume: a node without a local replica reads remotely.

What is staged on this node is persisted as one small JSON file per volume under the node's
state directory, so unstage after a restart still knows the device; what the node made on the
host (mounts, files, directories) is recorded by ``node_paths``, and unpublish / unstage undo
only that, never a path the CO handed over with someone else's file or filesystem in it.
Every step checks "already done" first (the CO repeats calls), and a failed stage undoes what
it did.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from csi_driver import errors
from csi_driver.node import mount
from csi_driver.node.attach import Attachment, NbdAttacher
from csi_driver.node.loop import LoopAttacher
from csi_driver.node.node_paths import CreatedPaths, write_durably
from csi_driver.node.ownership import Ownership
from csi_driver.node.targets import TargetProcesses
from replication.command import CommandError
from replication.errors import ReplicationError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StagedVolume:
    volume_id: str
    staging_path: str
    access_type: str
    fs_type: str
    device: str
    epoch: int
    attachment: dict[str, object] = field(default_factory=dict)
    published: tuple[str, ...] = field(default=())
    # Read-only block publishes get a read-only loop device of their own: a read-only bind
    # mount of a device node does not stop writes to the device.
    read_only_devices: dict[str, str] = field(default_factory=dict)


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
        data.setdefault("read_only_devices", {})
        return StagedVolume(**data)

    def save(self, staged: StagedVolume) -> None:
        write_durably(self._dir / f"{staged.volume_id}.json", json.dumps(asdict(staged)))

    def remove(self, volume_id: str) -> None:
        (self._dir / f"{volume_id}.json").unlink(missing_ok=True)

    def all(self) -> list[StagedVolume]:
        return [s for p in sorted(self._dir.glob("*.json")) if (s := self.load(p.stem))]


class StagingService:
    def __init__(
        self, node_id: str, ownership: Ownership, targets: TargetProcesses,
        attacher: NbdAttacher, state_dir: Path,
    ) -> None:
        self._node_id = node_id
        self._ownership = ownership
        self._targets = targets
        self._attacher = attacher
        self._states = StagedStates(state_dir)
        self._paths = CreatedPaths(state_dir, node_id)
        self._work_dir = state_dir / "attach"
        self._ro_loops = LoopAttacher()

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
            if (
                existing.staging_path != staging_path
                or existing.access_type != access_type
                or (fs_type and access_type == "mount" and existing.fs_type != fs_type)
            ):
                raise errors.AlreadyExistsError(
                    f"volume {volume_id} is already staged at {existing.staging_path} "
                    f"as {existing.access_type} {existing.fs_type}".rstrip()
                )
            if self._targets.running(volume_id):
                return existing
            # Left over from before a restart: its target is gone, so stage afresh.
            await self._teardown(existing)
        if access_type == "mount":
            await self._refuse_foreign_mount(volume_id, staging_path)
        record = await self._ownership.acquire(volume_id)
        try:
            if record.access_type != access_type:
                # Never mkfs over a raw block volume (or hand out a filesystem as raw blocks).
                raise errors.FailedPreconditionError(
                    f"volume {volume_id} is a {record.access_type} volume, not {access_type}"
                )
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
        lease = self._ownership.lease(volume_id)
        if lease is None:  # acquire() just set it; a concurrent release would be a bug
            raise errors.OperationPendingError(f"volume {volume_id}: ownership lost while staging")
        socket = await self._targets.start(volume_id, lease)
        try:
            attachment = await self._attacher.attach(str(socket), volume_id, self._work_dir)
        except BaseException:
            await self._targets.stop(volume_id)
            raise
        try:
            if access_type == "mount":
                await self._format_and_mount(volume_id, attachment.device, staging_path,
                                             fs_type, mount_flags)
        except BaseException:
            await self._paths.release(volume_id, staging_path)
            await self._attacher.detach(attachment)
            await self._targets.stop(volume_id)
            raise
        staged = StagedVolume(
            volume_id=volume_id, staging_path=staging_path, access_type=access_type,
            fs_type=fs_type if access_type == "mount" else "", device=attachment.device,
            epoch=epoch, attachment=attachment_to_dict(attachment),
        )
        self._states.save(staged)
        log.info("volume=%s node=%s epoch=%d staged device=%s", volume_id, self._node_id,
                 epoch, attachment.device)
        return staged

    async def _refuse_foreign_mount(self, volume_id: str, staging_path: str) -> None:
        """Staging onto another filesystem would hand the pod that filesystem, not the volume.
        A mount the node recorded there for this volume without a staged state (a stage
        killed half-way) is its own leftover: undone, not refused."""
        if mount.mounts_at(staging_path) and self._paths.made_mount(volume_id, staging_path):
            await self._paths.release(volume_id, staging_path)
        present = mount.mounts_at(staging_path)
        if present:
            raise _foreign_mount(volume_id, staging_path, present[-1])

    async def _format_and_mount(
        self, volume_id: str, device: str, staging_path: str, fs_type: str,
        mount_flags: list[str],
    ) -> None:
        present = mount.mounts_at(staging_path)
        if present:  # checked before mkfs too: something may have been mounted meanwhile
            if self._is_device(present[-1], device, staging_path):
                return
            raise _foreign_mount(volume_id, staging_path, present[-1])
        found = await mount.filesystem_type(device)
        if found is None:
            await mount.make_filesystem(device, fs_type)
        elif found != fs_type:
            raise errors.FailedPreconditionError(
                f"the volume holds a {found} filesystem, not {fs_type}"
            )
        elif found == "ext4":  # expanded while unstaged (OFFLINE expansion): grow it now
            try:
                grown = await mount.grow_ext4_to_device(device)
            except CommandError as exc:
                raise errors.FailedPreconditionError(
                    f"growing the ext4 filesystem of {volume_id} failed: {exc}") from exc
            if grown:
                log.info("volume=%s node=%s ext4 grown from %d to %d bytes before mounting",
                         volume_id, self._node_id, *grown)
        self._paths.make_dir(volume_id, staging_path)
        self._paths.will_mount(volume_id, staging_path)
        await mount.mount(device, staging_path, fs_type, mount_flags)

    async def unstage(self, volume_id: str, staging_path: str) -> None:
        staged = self._states.load(volume_id)
        if staged is not None:
            await self._teardown(staged)
        await self._paths.release(volume_id, staging_path)
        await self._ownership.release(volume_id)
        log.info("volume=%s node=%s unstaged", volume_id, self._node_id)

    async def _teardown(self, staged: StagedVolume) -> None:
        """Unmount, detach (flushes), stop the target (flushes replicas), forget."""
        for target in staged.published:
            await self._paths.release(staged.volume_id, target, mounted=True)
        for device in staged.read_only_devices.values():
            await self._ro_loops.detach_device(device)
        await self._paths.release(staged.volume_id, staged.staging_path,
                                  mounted=staged.access_type == "mount")
        if staged.attachment:
            attachment = attachment_from_dict(staged.attachment)
            try:
                await self._attacher.detach(attachment)
            except (errors.TandemError, ReplicationError) as exc:
                # The detach flush failed through the target: it is fenced (another node took
                # over) or lost every replica, so nothing can be made durable any more. Stop
                # it, and the attacher then detaches without a server.
                log.warning("volume=%s node=%s detach flush failed (%s); stopping the target "
                            "first", staged.volume_id, self._node_id, exc)
                await self._targets.stop(staged.volume_id)
                await self._attacher.detach(attachment)
        await self._targets.stop(staged.volume_id)
        self._states.remove(staged.volume_id)

    async def require_staged(self, volume_id: str, staging_path: str) -> StagedVolume:
        staged = self._states.load(volume_id)
        if staged is None or staged.staging_path != staging_path:
            if not await self._ownership.exists(volume_id):
                raise errors.NotFoundError(f"volume {volume_id} does not exist")
            raise errors.FailedPreconditionError(
                f"volume {volume_id} is not staged at {staging_path}"
            )
        return staged

    async def publish(
        self, volume_id: str, staging_path: str, target_path: str, access_type: str,
        readonly: bool, mount_flags: list[str], single_writer: bool = False,
    ) -> None:
        staged = await self.require_staged(volume_id, staging_path)
        if staged.access_type != access_type:
            raise errors.FailedPreconditionError(
                f"volume {volume_id} is a {staged.access_type} volume"
            )
        source = staged.staging_path if access_type == "mount" else staged.device
        others = [p for p in staged.published if p != target_path]
        if single_writer and others:
            raise errors.FailedPreconditionError(
                f"volume {volume_id} is SINGLE_NODE_SINGLE_WRITER and already published at "
                f"{others[0]}"
            )
        existing = mount.mounts_at(target_path)
        if existing:
            top = existing[-1]
            ro_device = staged.read_only_devices.get(target_path)
            if ro_device is not None and readonly and self._is_device(top, ro_device, target_path):
                return
            if (self._is_device(top, staged.device, target_path)
                    and ("ro" in top.options) == readonly):
                return
            raise errors.AlreadyExistsError(
                f"{target_path} is already mounted from another source or with other flags"
            )
        if access_type == "mount":
            self._paths.make_dir(volume_id, target_path)
        else:
            self._paths.make_file(volume_id, target_path)
        ro_devices = dict(staged.read_only_devices)
        try:
            if access_type == "block" and readonly:
                source = ro_devices[target_path] = await self._ro_loops.attach_read_only(source)
            self._paths.will_mount(volume_id, target_path)
            await mount.bind_mount(source, target_path, readonly, mount_flags)
        except BaseException:
            await self._paths.release(volume_id, target_path)
            if target_path in ro_devices:
                await self._ro_loops.detach_device(ro_devices[target_path])
            raise
        published = (*(p for p in staged.published if p != target_path), target_path)
        self._states.save(replace(staged, published=published, read_only_devices=ro_devices))

    @staticmethod
    def _is_device(entry: mount.MountEntry, device: str, target_path: str) -> bool:
        """Whether the mount at ``target_path`` shows ``device``: a filesystem on it, or (a
        raw block publish) the device node itself, which mountinfo lists as devtmpfs."""
        try:
            if entry.major_minor == mount.device_numbers(device) or entry.source == device:
                return True
            target = os.stat(target_path)
            return stat.S_ISBLK(target.st_mode) and target.st_rdev == os.stat(device).st_rdev
        except OSError:
            return False

    async def unpublish(self, volume_id: str, target_path: str) -> None:
        staged = self._states.load(volume_id)
        ours = staged is not None and target_path in staged.published
        await self._paths.release(volume_id, target_path, mounted=ours)
        if staged is not None and ours:
            ro_devices = dict(staged.read_only_devices)
            if target_path in ro_devices:
                await self._ro_loops.detach_device(ro_devices.pop(target_path))
            published = tuple(p for p in staged.published if p != target_path)
            self._states.save(replace(staged, published=published, read_only_devices=ro_devices))

    async def stats(self, volume_id: str, volume_path: str) -> VolumeStats:
        staged = self._states.load(volume_id)
        if staged is None or not os.path.exists(volume_path):
            raise errors.NotFoundError(f"volume {volume_id} is not available at {volume_path}")
        if volume_path not in (staged.staging_path, *staged.published):
            raise errors.NotFoundError(f"{volume_path} is not a path of volume {volume_id}")
        device_ok = os.path.exists(staged.device)
        abnormal, message = self._targets.condition(volume_id)
        if not device_ok:
            abnormal, message = True, f"block device {staged.device} is gone"
        if staged.access_type == "block" or os.path.isfile(volume_path):
            size = await mount.block_size_bytes(staged.device) if device_ok else 0
            return VolumeStats(size, 0, 0, 0, 0, 0, True, abnormal, message)
        st = os.statvfs(volume_path)
        return VolumeStats(
            total_bytes=st.f_blocks * st.f_frsize,
            used_bytes=(st.f_blocks - st.f_bfree) * st.f_frsize,
            available_bytes=st.f_bavail * st.f_frsize,
            total_inodes=st.f_files,
            used_inodes=st.f_files - st.f_ffree,
            available_inodes=st.f_favail,
            is_block=False,
            abnormal=abnormal,
            message=message,
        )

    async def expand(self, volume_id: str, volume_path: str, limit_bytes: int = 0) -> int:
        """Grow the filesystem to the device (offline expansion: the device was attached
        after the controller grew the replicas)."""
        staged = self._states.load(volume_id)
        if staged is None:
            raise errors.NotFoundError(f"volume {volume_id} is not staged on {self._node_id}")
        if volume_path not in (staged.staging_path, *staged.published):
            raise errors.NotFoundError(f"{volume_path} is not a path of volume {volume_id}")
        size = await mount.block_size_bytes(staged.device)
        if limit_bytes and size > limit_bytes:
            raise errors.OutOfRangeError(f"volume is {size} bytes, above limit_bytes {limit_bytes}")
        if staged.access_type == "mount" and not await mount.filesystem_fills(
                staged.device, staged.fs_type, size):
            try:
                await mount.grow_filesystem(staged.device, staged.staging_path, staged.fs_type)
            except CommandError as exc:  # an expected failure: one clear line, no traceback
                raise errors.FailedPreconditionError(
                    f"growing the mounted {staged.fs_type} filesystem of {volume_id} failed "
                    f"({exc}); it grows at its next stage") from exc
        return await mount.block_size_bytes(staged.device)



def _foreign_mount(
    volume_id: str, staging_path: str, entry: mount.MountEntry
) -> errors.FailedPreconditionError:
    return errors.FailedPreconditionError(
        f"{staging_path} already holds a {entry.fs_type} filesystem from {entry.source} that "
        f"is not volume {volume_id}'s: refusing to stage over it"
    )


def attachment_to_dict(attachment: Attachment) -> dict[str, object]:
    return dict(asdict(attachment))


def attachment_from_dict(data: dict[str, object]) -> Attachment:
    return Attachment(**data)  # type: ignore[arg-type]
