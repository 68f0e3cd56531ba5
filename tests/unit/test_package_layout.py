"""The tree shows the architecture, and the shipped package holds only the product.

``csi_driver`` (controller, node, state) and ``replication`` (the data plane) are what the
wheel and the image install; ``devtools`` (dev cluster, demo, benchmarks, crash checker) stays
in the source tree. Checked on the sources, not by convention.
"""

from __future__ import annotations

import ast
import fnmatch
import os
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("csi_driver", "replication")


def _modules(package: str) -> Iterator[Path]:
    for path in sorted((ROOT / package).rglob("*.py")):
        if "_gen" not in path.parts:
            yield path


def _imports(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_the_wheel_ships_the_product_packages_only() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    # What setuptools' packages.find does: every directory with an __init__.py whose dotted
    # name matches an include pattern.
    packages = [".".join(p.parent.relative_to(ROOT).parts) for p in ROOT.rglob("__init__.py")
                if ".venv" not in p.parts and ".git" not in p.parts]
    shipped = [name for name in packages if any(fnmatch.fnmatch(name, pat) for pat in include)]
    assert "csi_driver.controller" in shipped and "csi_driver.node" in shipped
    assert "replication" in shipped
    assert not [p for p in shipped if p.split(".")[0] not in PRODUCT], shipped


def test_product_code_never_needs_the_dev_tools() -> None:
    offenders = []
    for package in PRODUCT:
        for path in _modules(package):
            uses = {m for m in _imports(path, top_level_only=False) if m.startswith("devtools")}
            # The CLI registers the dev commands only when devtools is there (a checkout).
            if uses and path != ROOT / "csi_driver" / "cli.py":
                offenders.append(f"{path.relative_to(ROOT)}: {sorted(uses)}")
    assert not offenders, offenders
    assert not {m for m in _imports(ROOT / "csi_driver" / "cli.py", top_level_only=True)
                if m.startswith("devtools")}, "cli.py imports devtools at module level"


def test_the_data_plane_imports_neither_the_control_plane_nor_grpc_nor_etcd() -> None:
    offenders = []
    for path in _modules("replication"):
        for module in _imports(path, top_level_only=False):
            if module.split(".")[0] in ("csi_driver", "devtools", "grpc"):
                offenders.append(f"{path.relative_to(ROOT)}: {module}")
    assert not offenders, offenders


def test_an_installed_tandem_has_no_dev_commands(tmp_path: Path) -> None:
    """Outside the source tree (as in the image) ``tandem`` still works, without them."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    commands = subprocess.run(
        [sys.executable, "-c", "import argparse, sys; "
         "sys.path[:] = [p for p in sys.path if p not in ('', sys.argv[1])]; "
         "from csi_driver.cli import build_parser; "
         "(sub,) = [a for a in build_parser()._actions "
         "if isinstance(a, argparse._SubParsersAction)]; print(' '.join(sub.choices))",
         str(ROOT)],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
    ).stdout.split()
    assert commands == ["controller", "node-front", "node", "credentials"]
