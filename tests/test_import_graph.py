"""The import graph of ``ckdiff``: no import cycle inside a package.

Every import counts, the ones inside functions too (a function-level import only hides a cycle from the
interpreter)."""
from __future__ import annotations

import ast
from pathlib import Path

import ckdiff

ROOT = Path(ckdiff.__file__).parent

# package -> modules of a cycle allowed to remain: none, every package's imports form a DAG
ALLOWED: dict = {}


def _modules() -> dict:
    out = {}
    for p in ROOT.rglob("*.py"):
        rel = p.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(name: str, path: Path, known: set) -> set:
    is_pkg = path.name == "__init__.py"
    pkg = name if is_pkg else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return {m for m in out if m in known and m != name}


def _cycles(graph: dict) -> list:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def package_cycles() -> dict:
    mods = _modules()
    edges = {m: _imports(m, p, set(mods)) for m, p in mods.items()}
    found: dict = {}
    for pkg in {m.rsplit(".", 1)[0] for m in mods if m.count(".") >= 1}:
        inside = {m for m in mods if m.rsplit(".", 1)[0] == pkg and m != pkg}
        graph = {m: edges[m] & inside for m in inside}
        for comp in _cycles(graph):
            found.setdefault(pkg, set()).update(m.rsplit(".", 1)[1] for m in comp)
    return found


def test_no_import_cycle_inside_a_package_beyond_the_listed_ones():
    found = package_cycles()
    new = {pkg: sorted(mods - ALLOWED.get(pkg, set())) for pkg, mods in found.items() if mods - ALLOWED.get(pkg, set())}
    assert not new, f"import cycles inside a package beyond the allowance: {new}"
    broken = {pkg: sorted(ALLOWED[pkg] - found.get(pkg, set())) for pkg in ALLOWED if ALLOWED[pkg] - found.get(pkg, set())}
    assert not broken, f"these modules left their cycle: remove them from ALLOWED: {broken}"


def test_cycle_finder_can_fail():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert _cycles({"a": {"b"}, "b": set()}) == []
