"""The attachers' pure parts: argv building, state files, /proc and losetup parsing.

Also the paths that decide without running anything: an invalid volume id, no state file,
no free nbd device, detaching what is already detached (a real directory stands in for
/sys/block: the kernel attacher reads only that).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict
from pathlib import Path

import pytest

from csi_driver import errors
from csi_driver.node.attach import (
    KIND_FUSE_LOOP,
    KIND_KERNEL_NBD,
    STATE_FILE_NAME,
    AttachError,
    Attachment,
    FuseLoopAttacher,
    KernelNbdAttacher,
    choose_attacher,
    first_free_nbd,
    load_attachment,
    nbd_client_argv,
    nbd_client_disconnect_argv,
    nbdfuse_argv,
    save_attachment,
)
from csi_driver.node.loop import find_loop_device
from replication.proc_identity import parse_proc_stat

LOSETUP_JSON = """{
   "loopdevices": [
      {
         "name": "/dev/loop0",
         "back-file": "/var/lib/tandem/pool/vol-a"
      },{
         "name": "/dev/loop7",
         "back-file": "/var/lib/tandem/attach/vol b/fuse/nbd"
      }
   ]
}
"""


def test_find_loop_device_matches_the_backing_file_exactly() -> None:
    assert find_loop_device(LOSETUP_JSON, "/var/lib/tandem/pool/vol-a") == "/dev/loop0"
    assert find_loop_device(LOSETUP_JSON, "/var/lib/tandem/attach/vol b/fuse/nbd") == "/dev/loop7"
    assert find_loop_device(LOSETUP_JSON, "/var/lib/tandem/pool/vol") is None


def test_find_loop_device_with_no_loop_devices() -> None:
    assert find_loop_device("", "/x") is None
    assert find_loop_device('{"loopdevices": []}', "/x") is None


def test_nbdfuse_argv() -> None:
    argv = nbdfuse_argv(Path("/w/v1/fuse/nbd"), "/run/t/v1.sock", Path("/w/v1/nbdfuse.pid"), 1)
    assert argv == [
        "nbdfuse", "-C", "1", "-P", "/w/v1/nbdfuse.pid", "/w/v1/fuse/nbd",
        "--unix", "/run/t/v1.sock",
    ]


def test_nbdfuse_argv_keeps_odd_socket_paths_as_one_argument() -> None:
    argv = nbdfuse_argv(Path("/w/f/nbd"), "/run/a b&c?.sock", Path("/w/p"), 4)
    assert argv[-2:] == ["--unix", "/run/a b&c?.sock"] and argv[1:3] == ["-C", "4"]


def test_nbd_client_argv_defaults() -> None:
    assert nbd_client_argv("/run/t.sock", "/dev/nbd3") == [
        "nbd-client", "-unix", "/run/t.sock", "/dev/nbd3", "-b", "4096", "-N", "",
    ]


def test_nbd_client_argv_options() -> None:
    argv = nbd_client_argv("/s", "/dev/nbd0", block_size=512, connections=4, timeout=30)
    assert argv == [
        "nbd-client", "-unix", "/s", "/dev/nbd0", "-b", "512", "-N", "", "-C", "4", "-t", "30",
    ]
    assert nbd_client_disconnect_argv("/dev/nbd0") == ["nbd-client", "-d", "/dev/nbd0"]


@pytest.mark.parametrize(
    ("connected", "expected"),
    [
        ({}, None),
        ({"nbd0": True, "nbd1": True}, None),
        ({"nbd0": True, "nbd1": False, "nbd2": False}, "/dev/nbd1"),
        ({"nbd10": False, "nbd2": False, "nbd1": True}, "/dev/nbd2"),  # numeric, not text
        ({"nbdX": False, "nbd": False, "loop0": False, "nbd5": False}, "/dev/nbd5"),
    ],
)
def test_first_free_nbd(connected: dict[str, bool], expected: str | None) -> None:
    assert first_free_nbd(connected) == expected


def test_parse_proc_stat_survives_odd_process_names() -> None:
    tail = " 0 -1 4194304 125 0 0 0 0 0 0 0 20 0 1 0 294491 3133440 384 184467"
    assert parse_proc_stat("28344 (cat) R 28341 28341 28261" + tail) == ("R", 294491)
    assert parse_proc_stat("7 (a) b) (c) S 1 7 7" + tail) == ("S", 294491)


def test_parse_proc_stat_of_this_process() -> None:
    state, start = parse_proc_stat(Path("/proc/self/stat").read_text())
    assert state == "R" and start > 0


def _attachment(tmp_path: Path) -> Attachment:
    return Attachment(
        device="/dev/loop3", export_socket="/run/tandem/v 1.sock", kind=KIND_FUSE_LOOP,
        detail={"volume_dir": str(tmp_path), "nbdfuse_pid": "123", "nbdfuse_start_time": "9"},
    )


def test_state_file_round_trip(tmp_path: Path) -> None:
    attachment = _attachment(tmp_path)
    path = tmp_path / STATE_FILE_NAME
    save_attachment(path, attachment)
    assert load_attachment(path) == attachment
    assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE_NAME]  # no temp file left
    save_attachment(path, Attachment("", "/s", KIND_KERNEL_NBD, {}))  # replaced whole
    assert load_attachment(path) == Attachment("", "/s", KIND_KERNEL_NBD, {})


def test_state_matches_what_staging_persists(tmp_path: Path) -> None:
    # staging stores asdict(attachment) in its own JSON and rebuilds with Attachment(**d).
    attachment = _attachment(tmp_path)
    assert Attachment(**json.loads(json.dumps(asdict(attachment)))) == attachment


@pytest.mark.parametrize("content", ["", "{", "[]", '{"device": "/dev/loop0"}', '"x"'])
def test_unreadable_state_is_ignored(tmp_path: Path, content: str) -> None:
    path = tmp_path / STATE_FILE_NAME
    path.write_text(content)
    assert load_attachment(path) is None


def test_missing_state_is_none(tmp_path: Path) -> None:
    assert load_attachment(tmp_path / STATE_FILE_NAME) is None


@pytest.mark.parametrize("volume_id", ["../etc", "a/b", "", ".hidden", "x" * 200])
def test_volume_id_must_be_a_safe_path_component(tmp_path: Path, volume_id: str) -> None:
    for attacher in (FuseLoopAttacher(), KernelNbdAttacher(sys_block=tmp_path)):
        with pytest.raises(errors.InvalidArgumentError):
            asyncio.run(attacher.find(volume_id, tmp_path))
        with pytest.raises(errors.InvalidArgumentError):
            asyncio.run(attacher.attach("/s", volume_id, tmp_path))


def test_fuse_find_without_state_is_none(tmp_path: Path) -> None:
    assert asyncio.run(FuseLoopAttacher().find("vol-1", tmp_path)) is None


def _sys_block(tmp_path: Path, connected: dict[str, bool]) -> Path:
    sys_block = tmp_path / "sys-block"
    for name, busy in connected.items():
        (sys_block / name).mkdir(parents=True)
        if busy:
            (sys_block / name / "pid").write_text("4242\n")
    return sys_block


def test_kernel_attach_without_a_free_device_fails_before_running_anything(
    tmp_path: Path,
) -> None:
    attacher = KernelNbdAttacher(sys_block=_sys_block(tmp_path, {"nbd0": True}))
    with pytest.raises(AttachError, match="no free"):
        asyncio.run(attacher.attach("/s", "vol-1", tmp_path / "work"))
    assert not (tmp_path / "work" / "vol-1" / STATE_FILE_NAME).exists()


def test_kernel_find_needs_state_and_a_connected_device(tmp_path: Path) -> None:
    sys_block = _sys_block(tmp_path, {"nbd0": True, "nbd1": False})
    attacher, work = KernelNbdAttacher(sys_block=sys_block), tmp_path / "work"
    assert asyncio.run(attacher.find("vol-1", work)) is None
    (work / "vol-1").mkdir(parents=True)
    state = work / "vol-1" / STATE_FILE_NAME
    mine = Attachment("/dev/nbd0", "/s", KIND_KERNEL_NBD, {"volume_dir": str(work / "vol-1")})
    save_attachment(state, mine)
    assert asyncio.run(attacher.find("vol-1", work)) == mine
    save_attachment(state, Attachment("/dev/nbd1", "/s", KIND_KERNEL_NBD, mine.detail))
    assert asyncio.run(attacher.find("vol-1", work)) is None  # nbd1 is not connected


def test_kernel_attach_twice_returns_the_existing_attachment(tmp_path: Path) -> None:
    sys_block = _sys_block(tmp_path, {"nbd0": True})
    attacher, work = KernelNbdAttacher(sys_block=sys_block), tmp_path / "work"
    (work / "vol-1").mkdir(parents=True)
    mine = Attachment("/dev/nbd0", "/s", KIND_KERNEL_NBD, {"volume_dir": str(work / "vol-1")})
    save_attachment(work / "vol-1" / STATE_FILE_NAME, mine)
    assert asyncio.run(attacher.attach("/s", "vol-1", work)) == mine
    with pytest.raises(errors.FailedPreconditionError):
        asyncio.run(attacher.attach("/other.sock", "vol-1", work))


def test_kernel_detach_of_a_detached_volume_touches_nothing(tmp_path: Path) -> None:
    # nbd0 is connected, but this volume's state no longer names it: someone else's now.
    sys_block = _sys_block(tmp_path, {"nbd0": True})
    attacher = KernelNbdAttacher(sys_block=sys_block)
    gone = Attachment("/dev/nbd0", "/s", KIND_KERNEL_NBD, {"volume_dir": str(tmp_path / "v")})
    asyncio.run(attacher.detach(gone))
    asyncio.run(attacher.detach(gone))
    assert (sys_block / "nbd0" / "pid").exists()


def test_choose_attacher_follows_the_kernel() -> None:
    attacher = choose_attacher()
    if Path("/dev/nbd0").exists() and isinstance(attacher, KernelNbdAttacher):
        return
    assert isinstance(attacher, FuseLoopAttacher)
