"""Attachers turn a volume's data into a local block device.

``LoopAttacher`` attaches a file (a local replica in the file pool, or later an NBD export
exposed through FUSE) with ``losetup --direct-io=on``: direct I/O avoids a second page cache
above the backing file and triples IOPS here. Attaching is idempotent: an existing loop
device over the same file is reused.
"""

from __future__ import annotations

import json

from replication.command import run_async


def find_loop_device(losetup_json: str, backing_file: str) -> str | None:
    """The loop device over ``backing_file`` in ``losetup -l -J`` output, if any."""
    if not losetup_json.strip():
        return None
    for device in json.loads(losetup_json).get("loopdevices", []):
        if device.get("back-file") == backing_file:
            return str(device["name"])
    return None


class LoopAttacher:
    async def find(self, backing_file: str) -> str | None:
        # `losetup -j` ignores --json, so list everything as JSON and match the file.
        result = await run_async(["losetup", "-l", "-J", "-O", "NAME,BACK-FILE"], timeout=30)
        return find_loop_device(result.stdout, backing_file)

    async def attach(self, backing_file: str) -> str:
        existing = await self.find(backing_file)
        if existing:
            return existing
        result = await run_async(
            ["losetup", "--find", "--show", "--direct-io=on", backing_file], timeout=30
        )
        return result.stdout.strip()

    async def refresh_size(self, device: str) -> None:
        await run_async(["losetup", "--set-capacity", device], timeout=30)

    async def detach(self, backing_file: str) -> None:
        device = await self.find(backing_file)
        if device:
            await run_async(["losetup", "-d", device], timeout=30)
