"""The package's layers (DESIGN.md, "Layers") hold: imports run downward only, there are no import cycles, and
function-level imports are kept for the optional and heavy libraries deferred on purpose.

Every import statement of every module is read from its source (the AST), the ones inside functions included,
so a dependency hidden in a function counts as much as one at the top of a file.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "moecompress"

# DESIGN.md "Layers", bottom to top. A module imports only from its own layer or the ones below it.
LAYERS: list[tuple[str, ...]] = [
    ("moecompress.errors", "moecompress.folders", "moecompress.version", "moecompress.yaml_files", "moecompress.progress",
     "moecompress.logs", "moecompress.distributed"),
    ("moecompress.models", "moecompress.solvers"),
    ("moecompress.kernels",),
    ("moecompress.checkpoint",),
    ("moecompress.calibration",),
    ("moecompress.analysis",),
    ("moecompress.stages",),
    ("moecompress.pruning", "moecompress.quantization"),
    ("moecompress.export", "moecompress.evals"),
    ("moecompress.recipe",),
    ("moecompress.run_folder", "moecompress.streaming", "moecompress.pipeline", "moecompress.api"),
    ("moecompress.commands",),
    ("moecompress.cli", "moecompress.__main__"),
    ("moecompress",),  # the package itself: the public facade, above everything
]
# Libraries a function may import: the optional kernels extra, and heavy libraries deferred on purpose so that
# `import moecompress` stays light (each such import carries a comment saying so). A function may also import a
# module of the package that imports one of them at its top: that is how the library is deferred.
DEFERRED_LIBRARIES = ("triton", "matplotlib", "lm_eval", "sklearn", "datasets", "compressed_tensors",
                      "huggingface_hub", "transformers.integrations.moe")
MAX_FUNCTION_LEVEL_IMPORTS = 25


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (the deepest module of the package that the statement names)
    line: int
    in_function: bool
    external: bool
    commented: bool  # a comment on the import's line or the line above it


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE_ROOT.rglob("*.py"))}


def _targets(node: ast.Import | ast.ImportFrom, source: str, is_package: bool, modules: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = source.split(".") if is_package else source.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    # `from package import module` imports the module; `from module import name` the module itself
    return [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in modules else prefix for alias in node.names]


def collect_imports() -> list[Import]:
    modules = package_modules()
    found: list[Import] = []
    for source, path in modules.items():
        text = path.read_text()
        lines = text.splitlines()
        tree = ast.parse(text)

        def visit(node: ast.AST, in_function: bool) -> None:
            for child in ast.iter_child_nodes(node):
                nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    line = child.lineno
                    commented = "#" in lines[line - 1] or (line >= 2 and lines[line - 2].strip().startswith("#"))
                    for target in dict.fromkeys(_targets(child, source, path.name == "__init__.py", modules)):
                        external = not (target == "moecompress" or target.startswith("moecompress."))
                        found.append(Import(source, target, line, nested, external, commented))
                visit(child, nested)

        visit(tree, False)
    return found


def layer_of(module: str) -> int:
    best, best_length = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            within = module == prefix or (prefix != "moecompress" and module.startswith(prefix + "."))
            if within and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    if best is None:
        raise AssertionError(f"{module} is in no layer of DESIGN.md; add it to LAYERS (and to DESIGN.md)")
    return best


def upward_imports(imports: list[Import]) -> list[str]:
    return [f"{item.source} (line {item.line}) imports {item.target}: layer {layer_of(item.source) + 1} -> "
            f"{layer_of(item.target) + 1}" for item in imports
            if not item.external and layer_of(item.target) > layer_of(item.source)]


def import_cycles(imports: list[Import]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for item in imports:
        if not item.external and item.target != item.source:
            graph.setdefault(item.source, set()).add(item.target)
            graph.setdefault(item.target, set())
    index_of: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index_of[node] = low[node] = len(index_of)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index_of:
                connect(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index_of[successor])
        if low[node] == index_of[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index_of:
            connect(node)
    return components


def cycle_edges(imports: list[Import], component: list[str]) -> list[str]:
    members = set(component)
    return sorted({f"{item.source}:{item.line} -> {item.target}" for item in imports
                   if item.source in members and item.target in members and item.source != item.target})


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    return collect_imports()


def test_every_module_has_a_layer(imports):
    for module in package_modules():
        layer_of(module)


def test_no_import_runs_up_the_layers(imports):
    upward = upward_imports(imports)
    assert not upward, f"{len(upward)} import(s) run up the layer order of DESIGN.md:\n" + "\n".join(upward)


def test_no_import_cycles(imports):
    cycles = import_cycles(imports)
    assert not cycles, "import cycles:\n" + "\n".join(
        f"{' <-> '.join(component)}: " + "; ".join(cycle_edges(imports, component)) for component in cycles)


def is_deferred_library(module: str) -> bool:
    return any(module == library or module.startswith(library + ".") for library in DEFERRED_LIBRARIES)


def deferring_modules(imports: list[Import]) -> set[str]:
    """Modules of the package that import a deferred library at their top: importing one of them inside a function
    defers that library."""
    return {item.source for item in imports
            if item.external and not item.in_function and is_deferred_library(item.target)}


def test_function_level_imports_only_defer_optional_or_heavy_libraries(imports):
    local = [item for item in imports if item.in_function]
    deferring = deferring_modules(imports)
    not_deferred = [f"{item.source}:{item.line} imports {item.target}" for item in local
                    if not (is_deferred_library(item.target) if item.external else item.target in deferring)]
    assert not not_deferred, ("function-level imports of what a module should import at its top (only "
                              f"{', '.join(DEFERRED_LIBRARIES)} are deferred):\n" + "\n".join(not_deferred))
    uncommented = [f"{item.source}:{item.line} imports {item.target}" for item in local if not item.commented]
    assert not uncommented, "a deferred import says why in a comment on its line or the line above:\n" + "\n".join(
        uncommented)
    statements = {(item.source, item.line) for item in local}
    assert len(statements) < MAX_FUNCTION_LEVEL_IMPORTS, f"{len(statements)} function-level import statements"


def test_the_checks_see_what_they_guard():
    """The checks fail where they should: an upward import, a cycle, an undeclared deferred import."""
    made_up = [Import("moecompress.models.view", "moecompress.pipeline", 1, False, False, False),
               Import("moecompress.pruning.base", "moecompress.quantization.gptq", 2, False, False, False),
               Import("moecompress.quantization.gptq", "moecompress.pruning.base", 3, True, False, False)]
    assert upward_imports(made_up) == ["moecompress.models.view (line 1) imports moecompress.pipeline: layer 2 -> 11"]
    assert import_cycles(made_up) == [["moecompress.pruning.base", "moecompress.quantization.gptq"]]
    assert layer_of("moecompress.models.families.deepseek") == layer_of("moecompress.models") == 1
    with pytest.raises(AssertionError, match="no layer"):
        layer_of("moecompress.somewhere_new")
