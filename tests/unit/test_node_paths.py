"""The node's record of what it created (node_paths): release undoes only what is recorded.

Real directories and files under tmp_path; the mount side is covered against real mounts in
tests/conformance/test_node_paths.py.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from csi_driver.node.node_paths import CreatedPaths, Made, missing_dirs, write_durably

VOL = "vol-0123456789abcdef01234567"


def release(paths: CreatedPaths, path: Path, volume_id: str = VOL) -> None:
    asyncio.run(paths.release(volume_id, str(path)))


def test_missing_dirs_outermost_first(tmp_path: Path) -> None:
    assert missing_dirs(tmp_path / "a" / "b" / "c") == [
        str(tmp_path / "a"), str(tmp_path / "a" / "b"), str(tmp_path / "a" / "b" / "c")]
    assert missing_dirs(tmp_path) == []


def test_made_directories_are_removed_and_forgotten(tmp_path: Path) -> None:
    paths = CreatedPaths(tmp_path / "state", "node-1")
    target = tmp_path / "pods" / "p" / "mount"
    (tmp_path / "pods").mkdir()  # the CO's: not ours to remove
    paths.make_dir(VOL, str(target))
    assert target.is_dir()
    assert paths.of(VOL) == {str(target): Made(dirs=(str(target.parent), str(target)))}
    release(paths, target)
    assert not target.parent.exists() and (tmp_path / "pods").is_dir()
    assert paths.of(VOL) == {}
    assert not list((tmp_path / "state" / "created").iterdir()), "an empty record is removed"
    release(paths, target)  # idempotent


def test_a_path_the_node_did_not_make_is_left_alone(tmp_path: Path) -> None:
    paths = CreatedPaths(tmp_path / "state", "node-1")
    foreign_dir, foreign_file = tmp_path / "dir", tmp_path / "file"
    foreign_dir.mkdir()
    foreign_file.write_text("someone else's")
    paths.make_dir(VOL, str(foreign_dir))  # already there: nothing made, nothing recorded
    paths.make_file(VOL, str(foreign_file))
    assert paths.of(VOL) == {}
    for path in (foreign_dir, foreign_file):
        release(paths, path)
        release(paths, path, "vol-other")
    assert foreign_dir.is_dir() and foreign_file.read_text() == "someone else's"


def test_made_file_and_parents_are_removed(tmp_path: Path) -> None:
    paths = CreatedPaths(tmp_path / "state", "node-1")
    target = tmp_path / "publish" / "pv" / "pod-uid"
    paths.make_file(VOL, str(target))
    assert target.is_file()
    made = paths.of(VOL)[str(target)]
    assert made.file and made.dirs == (str(tmp_path / "publish"), str(target.parent))
    release(paths, target)
    assert not (tmp_path / "publish").exists()


def test_a_made_directory_someone_filled_is_kept(tmp_path: Path) -> None:
    paths = CreatedPaths(tmp_path / "state", "node-1")
    target = tmp_path / "t"
    paths.make_dir(VOL, str(target))
    (target / "data").write_text("x")
    release(paths, target)
    assert (target / "data").read_text() == "x"
    assert paths.of(VOL) == {}


def test_the_record_survives_a_restart_and_is_per_volume(tmp_path: Path) -> None:
    state = tmp_path / "state"
    target = tmp_path / "t"
    CreatedPaths(state, "node-1").make_dir(VOL, str(target))
    CreatedPaths(state, "node-1").will_mount(VOL, str(target))
    after_restart = CreatedPaths(state, "node-1")
    assert after_restart.made_mount(VOL, str(target))
    assert not after_restart.made_mount("vol-other", str(target))
    release(after_restart, target, "vol-other")
    assert target.is_dir()
    release(after_restart, target)
    assert not target.exists()


def test_write_durably_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    write_durably(path, json.dumps({"a": 1}))
    write_durably(path, json.dumps({"a": 2}))
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
