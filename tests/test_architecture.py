"""The package's shape, checked from its source: no import cycles, entry points apart, config at the bottom."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "neuroray"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every neuroray module ``path`` imports, at module level or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("neuroray"):
            for alias in node.names:  # ``from neuroray.pkg import submodule`` imports the submodule
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in modules else node.module)
    return out & set(modules)


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def _entry_points(modules) -> set[str]:
    """What ``python -m neuroray.<cmd>`` runs: the shims and the cli package."""
    shims = {name for name, path in modules.items() if "if __name__ == \"__main__\"" in path.read_text()}
    return shims | {name for name in modules if name.startswith("neuroray.cli")} | {
        name for name in modules if name.endswith("__main__")}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_no_library_module_imports_an_entry_point():
    modules = _modules()
    entry = _entry_points(modules)
    graph = _graph()
    offenders = {name: sorted(graph[name] & entry) for name in graph
                 if name not in entry and graph[name] & entry}
    assert offenders == {}


def test_entry_point_shims_are_thin():
    modules = _modules()
    shims = [p for n, p in modules.items() if n in _entry_points(modules) and not n.startswith("neuroray.cli")]
    assert shims, "the python -m neuroray.<cmd> shims were not found"
    for path in shims:
        tree = ast.parse(path.read_text())
        defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        assert not defs, f"{path} defines {[d.name for d in defs]}: entry-point code belongs in neuroray/cli"


def test_config_sits_at_the_bottom():
    assert _graph()["neuroray.config"] <= {"neuroray.errors"}


def test_every_package_says_its_job():
    for init in PACKAGE.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 40, f"{init} needs a docstring saying the package's job"
