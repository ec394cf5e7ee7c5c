"""The package's shape: no import cycles, no private names across modules, one home per fact.

The import graph is read from the source (every `import`, module-level or inside a function: a lazy
import that closes a circle is still a circle), so nothing is imported to check it."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "esxi_anomaly"


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _owner(dotted: str) -> str:
    """The package that may use a private module or name: the part before its first private component."""
    parts = dotted.split(".")
    first = next((i for i, part in enumerate(parts) if _is_private(part)), len(parts) - 1)
    return ".".join(parts[:first])


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def import_graph(modules: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """Edges module -> modules it imports (inside the package), and every private name used across
    modules, as 'importer: name'."""
    edges: dict[str, set[str]] = {}
    private: list[str] = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = edges.setdefault(name, set())
        aliases: dict[str, str] = {}   # local name -> module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "esxi_anomaly":
                        targets.add(alias.name)
                        if alias.asname:
                            aliases[alias.asname] = alias.name
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:   # relative: resolved against this module's package
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                if base.split(".")[0] != "esxi_anomaly":
                    continue
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    target = full if full in modules else base
                    targets.add(target)
                    if full in modules:
                        aliases[alias.asname or alias.name] = full
                    used = full if (full in modules or _is_private(alias.name)) else base
                    if any(_is_private(p) for p in used.split(".")) and not _inside(name, _owner(used)):
                        private.append(f"{name}: {used}")
        for node in ast.walk(tree):   # module._name
            if (isinstance(node, ast.Attribute) and _is_private(node.attr) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and not _inside(name, aliases[node.value.id])):
                private.append(f"{name}: {aliases[node.value.id]}.{node.attr}")
        targets.discard(name)
    return edges, sorted(set(private))


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycles():
    edges, _ = import_graph(module_files())
    assert cycles(edges) == []


def test_no_private_names_across_modules():
    _, private = import_graph(module_files())
    assert private == []


# -- the checker itself must be able to fail -----------------------------------------------------

def _package(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    for rel, text in files.items():
        path = tmp_path / "esxi_anomaly" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return module_files(tmp_path / "esxi_anomaly")


def test_checker_finds_a_cycle_through_a_lazy_import(tmp_path):
    modules = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "from esxi_anomaly import b\n",
        "b.py": "def f():\n    from esxi_anomaly.c import g\n",
        "c.py": "import esxi_anomaly.a\n",
        "d.py": "from esxi_anomaly import a\n",
    })
    assert cycles(import_graph(modules)[0]) == [["esxi_anomaly.a", "esxi_anomaly.b", "esxi_anomaly.c"]]


@pytest.mark.parametrize("text, found", [
    ("from esxi_anomaly.pkg.mod import _hidden\n", ["esxi_anomaly.user: esxi_anomaly.pkg.mod._hidden"]),
    ("from esxi_anomaly.pkg import mod as m\nx = m._hidden\n", ["esxi_anomaly.user: esxi_anomaly.pkg.mod._hidden"]),
    ("from esxi_anomaly.pkg._inner import thing\n", ["esxi_anomaly.user: esxi_anomaly.pkg._inner"]),
    ("from esxi_anomaly.pkg.mod import public\nfrom esxi_anomaly.pkg import mod\nx = mod.public\n", []),
])
def test_checker_finds_private_names_used_from_outside(tmp_path, text, found):
    modules = _package(tmp_path, {
        "__init__.py": "", "pkg/__init__.py": "from esxi_anomaly.pkg._inner import thing\n",
        "pkg/_inner.py": "thing = 1\n", "pkg/mod.py": "from esxi_anomaly.pkg._inner import thing\n_hidden = public = 1\n",
        "user.py": text,
    })
    assert import_graph(modules)[1] == found
