"""FilePool on a real temporary directory: contract, accounting, crash leftovers, TRIM."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from replication.errors import (
    InvalidReplicaIdError,
    InvalidSizeError,
    PoolFullError,
    ReplicaConflictError,
    ReplicaNotFoundError,
)
from replication.pool.base import PoolCapacity, ReplicaInfo, open_pool
from replication.pool.file import FilePool

KIB4 = 4096
MIB = 1 << 20


@pytest.fixture
def pool(tmp_path: Path) -> FilePool:
    return FilePool(tmp_path / "pool", 16 * MIB)


def test_create_makes_a_sparse_file_of_the_size(pool: FilePool) -> None:
    info = pool.create("vol-1", 4 * MIB)
    path = pool.directory / "vol-1.img"
    assert info == ReplicaInfo("vol-1", 4 * MIB, str(path), path.stat().st_blocks * 512)
    assert path.stat().st_size == 4 * MIB
    assert info.allocated_bytes < 4 * MIB  # sparse: nothing written yet
    assert pool.get("vol-1") == info


def test_create_is_idempotent_for_the_same_size(pool: FilePool) -> None:
    first = pool.create("vol-1", 4 * MIB)
    assert pool.create("vol-1", 4 * MIB) == first
    assert pool.capacity() == PoolCapacity(16 * MIB, 12 * MIB)


def test_create_with_another_size_conflicts(pool: FilePool) -> None:
    pool.create("vol-1", 4 * MIB)
    with pytest.raises(ReplicaConflictError):
        pool.create("vol-1", 8 * MIB)
    assert pool.get("vol-1") is not None and pool.get("vol-1").size_bytes == 4 * MIB  # type: ignore[union-attr]


def test_create_beyond_capacity_is_pool_full(pool: FilePool) -> None:
    pool.create("a", 12 * MIB)
    with pytest.raises(PoolFullError):
        pool.create("b", 8 * MIB)
    assert pool.get("b") is None
    pool.create("b", 4 * MIB)  # exactly the rest still fits
    assert pool.capacity().free_bytes == 0


def test_accounting_is_thick_even_when_files_are_sparse(pool: FilePool) -> None:
    pool.create("a", 16 * MIB)
    assert pool.capacity().free_bytes == 0
    with pytest.raises(PoolFullError):
        pool.create("b", KIB4)


def test_delete_is_idempotent_and_frees_space(pool: FilePool) -> None:
    pool.create("vol-1", 4 * MIB)
    pool.delete("vol-1")
    pool.delete("vol-1")
    pool.delete("never-existed")
    assert pool.get("vol-1") is None
    assert not (pool.directory / "vol-1.img").exists()
    assert pool.capacity().free_bytes == 16 * MIB


def test_resize_grows_keeps_data_and_accounts(pool: FilePool) -> None:
    pool.create("vol-1", 4 * MIB)
    path = pool.directory / "vol-1.img"
    with open(path, "r+b") as f:
        f.write(b"keep me")
    info = pool.resize("vol-1", 8 * MIB)
    assert info.size_bytes == 8 * MIB and path.stat().st_size == 8 * MIB
    assert path.read_bytes()[:7] == b"keep me"
    assert pool.capacity().free_bytes == 8 * MIB
    assert pool.resize("vol-1", 8 * MIB) == pool.get("vol-1")  # same size: no-op


def test_resize_refuses_shrink_missing_and_overflow(pool: FilePool) -> None:
    pool.create("vol-1", 8 * MIB)
    with pytest.raises(ReplicaConflictError):
        pool.resize("vol-1", 4 * MIB)
    with pytest.raises(ReplicaNotFoundError):
        pool.resize("nope", 4 * MIB)
    pool.create("vol-2", 4 * MIB)
    with pytest.raises(PoolFullError):
        pool.resize("vol-1", 16 * MIB)  # needs 8 more, 4 free
    assert pool.get("vol-1").size_bytes == 8 * MIB  # type: ignore[union-attr]


def test_list_is_sorted_and_ignores_foreign_files(pool: FilePool) -> None:
    for name in ("b", "a", "c.1"):
        pool.create(name, KIB4)
    (pool.directory / "notes.txt").write_text("not a replica")
    (pool.directory / "-bad.img").write_bytes(b"")
    os.symlink("/etc/passwd", pool.directory / "link.img")
    assert [r.volume_id for r in pool.list()] == ["a", "b", "c.1"]
    assert pool.capacity().free_bytes == 16 * MIB - 3 * KIB4


def test_punch_hole_frees_blocks_and_reads_zero(pool: FilePool) -> None:
    pool.create("vol-1", 4 * MIB)
    path = pool.directory / "vol-1.img"
    with open(path, "r+b") as f:
        f.write(os.urandom(2 * MIB))
        f.flush()
        os.fsync(f.fileno())
    before = pool.get("vol-1").allocated_bytes  # type: ignore[union-attr]
    assert before >= 2 * MIB
    pool.punch_hole("vol-1", 0, MIB)
    after = pool.get("vol-1")
    assert after is not None
    assert before - after.allocated_bytes >= MIB
    assert after.size_bytes == 4 * MIB  # KEEP_SIZE
    data = path.read_bytes()
    assert data[:MIB] == bytes(MIB) and data[MIB : MIB + 16] != bytes(16)


def test_punch_hole_validates_range_and_replica(pool: FilePool) -> None:
    pool.create("vol-1", MIB)
    pool.punch_hole("vol-1", 0, 0)  # empty range: nothing to do
    with pytest.raises(InvalidSizeError):
        pool.punch_hole("vol-1", MIB - KIB4, 2 * KIB4)
    with pytest.raises(InvalidSizeError):
        pool.punch_hole("vol-1", -1, KIB4)
    with pytest.raises(ReplicaNotFoundError):
        pool.punch_hole("nope", 0, KIB4)


@pytest.mark.parametrize("bad", ["../x", "a/b", "", "x" * 200, ".", "..", ".hidden", "a b", "é"])
def test_invalid_ids_are_refused_everywhere(pool: FilePool, bad: str) -> None:
    calls: list[Callable[[], object]] = [
        lambda: pool.create(bad, KIB4),
        lambda: pool.get(bad),
        lambda: pool.delete(bad),
        lambda: pool.resize(bad, KIB4),
        lambda: pool.punch_hole(bad, 0, KIB4),
    ]
    for call in calls:
        with pytest.raises(InvalidReplicaIdError):
            call()
    assert sorted(p.name for p in pool.directory.iterdir()) == [".pool.lock"]


def test_longest_valid_id_works(pool: FilePool) -> None:
    assert pool.create("x" * 128, KIB4).volume_id == "x" * 128


@pytest.mark.parametrize("bad", [0, -KIB4, 1, KIB4 + 1, 512, True, 4096.0])
def test_invalid_sizes_are_refused(pool: FilePool, bad: int) -> None:
    with pytest.raises(InvalidSizeError):
        pool.create("vol-1", bad)
    assert isinstance(InvalidSizeError("x"), ValueError)
    pool.create("vol-2", KIB4)
    with pytest.raises(InvalidSizeError):
        pool.resize("vol-2", bad)


def test_concurrent_creates_never_over_commit(tmp_path: Path) -> None:
    pool = FilePool(tmp_path, 10 * KIB4)
    barrier = threading.Barrier(24)
    outcomes: list[str] = []

    def create(i: int) -> None:
        barrier.wait()
        try:
            pool.create(f"vol-{i}", KIB4)
            outcomes.append("ok")
        except PoolFullError:
            outcomes.append("full")

    threads = [threading.Thread(target=create, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("ok") == 10 and outcomes.count("full") == 14
    assert len(pool.list()) == 10
    assert pool.capacity().free_bytes == 0


def test_concurrent_creates_of_one_id_agree(tmp_path: Path) -> None:
    pool = FilePool(tmp_path, 10 * KIB4)
    barrier = threading.Barrier(8)
    results: list[ReplicaInfo] = []

    def create() -> None:
        barrier.wait()
        results.append(pool.create("same", 2 * KIB4))

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and len({r.path for r in results}) == 1
    assert pool.capacity().free_bytes == 8 * KIB4


def test_stale_temps_are_cleaned_at_open_and_never_listed(tmp_path: Path) -> None:
    pool = FilePool(tmp_path, 16 * MIB)
    pool.create("kept", MIB)
    # What a create that crashed between open(O_EXCL) and rename leaves behind.
    stale = tmp_path / ".tmp-lost.0badf00d"
    stale.write_bytes(b"half")
    assert [r.volume_id for r in pool.list()] == ["kept"]
    assert pool.capacity().free_bytes == 15 * MIB
    FilePool(tmp_path, 16 * MIB)
    assert not stale.exists()
    assert (tmp_path / "kept.img").exists()


def test_capacity_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(InvalidSizeError):
        FilePool(tmp_path, 0)


def test_open_pool_builds_a_file_pool(tmp_path: Path) -> None:
    pool = open_pool("file", directory=tmp_path, capacity_bytes=MIB)
    assert isinstance(pool, FilePool) and pool.kind == "file"
    assert pool.capacity() == PoolCapacity(MIB, MIB)
    with pytest.raises(ValueError, match="unknown pool kind"):
        open_pool("zfs")
    with pytest.raises(TypeError):
        open_pool("file", directory=tmp_path)


# -- property: random operation sequences keep the books balanced ------------------------

SIZES = st.integers(min_value=1, max_value=12).map(lambda blocks: blocks * KIB4)
IDS = st.sampled_from(["a", "b", "c", "d"])
CAPACITY = 24 * KIB4


class FilePoolMachine(RuleBasedStateMachine):
    """The model is {volume_id: size}; the pool must agree with it after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="tandem-filepool-"))
        self.pool = FilePool(self.dir, CAPACITY)
        self.model: dict[str, int] = {}

    def teardown(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def _free(self) -> int:
        return CAPACITY - sum(self.model.values())

    @rule(volume_id=IDS, size=SIZES)
    def create(self, volume_id: str, size: int) -> None:
        expected_error: type[Exception] | None = None
        if volume_id in self.model:
            expected_error = None if self.model[volume_id] == size else ReplicaConflictError
        elif size > self._free():
            expected_error = PoolFullError
        if expected_error is None:
            assert self.pool.create(volume_id, size).size_bytes == size
            self.model[volume_id] = size
        else:
            with pytest.raises(expected_error):
                self.pool.create(volume_id, size)

    @rule(volume_id=IDS)
    def delete(self, volume_id: str) -> None:
        self.pool.delete(volume_id)
        self.model.pop(volume_id, None)

    @rule(volume_id=IDS, size=SIZES)
    def resize(self, volume_id: str, size: int) -> None:
        current = self.model.get(volume_id)
        if current is None:
            with pytest.raises(ReplicaNotFoundError):
                self.pool.resize(volume_id, size)
        elif size < current:
            with pytest.raises(ReplicaConflictError):
                self.pool.resize(volume_id, size)
        elif size - current > self._free():
            with pytest.raises(PoolFullError):
                self.pool.resize(volume_id, size)
        else:
            assert self.pool.resize(volume_id, size).size_bytes == size
            self.model[volume_id] = size

    @invariant()
    def books_balance(self) -> None:
        capacity = self.pool.capacity()
        assert capacity.total_bytes == CAPACITY
        assert capacity.free_bytes == CAPACITY - sum(self.model.values())
        assert capacity.free_bytes >= 0
        assert {r.volume_id: r.size_bytes for r in self.pool.list()} == self.model


FilePoolMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
test_file_pool_state_machine = FilePoolMachine.TestCase
