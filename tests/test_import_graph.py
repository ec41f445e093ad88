"""The import graph of `orchestrator/` and `trainer/`, built from the source: imports point one way.

Module-level, function-level and TYPE_CHECKING imports all count as edges. The graph must have no
cycle, the trainer must never import the orchestrator, and a function-level import may only bring
in a heavy optional dependency, never a module of this project, with a comment saying why.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("orchestrator", "trainer")
# Dependencies heavy enough (or optional enough) that importing them late is worth it.
LATE_IMPORTS_ALLOWED = {"torch", "torchvision", "timm", "ray", "submitit", "optuna", "mlflow", "matplotlib",
                        "safetensors", "triton", "playwright", "statsmodels", "scipy"}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the project module it names (the most specific one that exists)
    line: int
    in_function: bool


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of `name` that is a project module (a.b.c -> a.b when c is a function)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def _absolute(node: ast.ImportFrom, source: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = source.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports_in(tree: ast.AST) -> list[tuple[ast.AST, bool]]:
    """Every import node with whether it sits inside a function body."""
    out: list[tuple[ast.AST, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                out.append((child, in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return out


def _has_reason(lines: list[str], index: int) -> bool:
    """A comment on the import's line, on the line above, or on an import just above it (a block
    of late imports explained once)."""
    while index >= 0:
        line = lines[index].strip()
        if "#" in line:
            return True
        if index == 0 or not lines[index - 1].strip().startswith(("import ", "from ", "#")):
            return False
        index -= 1
    return False


def collect() -> tuple[list[Import], list[tuple[str, int, str, bool]]]:
    """(project imports, every function-level import as (module, line, imported name, has a reason))."""
    modules = project_modules()
    edges: list[Import] = []
    late: list[tuple[str, int, str, bool]] = []
    for source, path in modules.items():
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines), filename=str(path))
        for node, in_function in _imports_in(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                base = _absolute(node, source, path.name == "__init__.py")
                names = [f"{base}.{alias.name}" for alias in node.names] if base else []
            for name in names:
                target = _resolve(name, modules)
                if target is not None and target != source:
                    edges.append(Import(source, target, node.lineno, in_function))
                if in_function:
                    late.append((source, node.lineno, name, _has_reason(lines, node.lineno - 1)))
    return edges, late


def find_cycles(edges: list[Import]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), plus self-loops."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        graph.setdefault(edge.source, set()).add(edge.target)
        graph.setdefault(edge.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def connect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return cycles


def test_the_graph_is_read_from_the_source():
    # Guards the test itself: known edges must be seen, or an empty graph would pass everything.
    edges, _ = collect()
    pairs = {(e.source, e.target) for e in edges}
    assert ("orchestrator.store", "trainer.contract") in pairs
    assert ("trainer.loop", "trainer.contract") in pairs
    assert len(pairs) > 50


def test_cycle_finder_finds_a_planted_cycle():
    planted = [Import("a", "b", 1, False), Import("b", "c", 1, True), Import("c", "a", 1, False), Import("c", "d", 1, False)]
    assert find_cycles(planted) == [["a", "b", "c"]]


def test_no_import_cycles():
    edges, _ = collect()
    cycles = find_cycles(edges)
    details: list[str] = []
    members = {m for cycle in cycles for m in cycle}
    for edge in edges:
        if edge.source in members and edge.target in members:
            line = f"{edge.source} -> {edge.target} (line {edge.line}{', in a function' if edge.in_function else ''})"
            if line not in details:
                details.append(line)
    assert not cycles, "import cycles: " + "; ".join(" / ".join(c) for c in cycles) + "\n" + "\n".join(details)


def test_the_trainer_never_imports_the_orchestrator():
    edges, _ = collect()
    upward = [f"{e.source} -> {e.target} (line {e.line})" for e in edges
              if e.source.split(".")[0] == "trainer" and e.target.split(".")[0] == "orchestrator"]
    assert not upward, upward


def test_function_level_imports_are_heavy_optional_dependencies_with_a_reason():
    _, late = collect()
    project = [f"{m}:{line} imports {name}" for m, line, name, _ in late if name.split(".")[0] in PACKAGES]
    assert not project, "function-level imports of the project's own modules: " + "; ".join(project)
    other = [f"{m}:{line} imports {name}" for m, line, name, _ in late if name.split(".")[0] not in LATE_IMPORTS_ALLOWED]
    assert not other, "function-level imports of light modules (import them at the top): " + "; ".join(other)
    unexplained = [f"{m}:{line} imports {name}" for m, line, name, reason in late if not reason]
    assert not unexplained, "function-level imports without a one-line reason: " + "; ".join(unexplained)
