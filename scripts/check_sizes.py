"""Size check for product code (``make lint``): a module under csi_driver/ or replication/
(csi_driver/_gen/ excepted) has at most 400 lines, a function or method at most 80.

Known offenders are listed in ALLOWLIST with their size when they were listed, which is
a ceiling: the list can only shrink. An entry that grew, is within the limit now, or no
longer exists is reported, so the list is trimmed as code gets split. Prints one line per
offender (path, lines, limit) and exits 1; prints nothing and exits 0 when all is well.

Usage: python scripts/check_sizes.py [ROOT]   (ROOT: the repository; default: this one)
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

MODULE_LIMIT = 400
FUNCTION_LIMIT = 80
PRODUCT_DIRS = ("csi_driver", "replication")
EXCLUDED_DIRS = ("csi_driver/_gen",)
USAGE = "usage: python scripts/check_sizes.py [ROOT]"

# Known offenders and their size, as measured when listed. A module is keyed by its path,
# a function or method by ``path::Qualified.name``. Split them, then delete the entry.
ALLOWLIST: dict[str, int] = {}


@dataclass(frozen=True)
class Size:
    """One module or function: its allowlist key, where to find it, its lines, its limit."""

    key: str
    where: str
    lines: int
    limit: int


def product_files(root: Path) -> list[Path]:
    """Every product module under ``root``, sorted."""
    found = []
    for top in PRODUCT_DIRS:
        for path in (root / top).rglob("*.py"):
            rel = path.relative_to(root).as_posix()
            if not any(rel.startswith(d + "/") for d in EXCLUDED_DIRS):
                found.append(path)
    return sorted(found)


Function = ast.FunctionDef | ast.AsyncFunctionDef


def _functions(node: ast.AST, prefix: str) -> Iterator[tuple[str, Function]]:
    """(qualified name, node) of every function and method below ``node``, nested ones too."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, Function):
            name = prefix + child.name
            yield name, child
            yield from _functions(child, name + ".")
        elif isinstance(child, ast.ClassDef):
            yield from _functions(child, prefix + child.name + ".")
        else:
            yield from _functions(child, prefix)


def measure(root: Path, path: Path) -> list[Size]:
    """The module's size, then each function's (the longest of any defined twice)."""
    rel = path.relative_to(root).as_posix()
    text = path.read_text(encoding="utf-8")
    sizes = {rel: Size(rel, rel, len(text.splitlines()), MODULE_LIMIT)}
    for name, node in _functions(ast.parse(text, filename=rel), ""):
        lines = (node.end_lineno or node.lineno) - node.lineno + 1  # from ``def``, body and all
        size = Size(f"{rel}::{name}", f"{rel}:{node.lineno} {name}", lines, FUNCTION_LIMIT)
        if size.key not in sizes or sizes[size.key].lines < size.lines:
            sizes[size.key] = size
    return list(sizes.values())


def problems(sizes: Sequence[Size], allowlist: Mapping[str, int]) -> list[str]:
    """One line per offender: over its limit, or an allowlist entry that must change."""
    out = []
    for s in sizes:
        listed = allowlist.get(s.key)
        if listed is None:
            if s.lines > s.limit:
                out.append(f"{s.where}: {s.lines} lines, limit {s.limit}")
        elif s.lines <= s.limit:
            out.append(f"{s.where}: {s.lines} lines, limit {s.limit}: within the limit now, "
                       "remove it from ALLOWLIST")
        elif s.lines > listed:
            out.append(f"{s.where}: {s.lines} lines, limit {s.limit}: grew past its "
                       f"ALLOWLIST size {listed} (it may only shrink)")
    seen = {s.key for s in sizes}
    for key in sorted(set(allowlist) - seen):
        limit = FUNCTION_LIMIT if "::" in key else MODULE_LIMIT
        out.append(f"{key}: not found, limit {limit}: remove it from ALLOWLIST")
    return out


def check(root: Path, allowlist: Mapping[str, int]) -> list[str]:
    sizes = [size for path in product_files(root) for size in measure(root, path)]
    return problems(sizes, allowlist)


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) > 1 or any(a.startswith("-") for a in args):
        print(USAGE, file=sys.stderr)
        return 2
    root = Path(args[0]) if args else Path(__file__).resolve().parents[1]
    found = check(root, ALLOWLIST)
    for line in found:
        print(line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
