"""List the functions longer than a limit (STYLE.md: ~60 lines), longest first.

Run: ``.venv/bin/python -m benchmarks.long_functions [--limit 60] [PATH ...]`` (default: the packages,
benchmarks, studies and tests). A function's length is its source lines from ``def`` to its last
line, docstring included; a nested function counts in its parent and on its own. A report, not a
test: it always exits 0.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ROOTS = ("moebase", "hwmodels", "workloads", "moesim", "benchmarks", "studies", "tests")


def long_functions(paths: list[Path], limit: int) -> list[tuple[int, str, int, str]]:
    """(lines, file, first line, qualified name) of every function over ``limit`` lines."""
    out = []
    for path in paths:
        tree = ast.parse(path.read_text(), filename=str(path))
        out += _scan(tree, path, limit, "")
    return sorted(out, key=lambda r: (-r[0], r[1], r[2]))


def _scan(node: ast.AST, path: Path, limit: int, prefix: str) -> list[tuple[int, str, int, str]]:
    out = []
    for child in ast.iter_child_nodes(node):
        name = f"{prefix}{getattr(child, 'name', '')}"
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([child.lineno] + [d.lineno for d in child.decorator_list])
            lines = child.end_lineno - first + 1
            if lines > limit:
                out.append((lines, _rel(path), first, name))
            out += _scan(child, path, limit, f"{name}.")
        elif isinstance(child, ast.ClassDef):
            out += _scan(child, path, limit, f"{name}.")
        else:
            out += _scan(child, path, limit, prefix)
    return out


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _python_files(roots: list[str]) -> list[Path]:
    files = []
    for root in roots:
        p = Path(root) if Path(root).is_absolute() else REPO / root
        files += [p] if p.is_file() else sorted(p.rglob("*.py"))
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="*", default=list(DEFAULT_ROOTS))
    ap.add_argument("--limit", type=int, default=60, help="report functions longer than this many lines")
    args = ap.parse_args(argv)
    rows = long_functions(_python_files(args.paths), args.limit)
    for lines, file, first, name in rows:
        print(f"{lines:4d}  {file}:{first}  {name}")
    print(f"{len(rows)} functions over {args.limit} lines")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
