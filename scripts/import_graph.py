"""Import graph of `services/`: cycles, backward imports and module sizes.

Run: python scripts/import_graph.py [--lazy]
`tests/test_structure.py` asserts on the same functions.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file for every hand-written module under services/."""
    out: dict[str, Path] = {}
    for path in sorted((root / "services").rglob("*.py")):
        if path.name.endswith(GENERATED):
            continue
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(
    tree: ast.AST, module: str, is_package: bool, lazy: bool, typing: bool = True
) -> Iterator[str]:
    """Absolute names imported by a module.

    Module level only unless `lazy`; imports under `if TYPE_CHECKING:` count unless
    `typing` is false (a cycle through them is still two modules that know each other).
    """

    def visit(node: ast.AST, top: bool) -> Iterator[str]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child) and not typing:
                continue
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if lazy:
                    yield from visit(child, False)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = module.split(".") if is_package else module.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (child.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                # `from pkg import name`: the submodule `name` if it is one, else `pkg`
                # (import_graph strips the name when no such module exists).
                for alias in child.names:
                    yield f"{base}.{alias.name}"
            else:
                yield from visit(child, top)

    yield from visit(tree, True)


def import_graph(lazy: bool = False, typing: bool = True, root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the services modules it imports (resolved to the modules that exist)."""
    files = module_files(root)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        deps: set[str] = set()
        for name in _imports(tree, module, path.name == "__init__.py", lazy, typing):
            if not name.startswith("services"):
                continue
            # `from pkg import submodule` names the submodule; `from mod import obj` the module.
            while name and name not in files:
                name = name.rpartition(".")[0]
            if name and name != module:
                deps.add(name)
        graph[module] = deps
    return graph


def external_imports(module: str, lazy: bool = True, root: Path = ROOT) -> set[str]:
    """Top-level packages outside services/ imported by one module."""
    path = module_files(root)[module]
    tree = ast.parse(path.read_text(), str(path))
    return {
        n.split(".")[0]
        for n in _imports(tree, module, path.name == "__init__.py", lazy)
        if n and not n.startswith("services")
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    # NOTE: restored after: a limit left raised let tests/router/test_batch_api.py's 5,000-deep
    # JSON body parse in a later test of the same process (json's C parser obeys it).
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10000)
    try:
        for v in sorted(graph):
            if v not in index:
                strong(v)
    finally:
        sys.setrecursionlimit(limit)
    return sorted(out)


def backward_imports(
    graph: dict[str, set[str]], lower: tuple[str, ...], upper: str
) -> list[tuple[str, str]]:
    """(importer, imported) pairs where a module of `lower` packages imports `upper`."""
    pairs = []
    for module, deps in sorted(graph.items()):
        if not module.startswith(lower):
            continue
        for dep in sorted(deps):
            if dep == upper or dep.startswith(upper + "."):
                pairs.append((module, dep))
    return pairs


def line_counts(root: Path = ROOT) -> dict[str, int]:
    return {m: len(p.read_text().splitlines()) for m, p in module_files(root).items()}


ROLE_PACKAGES = ("services.prefill", "services.decode", "services.encoder")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lazy", action="store_true", help="count imports inside functions too")
    parser.add_argument("--runtime", action="store_true", help="leave out TYPE_CHECKING imports")
    parser.add_argument("--over", type=int, default=400, help="list modules longer than this")
    args = parser.parse_args()
    graph = import_graph(lazy=args.lazy, typing=not args.runtime)
    print(f"modules: {len(graph)}")
    found = cycles(graph)
    kinds = f"{'with' if args.lazy else 'without'} imports inside functions, "
    kinds += f"{'without' if args.runtime else 'with'} TYPE_CHECKING imports"
    print(f"import cycles ({kinds}): {len(found)}")
    for comp in found:
        print("  " + " <-> ".join(comp))
    back = backward_imports(import_graph(lazy=True), ROLE_PACKAGES, "services.worker")
    print(f"role packages importing services.worker: {len(back)}")
    for a, b in back:
        print(f"  {a} -> {b}")
    long = sorted(((n, m) for m, n in line_counts().items() if n > args.over), reverse=True)
    print(f"modules over {args.over} lines: {len(long)}")
    for n, m in long:
        print(f"  {n:5d} {m}")


if __name__ == "__main__":
    main()
