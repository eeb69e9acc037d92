"""The package's shape is a rule, checked here (docs/architecture.md): modules are grouped by
stage, a stage imports only from itself and earlier stages (imports inside functions count),
the module import graph has no cycle, no module imports another's private names, and nothing
decides by a model's class name."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "kvpass"

#: kvpass's stages in import order: a module may import from its own stage and earlier ones
STAGES = ["errors", "util", "assets", "semantics", "ir", "graph", "kernels", "runtime", "transform", "compile",
          "eval", "search", "checkpoint", "cli", "_compat", "kvpass"]


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "kvpass"


def imports(module: str) -> list[tuple[str, list[str], int]]:
    """(imported kvpass module, names taken from it, line) for every import in ``module``,
    at any depth (function-level imports included)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "kvpass"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "kvpass":
                continue
            plain = []
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in MODULES:  # ``from pkg import module``
                    out.append((sub, [], node.lineno))
                else:
                    plain.append(a.name)
            if plain:
                out.append((target, plain, node.lineno))
    return out


def test_every_module_belongs_to_a_stage():
    assert {stage(m) for m in MODULES} <= set(STAGES), sorted({stage(m) for m in MODULES} - set(STAGES))


def test_no_module_imports_from_a_later_stage():
    bad = []
    for m in MODULES:
        for target, _, line in imports(m):
            if target not in MODULES:  # an old path (kvpass._compat) or a typo
                bad.append(f"{MODULES[m].relative_to(ROOT.parent)}:{line}: imports {target}, which is no module")
            elif STAGES.index(stage(target)) > STAGES.index(stage(m)):
                bad.append(f"{MODULES[m].relative_to(ROOT.parent)}:{line}: {stage(m)} imports {target} "
                           f"({stage(target)}, a later stage)")
    assert not bad, "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), and self-loops."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_cycle():
    graph = {m: {t for t, _, _ in imports(m) if t in MODULES and t != m} for m in MODULES}
    assert not _cycles(graph), _cycles(graph)


def test_the_cycle_finder_finds_cycles():
    """The check above can fail: a two-module loop and a three-module loop are reported."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_private_names_cross_modules():
    """``from kvpass.x import _y`` and ``x._y`` on an imported kvpass module are private
    reaches into another module: such helpers are public where they are shared."""
    bad = []
    for m, path in MODULES.items():
        if m == "kvpass._compat":
            continue
        tree = ast.parse(path.read_text())
        aliases = set()
        for target, names, line in imports(m):
            bad += [f"{m}:{line}: {target}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("kvpass")):
                aliases |= {a.asname or a.name for a in node.names}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{m}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not bad, "\n".join(bad)


def test_nothing_decides_by_a_model_class_name():
    """Causality and model kind come from what the graph or the model does, not from
    ``type(model).__name__`` (models nobody named must work)."""
    pattern = re.compile(r"type\([^)]*\)\.__name__\s*(==|!=|in\b|\.endswith|\.startswith)|"
                         r"[\"'][A-Za-z]*For[A-Z][A-Za-z]*[\"']\s*(not\s+)?in\s+type\(")
    bad = [f"{p.relative_to(ROOT.parent)}:{i}: {line.strip()}" for p in MODULES.values()
           for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("old", ["kvpass.api", "kvpass.lower", "kvpass.policy", "kvpass.codegen.ops",
                                 "kvpass.passes.window", "kvpass.sites", "kvpass.cache"])
def test_old_import_paths_still_work_with_a_warning(old):
    """The flat layout's module paths resolve for one release (kvpass._compat), warning."""
    import importlib

    from kvpass._compat import OLD_PATHS

    mod = importlib.import_module(old)
    new = importlib.import_module(OLD_PATHS[old][0])
    name = next(n for n in getattr(new, "__all__", dir(new)) if not n.startswith("_"))
    with pytest.warns(DeprecationWarning, match="moved to"):
        assert getattr(mod, name) is getattr(new, name)
