"""Per-replica metadata: the durable fence, the generation and the dirty/settled state.

Owns: ``ReplicaMeta`` (the persisted record), ``MetaStore`` (one small JSON file per replica,
``<meta_dir>/<volume_id>.json``, replaced atomically) and ``MetaState`` (the live copy a
replica server keeps for an open replica, with the rules for when it must reach the disk).
Must not: do replica I/O, talk to the network or etcd, or import csi_driver, grpc or etcd.

Durability rules (the reasons are the invariants in the architecture, section 4):

- a raised fence is on disk before ``fence`` returns, so the FENCE reply is only sent once a
  restart can no longer forget it: lower epochs stay refused forever (I2);
- "dirty" (writes since the owner last settled) is on disk before the first write after the
  disk copy said clean is applied, so a crash never hides a region that may differ (I4);
- "clean" and the settled sequence number may reach the disk late (``persist_if_changed``,
  called about once a second and at FLUSH): losing them only costs a needless resync.

One process owns a meta directory (the replica server); ``MetaStore`` removes temp files a
crash left there when it starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, cast

from replication.errors import ReplicaMetaError
from replication.pool.base import check_volume_id

FORMAT_VERSION = 1
_SUFFIX = ".json"
_TEMP_PREFIX = ".tmp-"  # valid volume ids start with an alphanumeric: never a replica's name
_MAX_FILE = 64 * 1024


@dataclass(frozen=True, slots=True)
class ReplicaMeta:
    """What a replica remembers across restarts."""

    volume_id: str
    fenced_epoch: int = 0  # the highest epoch a FENCE raised this replica to
    generation: int = 0  # +1 each time the fence rose: tells one ownership from the next
    dirty: bool = False  # writes since the owner last settled (may differ from peers)
    settled_seq: int = 0  # the last sequence number the owner declared on every ISR replica


class MetaStore:
    """The JSON files of one meta directory; every method is a few small syscalls."""

    def __init__(self, meta_dir: str | os.PathLike[str]) -> None:
        self._dir = Path(meta_dir)
        self._dir.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temps()

    @property
    def directory(self) -> Path:
        return self._dir

    def load(self, volume_id: str) -> ReplicaMeta:
        """The stored metadata, or the defaults (never fenced, clean) when there is none.

        Raises ReplicaMetaError for an unreadable file: defaulting would forget the fence.
        """
        check_volume_id(volume_id)
        try:
            with open(self._path(volume_id), "rb") as f:
                raw = f.read(_MAX_FILE + 1)
        except FileNotFoundError:
            return ReplicaMeta(volume_id)
        except OSError as exc:
            raise ReplicaMetaError(f"cannot read metadata of {volume_id}: {exc}") from exc
        return _decode(volume_id, raw)

    def save(self, meta: ReplicaMeta) -> None:
        """Replace the file atomically and durably: temp file, fsync, rename, dir fsync."""
        check_volume_id(meta.volume_id)
        body = json.dumps({"format": FORMAT_VERSION, **asdict(meta)}, sort_keys=True).encode()
        temp = self._dir / f"{_TEMP_PREFIX}{meta.volume_id}.{secrets.token_hex(4)}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                view = memoryview(body)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, self._path(meta.volume_id))
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        _fsync_dir(self._dir)

    def delete(self, volume_id: str) -> None:
        """Forget a replica's metadata (its fence too); a missing file is a success."""
        check_volume_id(volume_id)
        try:
            self._path(volume_id).unlink()
        except FileNotFoundError:
            return
        _fsync_dir(self._dir)

    def _path(self, volume_id: str) -> Path:
        return self._dir / f"{volume_id}{_SUFFIX}"

    def _remove_stale_temps(self) -> None:
        for entry in os.scandir(self._dir):
            if entry.name.startswith(_TEMP_PREFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


def _decode(volume_id: str, raw: bytes) -> ReplicaMeta:
    try:
        if len(raw) > _MAX_FILE:
            raise ValueError("file too large")
        doc: Any = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_VERSION:
            raise ValueError("unknown format")
        if doc.get("volume_id") != volume_id:
            raise ValueError(f"file names volume {doc.get('volume_id')!r}")
        counters = [doc.get(k) for k in ("fenced_epoch", "generation", "settled_seq")]
        if not all(type(v) is int and v >= 0 for v in counters):
            raise ValueError("counters must be non-negative integers")
        if type(doc.get("dirty")) is not bool:
            raise ValueError("dirty must be a boolean")
    except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError included
        raise ReplicaMetaError(f"metadata of {volume_id} is invalid: {exc}") from exc
    epoch, generation, settled = cast(list[int], counters)
    return ReplicaMeta(volume_id, epoch, generation, doc["dirty"], settled)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class MetaState:
    """The live metadata of one open replica: the in-memory truth and the copy on disk.

    Not thread-safe: the replica server calls it from its event loop only. Every save is
    synchronous (a ~1 ms fsync) and rare: a fence raise, the first write after a clean
    state reached the disk, and at most one lazy save per ``persist_if_changed`` call.
    """

    __slots__ = (
        "_saved",
        "_store",
        "dirty",
        "fenced_epoch",
        "generation",
        "settled_seq",
        "volume_id",
        "write_ready",
    )

    def __init__(self, store: MetaStore, volume_id: str) -> None:
        self._store = store
        self._saved = saved = store.load(volume_id)
        self.volume_id = volume_id
        self.fenced_epoch = saved.fenced_epoch
        self.generation = saved.generation
        self.dirty = saved.dirty
        self.settled_seq = saved.settled_seq
        # True when "dirty" is set here and on disk: the per-write check is this one flag.
        self.write_ready = saved.dirty

    @property
    def saved(self) -> ReplicaMeta:
        """What is on disk now (as far as this process wrote it)."""
        return self._saved

    def snapshot(self) -> ReplicaMeta:
        return ReplicaMeta(
            self.volume_id, self.fenced_epoch, self.generation, self.dirty, self.settled_seq
        )

    def fence(self, epoch: int) -> bool:
        """Raise the fence to ``epoch`` durably; False (and no change) if it is lower."""
        if epoch < self.fenced_epoch:
            return False
        if epoch > self.fenced_epoch:
            raised = replace(self.snapshot(), fenced_epoch=epoch, generation=self.generation + 1)
            self._save(raised)  # disk first: if the save fails, memory still has the old fence
            self.fenced_epoch = epoch
            self.generation += 1
        return True

    def mark_dirty(self) -> None:
        """Call before applying a write when ``write_ready`` is False."""
        if not self._saved.dirty:
            self._save(replace(self.snapshot(), dirty=True))
        self.dirty = True
        self.write_ready = True

    def settle(self, seq: int) -> None:
        """The owner declares every write it sent before this on every ISR replica: clean.

        In memory only; ``persist_if_changed`` writes it later."""
        self.settled_seq = seq
        self.dirty = False
        self.write_ready = False

    def persist_if_changed(self) -> bool:
        """Save the live state if it differs from the disk copy; True if it saved."""
        current = self.snapshot()
        if current == self._saved:
            return False
        self._save(current)
        return True

    def _save(self, meta: ReplicaMeta) -> None:
        self._store.save(meta)
        self._saved = meta
