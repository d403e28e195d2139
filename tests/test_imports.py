"""The import graph of jaxmoe and pallas_kernels runs one way (docs DESIGN.md): no module imports itself back
through others, building blocks and models do not reach into training or checkpoint code, and the kernels know
nothing of jaxmoe. Built from the source with `ast`, every import statement counted (those inside functions
too). A package's own `__init__` is not counted as imported by its submodules (Python runs it first, but what
it re-exports is not a dependency of theirs); `from package import name` counts as importing the package's
`__init__` unless `name` is a submodule."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jaxmoe", "pallas_kernels")


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of `modules` that `module` imports (the longest known prefix of each imported name)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            names += [f"{base}.{alias.name}" for alias in node.names]
    found = set()
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {module: _imports(module, path, modules) for module, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
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


def _in(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_the_graph_covers_the_packages_and_finds_known_edges():
    graph = import_graph()
    assert "jaxmoe.io.hf" in graph and "pallas_kernels" in graph and "jaxmoe.models.phi4mm.vision" in graph
    assert "jaxmoe.io.names" in graph["jaxmoe.io.hf"]
    assert "jaxmoe.sharding" in graph["jaxmoe.io.hf"]  # `from jaxmoe import sharding`: the submodule


def test_cycle_finder_finds_a_loop():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_itself_back():
    assert _cycles(import_graph()) == []


def test_models_and_nn_do_not_import_train_or_io():
    graph = import_graph()
    bad = {m: sorted(t for t in targets if _in(t, "jaxmoe.train", "jaxmoe.io"))
           for m, targets in graph.items() if _in(m, "jaxmoe.models", "jaxmoe.nn")}
    assert {m: t for m, t in bad.items() if t} == {}


def test_nn_does_not_import_models_and_kernels_do_not_import_jaxmoe():
    graph = import_graph()
    bad = {m: sorted(t for t in targets if _in(t, "jaxmoe.models")) for m, targets in graph.items()
           if _in(m, "jaxmoe.nn")}
    bad.update({m: sorted(t for t in targets if _in(t, "jaxmoe")) for m, targets in graph.items()
                if _in(m, "pallas_kernels")})
    assert {m: t for m, t in bad.items() if t} == {}


def _registers_a_family(path: Path) -> bool:
    """Whether the module calls `families.register(...)` at its top level."""
    for node in ast.parse(path.read_text(), str(path)).body:
        call = node.value if isinstance(node, ast.Expr) else None
        if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "register"
                and isinstance(call.func.value, ast.Name) and call.func.value.id == "families"):
            return True
    return False


def test_import_jaxmoe_imports_every_model_family():
    """`jaxmoe.load_hf` dispatches by model_type through `jaxmoe.io.families`, filled as the family modules are
    imported: `import jaxmoe` must reach each of them."""
    graph, modules = import_graph(), _modules()
    registering = {m for m, path in modules.items() if _registers_a_family(path)}
    assert {"jaxmoe.io.hf", "jaxmoe.io.phi4mm"} <= registering
    reached, todo = set(), ["jaxmoe"]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo += graph[module]
    assert registering - reached == set()
