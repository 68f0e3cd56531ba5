"""Where a volume's dirty bitmaps outlive the target: one file per replica in the state dir.

A replica outside the ISR is rebuilt from its bitmap when it returns, so a file must never
say less than the replica missed. Whatever cannot be read back, or written, becomes "missed
everything" (no file): a full rebuild is slow but always safe, a stale file is not.

Must not: decide which replicas need a bitmap (replica_modes.py knows the modes).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from replication.bitmap import DirtyBitmap

log = logging.getLogger(__name__)


class BitmapStore:
    def __init__(self, state_dir: Path, volume_id: str, size: int, ctx: str) -> None:
        self._state_dir = state_dir
        self._volume_id = volume_id
        self._size = size
        self._ctx = ctx

    def path(self, node: str) -> Path:
        return self._state_dir / f"{self._volume_id}.{node}.bitmap"

    def load(self, node: str) -> DirtyBitmap:
        path = self.path(node)
        try:
            bitmap = DirtyBitmap.load(path)
            if bitmap.size == self._size:
                return bitmap
        except (OSError, ValueError):
            pass
        # No usable record of what it missed: everything may differ.
        bitmap = DirtyBitmap(self._size)
        bitmap.mark_all()
        return bitmap

    def save(self, bitmaps: Iterable[tuple[str, DirtyBitmap]]) -> None:
        """Persist each replica's bitmap. One that cannot be written (say ENOSPC on the
        state dir) is removed instead: no file means "rebuild everything"."""
        try:
            self._state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.warning("%s bitmaps not saved: %s", self._ctx, exc)
        for node, bitmap in bitmaps:
            path = self.path(node)
            try:
                bitmap.save(path)
            except OSError as exc:
                log.warning("%s replica=%s bitmap not saved (%s): it will be rebuilt in full",
                            self._ctx, node, exc)
                path.unlink(missing_ok=True)  # no space needed; if this fails, an ISR drop fences

    def discard(self, node: str) -> None:
        """The replica lacks nothing any more."""
        self.path(node).unlink(missing_ok=True)
