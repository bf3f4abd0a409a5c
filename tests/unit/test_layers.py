"""The package's layers (README, "Code layout"): a module imports only from its own layer or lower ones.

Imports are read from the source with ``ast`` (nothing is imported), those inside functions included:
a lazy import is still a dependency. ``from P import name`` depends on ``P.name`` when that is a
module, else on ``P``. Imports through ``importlib`` (the lazy ``data`` and ``train`` packages) stay
inside their own package and are not read.
"""

import ast
import pathlib

import pytest

PACKAGE = "hybrid_distill_jax"
ROOT = pathlib.Path(__file__).resolve().parents[2] / PACKAGE

# Lowest first; names relative to the package ("" is the package itself). A module is in the layer of
# the longest name here that is it or one of its parent packages.
LAYERS = (
    ("errors", ("", "errors", "checks", "registry")),
    ("process", ("signals", "workdir_lock", "hardware")),
    ("primitives", ("losses", "masking", "parallel", "aot")),
    ("models", ("models",)),
    ("teachers", ("teachers",)),
    ("data", ("data",)),
    ("eval", ("eval",)),
    ("step", ("optim", "train.step", "train.program", "train.checkpoint", "train.metrics")),
    ("terms", ("terms",)),
    ("tasks", ("tasks",)),
    ("config", ("config_lib", "config_file", "recipes")),
    ("trainer", ("train",)),
    ("experiments", ("experiments",)),
    ("main", ("main",)),
    ("compile", ("compile",)),
)

# The upward imports of today, (importer, imported) -> why it is there and what removes it. Each must
# still occur (a stale entry fails too).
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}


def _modules() -> dict[str, pathlib.Path]:
    """Every module of the package by its name relative to the package."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _relative(name: str) -> str | None:
    """'hybrid_distill_jax.a.b' -> 'a.b' ('' for the package), None outside the package."""
    if name == PACKAGE:
        return ""
    return name[len(PACKAGE) + 1 :] if name.startswith(PACKAGE + ".") else None


def _import_nodes(module: str):
    path = MODULES[module]
    return [
        n
        for n in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(n, ast.Import | ast.ImportFrom)
    ]


def _imports(module: str) -> set[str]:
    """The package modules ``module`` imports (absolute imports; relative ones fail a test below)."""
    found = set()
    for node in _import_nodes(module):
        if isinstance(node, ast.Import):
            found.update(_relative(alias.name) for alias in node.names)
        elif not node.level and (source := _relative(node.module)) is not None:
            for alias in node.names:
                child = f"{source}.{alias.name}" if source else alias.name
                found.add(child if child in MODULES else source)
    found.discard(None)
    return found


def _covers(prefix: str, module: str) -> bool:
    return module == prefix or bool(prefix) and module.startswith(prefix + ".")


def layer_of(module: str) -> int:
    """The index in LAYERS of ``module``'s layer (its longest covering name)."""
    matches = [
        (len(prefix), i)
        for i, (_, prefixes) in enumerate(LAYERS)
        for prefix in prefixes
        if _covers(prefix, module)
    ]
    if not matches:
        pytest.fail(f"{PACKAGE}.{module} is in no layer: add it to LAYERS here and to the README")
    return max(matches)[1]


def _upward() -> set[tuple[str, str]]:
    return {
        (module, target)
        for module in MODULES
        for target in _imports(module)
        if layer_of(target) > layer_of(module)
    }


def test_every_module_is_in_a_layer_and_imports_absolutely():
    for module in MODULES:
        layer_of(module)
        relative = [
            node.lineno for node in _import_nodes(module) if isinstance(node, ast.ImportFrom) and node.level
        ]
        assert not relative, (
            f"{PACKAGE}.{module}: relative imports at lines {relative} (this scan reads absolute ones)"
        )


def test_no_module_imports_from_a_higher_layer():
    names = [name for name, _ in LAYERS]
    unexpected = [
        f"{PACKAGE}.{a} ({names[layer_of(a)]}) imports {PACKAGE}.{b} ({names[layer_of(b)]})"
        for a, b in sorted(_upward() - set(ALLOWED_UPWARD))
    ]
    assert not unexpected, "imports from a higher layer:\n" + "\n".join(unexpected)


def test_every_allowed_exception_still_occurs():
    stale = sorted(set(ALLOWED_UPWARD) - _upward())
    assert not stale, f"drop these from ALLOWED_UPWARD, they no longer occur: {stale}"


def test_the_scan_sees_lazy_and_from_imports():
    """The reader finds a top-level import, an import inside a function and a ``from P import module``."""
    assert "config_lib" in _imports("main")  # inside run_config()
    assert "signals" in _imports("config_lib")  # from hybrid_distill_jax import signals, ...
    assert "data" in _imports("eval.diagnostics")  # inside a function
    assert "errors" in _imports("losses")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (or with a self-loop), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _module_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports; a registry package (``registry.import_submodules``)
    imports each of its modules."""
    graph = {}
    for module, path in MODULES.items():
        graph[module] = _imports(module)
        if path.name == "__init__.py" and "import_submodules(__name__, __path__)" in path.read_text():
            graph[module] |= {m for m in MODULES if m.rpartition(".")[0] == module}
    return graph


def test_no_module_is_part_of_an_import_cycle():
    cycles = _cycles(_module_graph())
    assert not cycles, "import cycles between modules:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_no_import_cycle_between_top_level_folders():
    """The package's top-level folders and modules (``teachers``, ``models``, ``main``, ...) as nodes."""
    top = lambda module: module.split(".")[0]  # noqa: E731
    graph: dict[str, set[str]] = {}
    for module, targets in _module_graph().items():
        graph.setdefault(top(module), set()).update(top(t) for t in targets if top(t) != top(module))
    cycles = _cycles(graph)
    assert not cycles, "cycles between top-level folders:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}, "e": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"], ["d"]]
