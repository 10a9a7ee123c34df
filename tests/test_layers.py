"""The package's import structure: no cycles, and data flows one way (no module imports one above it).

Every ``import``/``from ... import`` of a ``cdmap`` module counts, including imports inside functions. Imports
under ``if TYPE_CHECKING:`` count for the layer order (a type is a dependency too) but not for cycles (they never
run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "cdmap"

# The allowed order, lowest first. A module may import modules of its own layer or of lower ones.
# Within a layer, imports between different entries are allowed as long as they form no cycle.
LAYERS: list[tuple[str, ...]] = [
    ("cdmap._version", "cdmap.errors"),
    ("cdmap.process", "cdmap.allocator", "cdmap.files", "cdmap.progress", "cdmap.device", "cdmap.distributed",
     "cdmap.metrics", "cdmap.synthetic", "cdmap.doctor"),
    ("cdmap.raster", "cdmap.tiling", "cdmap.models", "cdmap.labels"),
    ("cdmap.checkpoint", "cdmap.weights"),
    ("cdmap.backends",),
    ("cdmap.inference",),
    ("cdmap.data", "cdmap.vector", "cdmap.report"),
    ("cdmap.calibrate",),
    ("cdmap.predict",),
    ("cdmap.train", "cdmap.pretrain", "cdmap.evaluate"),
    ("cdmap.demo",),
    ("cdmap.cli",),
    ("cdmap", "cdmap.__main__"),
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> int:
    best, best_len = None, -1
    for i, entries in enumerate(LAYERS):
        for e in entries:
            inside = module == e or (e != "cdmap" and module.startswith(e + "."))
            if inside and len(e) > best_len:
                best, best_len = i, len(e)
    if best is None:
        raise AssertionError(f"{module} is in no layer of tests/test_layers.py: add it where it belongs")
    return best


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    ids: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                ids.update(id(n) for n in ast.walk(child))
    return ids


def _imports(path: Path, module: str, runtime_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    skip = _type_checking_nodes(tree) if runtime_only else set()
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "cdmap")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.split(".")[0] != "cdmap":
                continue
            for a in node.names:  # ``from cdmap.raster import pair`` imports a module, not the package's names
                sub = PKG.parent / Path(*f"{name}.{a.name}".split("."))
                if sub.with_suffix(".py").exists() or (sub / "__init__.py").exists():
                    out.add(f"{name}.{a.name}")
                else:
                    out.add(name)
    return out


def _graph(runtime_only: bool = False) -> dict[str, set[str]]:
    mods = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for mod, path in mods.items():
        deps = set()
        for imp in _imports(path, mod, runtime_only):
            while imp not in mods and "." in imp:  # ``from cdmap.x import name`` where x is a module
                imp = imp.rpartition(".")[0]
            if imp in mods and imp != mod:
                deps.add(imp)
        graph[mod] = deps
    return graph


def _is_package_of(a: str, b: str) -> bool:
    return b.startswith(a + ".")


def test_no_module_imports_a_higher_layer():
    bad = []
    for mod, deps in _graph().items():
        for dep in deps:
            if _is_package_of(mod, dep):  # a package's __init__ re-exporting its own modules
                continue
            if _layer(dep) > _layer(mod):
                bad.append(f"{mod} (layer {_layer(mod)}) imports {dep} (layer {_layer(dep)})")
    assert not bad, "imports against the data flow:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    graph = _graph(runtime_only=True)
    # a package __init__ importing its own submodules is not a cycle with them
    edges = {m: {d for d in deps if not _is_package_of(m, d)} for m, deps in graph.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(edges[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("module", ["cdmap.raster.cog", "cdmap.evaluate", "cdmap.train.loop"])
def test_the_checker_sees_function_level_imports(module):
    path = PKG.joinpath(*module.split(".")[1:]).with_suffix(".py")
    if not path.exists():
        pytest.skip(f"{module} no longer exists")
    assert _imports(path, module), f"no cdmap imports found in {module}"
