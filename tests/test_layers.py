"""The library's layers: every import of the installed packages points down (or sideways within a layer), and no
module imports itself back through others. Counted from the source text, so an import inside a function or under
`TYPE_CHECKING` counts as much as one at the top of a module, and a package's `__init__` is a module of its own.

The layers, bottom up (`docs/layout.md` says what each holds):
0. `modeling_wemoe`: the code every artifact ships;
1. foundation: plain types, validation and file I/O (recipe, data specs, task streams, evaluation results,
   checkpoints, outputs, the backbone interface and registry);
2. the family plug-ins, `wemoe.backbones`;
3. the stages: merge (static and WEMoE), adapt, evaluate, publish;
4. the command-line tools, the demo and the package's API (`wemoe/__init__.py`).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Installed package -> its folder in the repository (pyproject.toml's package-dir).
PACKAGES = {
    "modeling_wemoe": ROOT / "modeling_wemoe",
    "wemoe": ROOT / "conversion",
    "wemoe.model_cards": ROOT / "model_cards",
}

LAYERS = {
    0: ["modeling_wemoe", "modeling_wemoe.*"],
    1: [
        "wemoe.specs", "wemoe.corruptions", "wemoe.data", "wemoe.streams", "wemoe.results", "wemoe.checkpoints",
        "wemoe.outputs", "wemoe.artifact", "wemoe.merge_methods", "wemoe.backbone", "wemoe.recipe",
    ],
    2: ["wemoe.backbones", "wemoe.backbones.*"],
    3: [
        "wemoe.build", "wemoe.merge", "wemoe.adamerging", "wemoe.adaptation", "wemoe.evaluation", "wemoe.model_card",
        "wemoe.model_cards", "wemoe.convert", "wemoe.add_task", "wemoe.update_code",
    ],
    4: ["wemoe", "wemoe.cli", "wemoe.cli.*", "wemoe.toy"],
}  # fmt: skip


def module_files() -> dict[str, Path]:
    """Every module of the installed packages, by its import name."""
    modules = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """The package modules `name` imports, each with the line of its import statement: `from X import n` counts as
    importing `X.n` when that is a module, else `X` (a package's `__init__` included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.append((submodule if submodule in modules else base, node.lineno))
    return sorted({(module, line) for module, line in found if module in modules and module != name})


def import_graph() -> tuple[dict[str, Path], dict[str, list[tuple[str, int]]]]:
    modules = module_files()
    return modules, {name: imported_modules(name, path, modules) for name, path in modules.items()}


def layer_of(module: str) -> int | None:
    for layer, patterns in LAYERS.items():
        for pattern in patterns:
            if module == pattern or (pattern.endswith(".*") and module.startswith(pattern[:-1])):
                return layer
    return None


def circles(graph: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each a set of modules that
    import one another through some path."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target, _ in graph[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    return components


def test_the_import_graph_is_read_from_every_module():
    """The graph holds what the source says: an import at module level, one inside a function and a package's
    `__init__` importing its plug-ins (so a test that found nothing could not pass by accident)."""
    modules, graph = import_graph()
    assert {"wemoe", "wemoe.backbones.clip", "wemoe.cli.tta", "modeling_wemoe.modeling_wemoe_t5"} <= set(modules)
    targets = {name: {target for target, _ in edges} for name, edges in graph.items()}
    assert "wemoe.merge" in targets["wemoe.convert"]
    assert "wemoe.backbone" in targets["wemoe.backbones.clip"]
    assert "wemoe.backbone" in targets["wemoe.backbones"]
    assert "modeling_wemoe.modeling_wemoe" in targets["modeling_wemoe.modeling_wemoe_clip"]


def test_every_module_has_a_layer():
    modules, _ = import_graph()
    assert [module for module in modules if layer_of(module) is None] == [], "add each new module to LAYERS"


def test_no_module_imports_itself_back():
    _, graph = import_graph()
    found = circles(graph)
    described = [
        " -> ".join(component) + ": " + "; ".join(
            f"{module} imports {target} (line {line})"
            for module in component for target, line in graph[module] if target in component
        )
        for component in found
    ]  # fmt: skip
    assert found == [], "import circles:\n" + "\n".join(described)


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_imports_point_down(layer):
    modules, graph = import_graph()
    upward = [
        f"{module} (layer {layer}) imports {target} (layer {layer_of(target)}) at {modules[module].name}:{line}"
        for module, edges in graph.items() if layer_of(module) == layer
        for target, line in edges if (layer_of(target) or 0) > layer
    ]  # fmt: skip
    assert upward == []
