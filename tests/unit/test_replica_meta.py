"""ReplicaMeta, MetaStore and MetaState on real temporary directories.

A save replaces the file by rename, so a new inode means "this call wrote to disk": the
tests use that to check when MetaState saves, without replacing any part of it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from replication.errors import InvalidReplicaIdError, ReplicaMetaError
from replication.replica_meta import MetaState, MetaStore, ReplicaMeta


@pytest.fixture
def store(tmp_path: Path) -> MetaStore:
    return MetaStore(tmp_path / "meta")


def _ino(store: MetaStore, volume_id: str) -> int | None:
    try:
        return (store.directory / f"{volume_id}.json").stat().st_ino
    except FileNotFoundError:
        return None


def test_missing_metadata_loads_as_never_fenced_and_clean(store: MetaStore) -> None:
    assert store.load("vol-1") == ReplicaMeta("vol-1", 0, 0, False, 0)


def test_save_then_load_round_trips_and_leaves_no_temp_file(store: MetaStore) -> None:
    meta = ReplicaMeta("vol-1", fenced_epoch=7, generation=3, dirty=True, settled_seq=99)
    store.save(meta)
    assert store.load("vol-1") == meta
    assert MetaStore(store.directory).load("vol-1") == meta  # a new process sees it too
    assert sorted(os.listdir(store.directory)) == ["vol-1.json"]
    doc = json.loads((store.directory / "vol-1.json").read_text())
    assert doc == {"format": 1, **{k: getattr(meta, k) for k in doc if k != "format"}}


def test_save_replaces_the_previous_record(store: MetaStore) -> None:
    store.save(ReplicaMeta("vol-1", 1))
    store.save(ReplicaMeta("vol-1", 2, 1))
    assert store.load("vol-1") == ReplicaMeta("vol-1", 2, 1)


def test_delete_forgets_and_tolerates_missing(store: MetaStore) -> None:
    store.save(ReplicaMeta("vol-1", 4))
    store.delete("vol-1")
    store.delete("vol-1")
    assert store.load("vol-1").fenced_epoch == 0


@pytest.mark.parametrize("bad", ["../etc", ".hidden", "a/b", "", "x" * 129])
def test_ids_that_are_not_one_safe_path_component_are_refused(store: MetaStore, bad: str) -> None:
    with pytest.raises(InvalidReplicaIdError):
        store.load(bad)
    with pytest.raises(InvalidReplicaIdError):
        store.save(ReplicaMeta(bad, 1))


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"\xff\xfe",
        b"[]",
        b'{"format": 2, "volume_id": "vol-1", "fenced_epoch": 1, "generation": 0, '
        b'"dirty": false, "settled_seq": 0}',
        b'{"format": 1, "volume_id": "vol-2", "fenced_epoch": 1, "generation": 0, '
        b'"dirty": false, "settled_seq": 0}',
        b'{"format": 1, "volume_id": "vol-1", "fenced_epoch": -1, "generation": 0, '
        b'"dirty": false, "settled_seq": 0}',
        b'{"format": 1, "volume_id": "vol-1", "fenced_epoch": true, "generation": 0, '
        b'"dirty": false, "settled_seq": 0}',
        b'{"format": 1, "volume_id": "vol-1", "fenced_epoch": 1, "generation": 0, '
        b'"dirty": 0, "settled_seq": 0}',
        b'{"format": 1, "volume_id": "vol-1", "generation": 0, "dirty": false, "settled_seq": 0}',
        b" " * (70 * 1024),
    ],
)
def test_an_unreadable_record_is_an_error_not_a_forgotten_fence(
    store: MetaStore, content: bytes
) -> None:
    (store.directory / "vol-1.json").write_bytes(content)
    with pytest.raises(ReplicaMetaError):
        store.load("vol-1")
    with pytest.raises(ReplicaMetaError):
        MetaState(store, "vol-1")


def test_temp_files_of_a_crashed_save_are_removed_on_start(store: MetaStore) -> None:
    (store.directory / ".tmp-vol-1.deadbeef").write_bytes(b"{half")
    store.save(ReplicaMeta("vol-2", 1))
    MetaStore(store.directory)
    assert sorted(os.listdir(store.directory)) == ["vol-2.json"]


def test_fence_is_on_disk_before_it_returns_and_bumps_the_generation(store: MetaStore) -> None:
    state = MetaState(store, "vol-1")
    assert state.fence(5)
    assert store.load("vol-1") == ReplicaMeta("vol-1", 5, 1, False, 0)
    assert (state.fenced_epoch, state.generation) == (5, 1)


def test_fence_at_the_same_epoch_is_accepted_without_a_save(store: MetaStore) -> None:
    state = MetaState(store, "vol-1")
    state.fence(5)
    before = _ino(store, "vol-1")
    assert state.fence(5)
    assert _ino(store, "vol-1") == before
    assert state.generation == 1


def test_a_lower_fence_is_refused_forever_even_after_a_restart(store: MetaStore) -> None:
    MetaState(store, "vol-1").fence(5)
    restarted = MetaState(MetaStore(store.directory), "vol-1")
    assert not restarted.fence(4)
    assert restarted.fenced_epoch == 5
    assert store.load("vol-1").fenced_epoch == 5


def test_a_fence_that_cannot_be_saved_changes_nothing(tmp_path: Path) -> None:
    store = MetaStore(tmp_path / "meta")
    state = MetaState(store, "vol-1")
    shutil.rmtree(store.directory)  # every save now fails
    with pytest.raises(OSError):
        state.fence(3)
    assert (state.fenced_epoch, state.generation) == (0, 0)


def test_dirty_is_saved_once_before_the_first_write(store: MetaStore) -> None:
    state = MetaState(store, "vol-1")
    state.fence(1)
    assert not state.write_ready
    state.mark_dirty()
    assert store.load("vol-1").dirty
    saved = _ino(store, "vol-1")
    assert state.write_ready  # later writes skip mark_dirty entirely
    state.mark_dirty()
    assert _ino(store, "vol-1") == saved


def test_a_replica_opened_dirty_needs_no_save_for_its_first_write(store: MetaStore) -> None:
    store.save(ReplicaMeta("vol-1", 2, 1, dirty=True))
    state = MetaState(store, "vol-1")
    assert state.write_ready


def test_settle_is_lazy_and_persist_writes_it(store: MetaStore) -> None:
    state = MetaState(store, "vol-1")
    state.fence(1)
    state.mark_dirty()
    state.settle(42)
    assert store.load("vol-1").dirty  # not yet on disk: only costs a needless resync
    assert state.persist_if_changed()
    assert store.load("vol-1") == ReplicaMeta("vol-1", 1, 1, False, 42)
    assert not state.persist_if_changed()


def test_a_write_after_an_unsaved_settle_needs_no_save(store: MetaStore) -> None:
    state = MetaState(store, "vol-1")
    state.fence(1)
    state.mark_dirty()
    state.settle(42)
    saved = _ino(store, "vol-1")
    state.mark_dirty()  # the disk still says dirty: nothing to make durable
    assert _ino(store, "vol-1") == saved
    state.persist_if_changed()
    assert store.load("vol-1") == ReplicaMeta("vol-1", 1, 1, True, 42)


def test_a_write_after_a_saved_settle_saves_dirty_again(store: MetaStore) -> None:
    state = MetaState(store, "vol-1")
    state.fence(1)
    state.mark_dirty()
    state.settle(7)
    state.persist_if_changed()
    assert not state.write_ready
    state.mark_dirty()
    assert store.load("vol-1") == ReplicaMeta("vol-1", 1, 1, True, 7)


class MetaCrashMachine(RuleBasedStateMachine):
    """Random fences, writes, settles, saves and crashes: the durable rules always hold."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="meta-sm-"))
        self.state = MetaState(MetaStore(self.dir), "vol-1")
        self.acked_fence = 0  # the highest FENCE that returned (the replica replied OK)
        # Writes before a SETTLE are vouched for by the owner; later ones must be on record.
        self.wrote_since_settle = False

    def teardown(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(epoch=st.integers(0, 20))
    def fence(self, epoch: int) -> None:
        accepted = self.state.fence(epoch)
        assert accepted == (epoch >= self.acked_fence)
        self.acked_fence = max(self.acked_fence, epoch)

    @rule()
    def write(self) -> None:
        if not self.state.write_ready:
            self.state.mark_dirty()
        self.wrote_since_settle = True

    @rule(seq=st.integers(0, 1 << 40))
    def settle(self, seq: int) -> None:
        self.state.settle(seq)
        self.wrote_since_settle = False

    @rule()
    def persist(self) -> None:
        self.state.persist_if_changed()

    @rule()
    def crash_and_restart(self) -> None:
        self.state = MetaState(MetaStore(self.dir), "vol-1")

    @invariant()
    def durable_state_is_safe(self) -> None:
        on_disk = MetaStore(self.dir).load("vol-1")
        assert on_disk.fenced_epoch == self.acked_fence
        if self.wrote_since_settle:
            assert on_disk.dirty


MetaCrashMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30)
test_meta_durability_rules = MetaCrashMachine.TestCase
