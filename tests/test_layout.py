"""The package layout: no module imports, at import time, a module that (through others) imports it back.

An import circle makes a module's names depend on which module happened to be imported first, and
hides which one is the lower layer. The graph is read from the source (no import runs): every
``import`` statement outside a function body of solo/, megatron_patch/ and data_prep/, with the
package ``__init__`` modules that importing a submodule runs.
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("solo", "megatron_patch", "data_prep")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _import_statements(body, in_functions: bool):
    """The import statements of a module body: those that run when it is imported, and with
    ``in_functions`` also those inside its functions (deferred imports)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not in_functions:
            continue
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                yield from _import_statements(getattr(node, field, []) or [], in_functions)


def _is_type_checking(node) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def import_graph(in_functions: bool = False) -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        body = [node for node in ast.parse(path.read_text(encoding="utf-8")).body if not _is_type_checking(node)]
        targets = set()
        for node in _import_statements(body, in_functions):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
        edges = set()
        for target in targets:
            parts = target.split(".")
            for end in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b first
                module = ".".join(parts[:end])
                # The importer's own packages are already being imported: no edge back to them.
                if module in modules and module != name and not name.startswith(module + "."):
                    edges.add(module)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]):
    """One import circle as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_circle_among_the_packages():
    graph = import_graph()
    assert {"solo.checkpoints", "megatron_patch.checkpointing", "megatron_patch.convert"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_circle_through_deferred_imports_of_the_model_stack():
    """Imports inside functions (deferred for start-up time) do not close a circle either, in solo/ and
    megatron_patch/: the checkpointing <-> conversion circle was one."""
    graph = import_graph(in_functions=True)
    stack = {name: {m for m in edges if not m.startswith("data_prep")}
             for name, edges in graph.items() if not name.startswith("data_prep")}
    cycle = find_cycle(stack)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_checkpoint_format_sits_below_checkpointing_and_conversion():
    graph = import_graph(in_functions=True)  # deferred imports count here: they made the old circle
    assert "solo.checkpoints" in graph["megatron_patch.checkpointing"]
    assert "solo.checkpoints" in graph["megatron_patch.convert"]
    assert "megatron_patch.checkpointing" not in graph["megatron_patch.convert"]
    assert "megatron_patch.convert" not in graph["megatron_patch.checkpointing"]
    assert not any(module.startswith("megatron_patch") for module in graph["solo.checkpoints"])


def test_the_cycle_finder_sees_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
