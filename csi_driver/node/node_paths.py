"""What this node made on the host for each volume: mount points, files and directories.

The CSI spec lets a plugin remove only what *it* created (NodeUnpublishVolume: "the SP MUST
delete the file or directory it created"); a CO may well call unpublish or unstage with a
path that holds someone else's file or filesystem. So every directory, file and mount the
node makes is recorded per volume in ``<state_dir>/created/<volume>.json``, and ``release``
undoes only what is recorded there.

Record, then act: an entry is written (atomically, fsynced) *before* the mkdir, touch or mount
it describes, so a node killed half-way still knows after a restart what may be its own.
Releasing an entry whose action never happened is harmless (nothing mounted, nothing to
remove). This module does not decide whether a volume is staged or published (staging.py
does) and runs mount commands only through ``mount``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

from csi_driver.node import mount
from replication.atomic_file import write_atomic

log = logging.getLogger(__name__)

_FORMAT = 1


@dataclass(frozen=True)
class Made:
    """What the node made at one path for one volume."""

    mounted: bool = False  # the node mounted the volume here (or was about to)
    file: bool = False  # the path itself is a file the node created (a block publish target)
    dirs: tuple[str, ...] = ()  # directories the node created for the path, outermost first


def write_durably(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically and durably (file and rename fsynced)."""
    write_atomic(path, text.encode())


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def missing_dirs(path: Path) -> list[str]:
    """The directories ``mkdir -p path`` would create, outermost first."""
    missing: list[str] = []
    while not os.path.lexists(path) and path != path.parent:
        missing.append(str(path))
        path = path.parent
    return missing[::-1]


class CreatedPaths:
    """The per-volume records under ``<state_dir>/created``, and the acts they describe."""

    def __init__(self, state_dir: Path, node_id: str) -> None:
        self._dir = state_dir / "created"
        self._dir.mkdir(parents=True, exist_ok=True)
        self._node_id = node_id

    def _file(self, volume_id: str) -> Path:
        return self._dir / f"{volume_id}.json"

    def of(self, volume_id: str) -> dict[str, Made]:
        path = self._file(volume_id)
        if not path.exists():
            return {}
        data = json.loads(path.read_text())
        return {
            p: Made(bool(m["mounted"]), bool(m["file"]), tuple(m["dirs"]))
            for p, m in data["paths"].items()
        }

    def _save(self, volume_id: str, made: dict[str, Made]) -> None:
        if not made:
            self._file(volume_id).unlink(missing_ok=True)
            _fsync_dir(self._dir)
            return
        paths = {p: {"mounted": m.mounted, "file": m.file, "dirs": list(m.dirs)}
                 for p, m in made.items()}
        write_durably(self._file(volume_id), json.dumps({"format": _FORMAT, "paths": paths}))

    def _add(self, volume_id: str, path: str, mounted: bool = False, file: bool = False,
             dirs: list[str] | None = None) -> None:
        made = self.of(volume_id)
        old = made.get(path, Made())
        new_dirs = tuple(d for d in dirs or () if d not in old.dirs)
        new = replace(old, mounted=old.mounted or mounted, file=old.file or file,
                      dirs=old.dirs + new_dirs)
        if new != old:
            made[path] = new
            self._save(volume_id, made)

    def made_mount(self, volume_id: str, path: str) -> bool:
        found = self.of(volume_id).get(path)
        return found is not None and found.mounted

    def make_dir(self, volume_id: str, path: str) -> None:
        """``mkdir -p path``, recording the directories it makes."""
        missing = missing_dirs(Path(path))
        self._add(volume_id, path, dirs=missing)
        for directory in missing:
            with contextlib.suppress(FileExistsError):
                os.mkdir(directory)

    def make_file(self, volume_id: str, path: str) -> None:
        """Create the empty file ``path`` (and its missing parents), recording what it makes."""
        missing = missing_dirs(Path(path).parent)
        new_file = not os.path.lexists(path)
        self._add(volume_id, path, file=new_file, dirs=missing)
        for directory in missing:
            with contextlib.suppress(FileExistsError):
                os.mkdir(directory)
        if new_file:
            Path(path).touch(exist_ok=True)

    def will_mount(self, volume_id: str, path: str) -> None:
        """Record a mount of the volume at ``path``; call before mounting."""
        self._add(volume_id, path, mounted=True)

    async def release(self, volume_id: str, path: str, *, mounted: bool = False) -> None:
        """Undo what the record says the node made at ``path`` for the volume: unmount,
        remove the file, remove the directories it made (when empty), forget the entry.
        ``mounted``: another record (the staged state) says the node mounted it there.
        A path the node never recorded is left exactly as it is."""
        made = self.of(volume_id)
        entry = made.get(path, Made())
        if entry.mounted or mounted:
            await mount.unmount(path)
        if entry.file:
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                os.unlink(path)
        for directory in reversed(entry.dirs):
            # Not empty (someone put something there) or gone: it is not ours to delete then.
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        if path in made:
            del made[path]
            self._save(volume_id, made)
            log.info("volume=%s node=%s released path=%s", volume_id, self._node_id, path)
