"""The install script's package list names what the code runs (issue 10 #10)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIST = ROOT / "scripts" / "system-packages.txt"

# Which package brings each external command the code, tests and benches run.
TOOLS = {
    "etcd": "etcd-server", "lvcreate": "lvm2", "vgs": "lvm2", "lvs": "lvm2",
    "nbdfuse": "libnbd-bin", "nbdinfo": "libnbd-bin", "nbdcopy": "libnbd-bin",
    "qemu-nbd": "qemu-utils", "qemu-io": "qemu-utils", "fio": "fio", "nft": "nftables",
    "mkfs.xfs": "xfsprogs", "xfs_growfs": "xfsprogs", "mkfs.ext4": "e2fsprogs",
    "resize2fs": "e2fsprogs", "e2fsck": "e2fsprogs", "fusermount3": "fuse3", "ip": "iproute2",
    "losetup": "mount", "mount": "mount", "umount": "mount", "nsenter": "util-linux",
    "blkid": "util-linux",
}


def listed() -> set[str]:
    lines = (line.split("#", 1)[0].strip() for line in LIST.read_text().splitlines())
    return {line for line in lines if line}


def test_every_tool_has_its_package_listed() -> None:
    missing = {tool: pkg for tool, pkg in TOOLS.items() if pkg not in listed()}
    assert not missing


def test_packages_without_a_command_are_listed() -> None:
    # tests/integration/test_nbd_server_clients.py runs /usr/bin/python3 -c "import nbd":
    # a tool check could never notice it missing.
    assert "python3-libnbd" in listed()


def test_install_script_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "install-system-deps.sh")], check=True)
