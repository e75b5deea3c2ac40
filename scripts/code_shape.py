"""The package's shape, as issue #19 measures it: modules per package, the longest function, the largest class,
imports that go up the layers, and import cycles between modules.

    python scripts/code_shape.py

Layers, lowest first (a package imports only from its own layer or below): errors and utils, config, data, models,
training, analysis, deploy, cli. Every import counts, also one inside a function. Exit code 1 when an import goes up
or modules import each other in a circle.
"""

from __future__ import annotations

import ast
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [("errors", "utils"), ("config",), ("data",), ("models",), ("training",), ("analysis",), ("deploy",),
          ("cli",)]
RANK = {package: rank for rank, packages in enumerate(LAYERS) for package in packages}


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the finetune package by dotted name (a package by its own name)."""
    found = {}
    for path in sorted((root / "finetune").rglob("*.py")):
        name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        found[name] = path
    return found


def imports(found: dict[str, Path]) -> dict[str, set[str]]:
    """The finetune modules each module imports: ``from a import b`` counts ``a.b`` when that is a module, else
    ``a``."""
    edges: dict[str, set[str]] = {name: set() for name in found}
    for name, path in found.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in found else node.module
                           for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            edges[name] |= {target for target in targets if target in found and target != name}
    return edges


def package(module: str) -> str:
    """The sub-package a module belongs to (``training``), or a top-level module's own name (``errors``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def upward(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Imports from a lower layer's package into a higher one's."""
    return sorted((a, b) for a, targets in edges.items() for b in targets
                  if package(a) in RANK and package(b) in RANK and RANK[package(b)] > RANK[package(a)])


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that import each other, directly or round a circle (strongly connected components)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in edges[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in edges:
        if node not in index:
            visit(node)
    return found


def longest(found: dict[str, Path], kind: type) -> tuple[int, str]:
    """(lines, dotted name) of the longest function or class, counted from its ``def``/``class`` line."""
    sizes = [(node.end_lineno - node.lineno + 1, f"{name}.{node.name}")
             for name, path in found.items() for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, kind)]
    return max(sizes)


def main() -> int:
    found = modules()
    edges = imports(found)
    per_package = Counter(package(name) if path.parent.name != "finetune" else "finetune (top level)"
                          for name, path in found.items() if path.name != "__init__.py")
    print("modules per package:", ", ".join(f"{name} {count}" for name, count in sorted(per_package.items())))
    lines, name = longest(found, (ast.FunctionDef, ast.AsyncFunctionDef))
    print(f"longest function: {name}, {lines} lines")
    lines, name = longest(found, ast.ClassDef)
    print(f"largest class: {name}, {lines} lines")
    up, circles = upward(edges), cycles(edges)
    print(f"imports up the layers: {len(up)}" + "".join(f"\n  {a} -> {b}" for a, b in up))
    print(f"import cycles: {len(circles)}" + "".join(f"\n  {' <-> '.join(group)}" for group in circles))
    return 1 if up or circles else 0


if __name__ == "__main__":
    sys.exit(main())
