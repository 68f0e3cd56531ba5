"""mountinfo parsing (pure) drives every "already mounted?" idempotency check."""

from __future__ import annotations

from csi_driver.node.mount import parse_mountinfo

SAMPLE = (
    "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
    "40 22 7:3 / /var/lib/kubelet/staging/vol\\0401 rw,relatime shared:9 - ext4 /dev/loop3 rw\n"
    "41 22 7:3 / /pods/target ro,relatime shared:9 - ext4 /dev/loop3 rw\n"
    "42 22 0:5 /loop4 /pods/block rw,nosuid shared:2 - devtmpfs udev rw,size=1k\n"
    "garbage line without separator\n"
)


def test_parse_mountinfo() -> None:
    entries = parse_mountinfo(SAMPLE)
    assert len(entries) == 4
    staging = entries[1]
    assert staging.mount_point == "/var/lib/kubelet/staging/vol 1"
    assert staging.source == "/dev/loop3"
    assert staging.major_minor == "7:3"
    assert "ro" in entries[2].options
    assert entries[3].root == "/loop4" and entries[3].fs_type == "devtmpfs"
