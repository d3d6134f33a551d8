"""The package's shape: imports inside `softprompt/` form no cycle, and the library never imports its front end
(`softprompt.commands`); only the command layer and `__main__` may; and no function is over 60 lines.

Every import counts, at module level or inside a function: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import softprompt

ROOT = Path(softprompt.__file__).parent
FRONT = "softprompt.commands"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: modules of softprompt it imports}; `from pkg import sub` counts as importing the submodule."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    target = f"{anchor}.{node.module}" if node.module else anchor
                else:
                    target = node.module
                found.add(target)
                found |= {f"{target}.{a.name}" for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
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
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_finds_what_a_module_imports():
    graph = import_graph()
    assert "softprompt.data.tasks" in graph["softprompt.data"]  # a package's face, relative import
    assert "softprompt.errors" in graph["softprompt.data.encoding"]  # `from ..errors import`
    assert "softprompt.families" in graph["softprompt.base"]
    assert FRONT in graph["softprompt.__main__"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_inside_the_package():
    assert cycles(import_graph()) == []


def test_the_library_never_imports_the_command_layer():
    upward = {
        m: sorted(t for t in targets if t == FRONT or t.startswith(FRONT + "."))
        for m, targets in import_graph().items()
        if m != "softprompt.__main__" and not (m == FRONT or m.startswith(FRONT + "."))
    }
    assert {m: t for m, t in upward.items() if t} == {}


def test_no_function_is_longer_than_60_lines():
    long = []
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert long == []
