"""The data package's import structure: no module-level cycle among its modules, no module reaching into
another's private names, no import of the layers above it (model, train, eval, tasks)."""

from __future__ import annotations

import ast
from pathlib import Path

import albef_ds.data

PKG = Path(albef_ds.data.__file__).parent
MODULES = sorted(p.stem for p in PKG.glob("*.py") if p.stem != "__init__")
FORBIDDEN = ("albef_ds.model", "albef_ds.train", "albef_ds.eval", "albef_ds.tasks")


def _imports(name: str) -> list[tuple[str, list[str], bool]]:
    """[(absolute module, imported names, at module level)] of albef_ds.data.<name>; an import inside a
    function body (a lazy import) is not at module level."""
    tree = ast.parse((PKG / f"{name}.py").read_text())
    lazy = set()  # ids of the nodes inside function bodies
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            lazy |= {id(n) for n in ast.walk(fn)}
    out = []
    for node in ast.walk(tree):
        module_level = id(node) not in lazy
        if isinstance(node, ast.Import):
            out += [(a.name, [], module_level) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = "albef_ds.data".split(".")[: 2 - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((mod, [a.name for a in node.names], module_level))
    return out


def _graph(*, lazy: bool) -> dict[str, set[str]]:
    """Module -> the package modules it imports (with `lazy`, also those imported inside functions)."""
    graph = {}
    for m in MODULES:
        deps = set()
        for mod, names, module_level in _imports(m):
            if not (module_level or lazy):
                continue
            if mod == "albef_ds.data":  # `from . import x` reaches submodules through the package
                deps |= {n for n in names if n in MODULES}
            elif mod.startswith("albef_ds.data."):
                deps.add(mod.split(".")[2])
        graph[m] = deps
    return graph


def _assert_acyclic(graph: dict[str, set[str]]) -> None:
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        if m in path:
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(m) :] + [m])}")
        if m in done:
            return
        for d in sorted(graph[m]):
            visit(d, path + [m])
        done.add(m)

    for m in MODULES:
        visit(m, [])


def test_imports_are_acyclic_lazy_ones_included() -> None:
    _assert_acyclic(_graph(lazy=False))
    _assert_acyclic(_graph(lazy=True))  # a lazy import must not close a circle either
    graph = _graph(lazy=False)
    # The backends sit above the layers they share: nothing below them imports them at module level.
    for m, deps in graph.items():
        assert "dali" not in deps, f"{m} imports dali at module level"
        assert "loaders" not in deps or m in ("karpathy", "vqa", "ve", "nlvr"), f"{m} imports loaders"


def test_no_private_names_across_modules() -> None:
    for m in MODULES:
        for mod, names, _ in _imports(m):
            if mod.startswith("albef_ds."):
                private = [n for n in names if n.startswith("_")]
                assert not private, f"albef_ds.data.{m} imports private {private} from {mod}"


def test_no_import_of_upper_layers() -> None:
    for m in ["__init__", *MODULES]:
        for mod, _, _ in _imports(m):
            assert not mod.startswith(FORBIDDEN), f"albef_ds.data.{m} imports {mod}"
