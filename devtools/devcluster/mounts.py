"""Dev-cluster storage cleanup: mounts and loop devices left under a cluster directory.

Owns finding and removing what killed nodes leave behind: mounts below DIR (FUSE exports,
staged filesystems), mounts of loop devices whose backing file is below DIR, and those
loop devices themselves (``losetup -J -l``). Plain unmount first, lazy unmount only as a
last resort. It must not touch processes or networking, nor anything outside DIR except
mounts of DIR's own loop devices.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from devtools.devcluster.netns import CommandError, run

_ROUNDS = 3


@dataclass(frozen=True)
class Mount:
    target: str
    source: str


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and len(field) - i >= 4:
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts() -> list[Mount]:
    result = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        target = _unescape(left.split()[4])
        source = _unescape(right.split()[1]) if right else ""
        result.append(Mount(target=target, source=source))
    return result


def _below(path: str, directory: Path) -> bool:
    return path.startswith(str(directory).rstrip("/") + "/")


def loop_backing_files() -> dict[str, str]:
    """Every loop device and its backing file as losetup shows it."""
    out = run(["losetup", "-J", "-l"]).strip()
    if not out:
        return {}
    return {str(dev["name"]): str(dev.get("back-file") or "")
            for dev in json.loads(out).get("loopdevices", [])}


def loop_devices(directory: Path) -> list[str]:
    """Loop devices whose backing file lives below directory, and those a node of it
    recorded in an attach state whose FUSE file is gone (losetup shows it as "/nbd")."""
    recorded = _recorded_loops(directory)
    devices = []
    for name, back in loop_backing_files().items():
        backing = back.removesuffix(" (deleted)")
        if _below(backing, directory) or (name in recorded and backing == "/nbd"):
            devices.append(name)
    return devices


def _recorded_loops(directory: Path) -> set[str]:
    found = set()
    for state in directory.glob("state/*/attach/*/attach.json"):
        try:
            device = json.loads(state.read_text()).get("device")
        except (OSError, ValueError):
            continue
        if isinstance(device, str) and device.startswith("/dev/loop"):
            found.add(device)
    return found


def _targets(directory: Path, loops: list[str]) -> list[str]:
    found = {m.target for m in mounts() if _below(m.target, directory) or m.source in loops}
    # Deepest first, so a mount on top of another comes off before the one beneath it.
    return sorted(found, key=lambda t: t.count("/"), reverse=True)


def _attempt(argv: list[str]) -> str | None:
    try:
        run(argv, timeout=60.0)
    except CommandError as e:
        return str(e)
    return None


def cleanup_storage(directory: Path) -> list[str]:
    """Unmount and detach everything of DIR's; return what could not be removed."""
    directory = directory.resolve()
    for _ in range(_ROUNDS):
        loops = loop_devices(directory)
        targets = _targets(directory, loops)
        if not loops and not targets:
            return []
        for target in targets:
            _attempt(["umount", target])
        for dev in loop_devices(directory):
            _attempt(["losetup", "-d", dev])
    errors = []
    for target in _targets(directory, loop_devices(directory)):
        err = _attempt(["umount", "-l", target])
        if err:
            errors.append(err)
    for dev in loop_devices(directory):
        err = _attempt(["losetup", "-d", dev])
        if err:
            errors.append(err)
    leftovers = loop_devices(directory) + _targets(directory, [])
    errors.extend(f"still present after cleanup: {item}" for item in leftovers)
    return errors
