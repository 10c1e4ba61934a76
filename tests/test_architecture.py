"""The layers of src/qatune only point down, and no modules import each other in a circle
(docs/architecture.md draws the layers). Every import counts, inside functions too: an import
moved into a function still makes the module depend on its target.

A failure names the file and line of each offending import."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "qatune"

# Bottom to top: a top-level package or module may import its own members and anything in a
# lower layer, never a higher one, nor a neighbour in its own layer.
LAYERS: list[tuple[str, ...]] = [
    ("", "errors"),  # "": the package's own __init__ (its version), which imports nothing
    ("utils", "config"),
    ("data",),
    ("model",),
    ("runs",),
    ("kernels",),
    ("generation",),
    ("rl",),
    ("train",),
    ("methods",),
    ("launch", "export", "analysis", "config_docs"),
    ("check", "demo", "serve"),
    ("cli",),
    ("__main__",),
]
# Inside `methods`: a method's package may use the shared pieces (pairs, online), never another
# method, the registry (`qatune.methods` itself) or the whole config.
METHOD_SHARED = ("pairs", "online")
METHOD_TOP = ("", "config")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported qatune module, line) for every import in the file, at any depth. `from a import b`
    counts as importing a.b when that is a module, else a."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in known else base, node.lineno))
    ours = [(m, line) for m, line in found if m == PACKAGE or m.startswith(PACKAGE + ".")]
    return sorted(set(ours), key=lambda x: (x[1], x[0]))  # `from a import b, c`: one edge per module


def graph() -> dict[str, list[tuple[str, int]]]:
    known = modules()
    return {name: [(m, ln) for m, ln in imports(name, path, known) if m != name] for name, path in known.items()}


def rank(module: str) -> tuple[int, str]:
    unit = module.split(".")[1] if "." in module else ""
    for i, layer in enumerate(LAYERS):
        if unit in layer:
            return i, unit
    raise AssertionError(f"{module}: its top-level name {unit!r} is in no layer of tests/test_architecture.py")


def where(module: str, line: int) -> str:
    return f"{modules()[module].relative_to(SRC.parent)}:{line}"


def test_every_module_has_a_layer():
    for name in modules():
        rank(name)


def test_imports_only_point_down():
    bad = []
    for source, targets in graph().items():
        (mine, unit) = rank(source)
        for target, line in targets:
            theirs, their_unit = rank(target)
            if theirs > mine or (theirs == mine and their_unit != unit):
                bad.append(f"{where(source, line)}: {source} (layer {mine}) imports {target} (layer {theirs})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def method_part(module: str) -> str | None:
    """`sft` for qatune.methods.sft.method, '' for qatune.methods, None outside methods."""
    parts = module.split(".")
    if parts[:2] != [PACKAGE, "methods"]:
        return None
    return parts[2] if len(parts) > 2 else ""


def test_methods_do_not_import_each_other():
    bad = []
    for source, targets in graph().items():
        mine = method_part(source)
        if mine is None or mine in METHOD_TOP:
            continue
        for target, line in targets:
            theirs = method_part(target)
            if theirs is None or theirs == mine:
                continue
            if theirs in METHOD_TOP or mine in METHOD_SHARED or theirs not in METHOD_SHARED:
                bad.append(f"{where(source, line)}: {source} imports {target}")
    assert not bad, "a method imports another method, the registry or the whole config:\n" + "\n".join(bad)


def cycles(edges: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w, _ in edges.get(v, []):
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
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    edges = graph()
    report = []
    for component in cycles(edges):
        inside = set(component)
        lines = [f"  {where(s, ln)}: {s} imports {t}" for s in component for t, ln in edges[s] if t in inside]
        report.append(f"cycle of {len(component)} modules:\n" + "\n".join(lines))
    assert not report, "\n".join(report)


def test_the_checks_catch_what_they_should():
    """The cycle finder and the layer order on a made-up graph: a -> b -> a is one cycle."""
    assert cycles({"a": [("b", 1)], "b": [("a", 2)], "c": [("a", 3)]}) == [["a", "b"]]
    assert rank("qatune.data.batching")[0] < rank("qatune.train.step")[0] < rank("qatune.methods.sft")[0]
