"""scripts/check_sizes.py, the size check of ``make lint``, fed small trees of temporary files
(with the limits lowered, so the modules stay small)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    # scripts/ is a directory of tools, not a package: load the script by path.
    spec = importlib.util.spec_from_file_location(
        "tandem_check_sizes", REPO_ROOT / "scripts" / "check_sizes.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


sizes = _load()


def function(name: str, body_lines: int, indent: str = "") -> str:
    body = "".join(f"{indent}    x{i} = {i}\n" for i in range(body_lines))
    return f"{indent}def {name}() -> None:\n{body}"


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A repository root with the limits at 20 lines per module and 5 per function."""
    monkeypatch.setattr(sizes, "MODULE_LIMIT", 20)
    monkeypatch.setattr(sizes, "FUNCTION_LIMIT", 5)
    for d in ("csi_driver/_gen", "csi_driver/state", "replication", "tests", "bench"):
        (tmp_path / d).mkdir(parents=True)
    return tmp_path


def write(root: Path, rel: str, text: str) -> None:
    (root / rel).write_text(text)


def run(root: Path, allowlist: dict[str, int], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> tuple[int, list[str]]:
    """Exit code and output of the script run on ``root`` with ``allowlist`` as its list."""
    monkeypatch.setattr(sizes, "ALLOWLIST", allowlist)
    code = sizes.main([str(root)])
    return code, capsys.readouterr().out.splitlines()


def test_a_clean_tree_passes_silently(tree: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    write(tree, "csi_driver/small.py", function("f", 4))  # exactly at both limits
    write(tree, "replication/also.py", "x = 1\n" * 20)
    assert run(tree, {}, capsys, monkeypatch) == (0, [])


def test_offenders_get_one_line_each(tree: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    write(tree, "csi_driver/state/big.py", "x = 1\n" * 21)
    write(tree, "replication/long.py", "class C:\n" + function("m", 5, "    ")
          + function("outer", 3) + function("inner", 3, "    "))
    # Not product modules: generated code, tests, benchmarks.
    for rel in ("csi_driver/_gen/big_pb2.py", "tests/test_big.py", "bench/big.py"):
        write(tree, rel, "x = 1\n" * 50)
    code, out = run(tree, {}, capsys, monkeypatch)
    assert code == 1
    assert out == [
        "csi_driver/state/big.py: 21 lines, limit 20",
        "replication/long.py:2 C.m: 6 lines, limit 5",
        "replication/long.py:8 outer: 8 lines, limit 5",  # nested functions count in full
    ]


def test_the_allowlist_can_only_shrink(tree: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    write(tree, "replication/listed.py", "x = 1\n" * 30)
    write(tree, "replication/shrunk.py", "x = 1\n" * 25)  # was 28: fine, still listed
    write(tree, "replication/grew.py", "x = 1\n" * 31)
    write(tree, "replication/split.py", "x = 1\n" * 10)
    write(tree, "csi_driver/f.py", function("g", 6))
    code, out = run(tree, {
        "replication/listed.py": 30, "replication/shrunk.py": 28, "replication/grew.py": 30,
        "replication/split.py": 30, "replication/gone.py": 30, "csi_driver/f.py::g": 7,
        "csi_driver/f.py::renamed": 9,
    }, capsys, monkeypatch)
    assert code == 1
    assert out == [
        "replication/grew.py: 31 lines, limit 20: grew past its ALLOWLIST size 30 "
        "(it may only shrink)",
        "replication/split.py: 10 lines, limit 20: within the limit now, remove it from "
        "ALLOWLIST",
        "csi_driver/f.py::renamed: not found, limit 5: remove it from ALLOWLIST",
        "replication/gone.py: not found, limit 20: remove it from ALLOWLIST",
    ]
