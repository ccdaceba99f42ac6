"""The package's layout: imports run one way (no circle between modules) and docs/architecture.md
names every package and module that exists."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# installed package name -> source folder (pyproject's package-dir)
PACKAGE_DIRS = {"lifelong_moe": ROOT / "lifelong_moe", "lifelong_moe.streams": ROOT / "streams",
                "lifelong_moe.strategies": ROOT / "strategies"}


def project_modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in PACKAGE_DIRS.items():
        for f in sorted(folder.rglob("*.py")):
            parts = list(f.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([pkg, *parts])] = f
    return mods


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports, at module level or inside functions alike."""
    def owner(name: str) -> str | None:
        while name:
            if name in mods:
                return name
            name = name.rpartition(".")[0]
        return None

    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" for a in node.names]  # a submodule, or a name of `base`
            else:
                continue
            deps |= {m for m in map(owner, targets) if m and m != name}
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_circle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(g) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_reads_relative_and_lazy_imports(tmp_path):
    mods = project_modules()
    graph = import_graph(mods)
    # a lazy import inside a function counts: the CLI imports the bench modules only when called
    assert "lifelong_moe.bench.moe_adapters" in graph["lifelong_moe.cli"]
    # ``from ..runtime import distributed`` names a submodule
    assert "lifelong_moe.runtime.distributed" in graph["lifelong_moe.runs.runner"]


def test_imports_run_one_way():
    found = cycles(import_graph(project_modules()))
    assert found == [], "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_architecture_doc_names_every_package_and_module():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`([a-z_]+(?:/[a-z_]+)*(?:\.py|/))`", doc))
    files = [f for folder in PACKAGE_DIRS.values() for f in folder.rglob("*.py")]
    packages = {f.parent.relative_to(ROOT).as_posix() + "/" for f in files if f.name == "__init__.py"}
    modules = {f.relative_to(ROOT).as_posix() for f in files if f.name != "__init__.py"}
    missing = (packages | modules) - named
    stale = [n for n in named if "/" in n.rstrip("/") and not (ROOT / n).exists()]
    assert not missing, f"docs/architecture.md does not name: {sorted(missing)}"
    assert not stale, f"docs/architecture.md names files that do not exist: {sorted(stale)}"
