"""The layers of docs/architecture.md hold: imports run one way (scripts -> tools -> model; among the tools, training
and conversion -> publishing, training -> cli and fast_paths, never training -> conversion), the model files (what a
checkpoint ships) import only each other, torch and transformers, and no two modules import each other in a circle."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "modeling_mfm"
MODEL = {"modeling_mfm", "modeling_mfm.configuration_mfm", "modeling_mfm.modeling_mfm", "modeling_mfm.frequency",
         "modeling_mfm.corruptions"}
# what each layer may import from the package (a module or package name, and what lies under it)
ALLOWED = {
    "model": ("modeling_mfm.configuration_mfm", "modeling_mfm.modeling_mfm", "modeling_mfm.frequency",
              "modeling_mfm.corruptions"),
    "cli": (),  # the command-line shape every script shares, conversion scripts too: nothing of the package
    "fast_paths": ("modeling_mfm.fast_paths", *MODEL),
    "publishing": ("modeling_mfm.publishing", *MODEL),
    "conversion": ("modeling_mfm.conversion", "modeling_mfm.publishing", *MODEL),
    "training": ("modeling_mfm.training", "modeling_mfm.cli", "modeling_mfm.publishing", "modeling_mfm.fast_paths",
                 *MODEL),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; ``from . import x`` counts as ``package.x``)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {module for module in found if module}


def package_graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: {m for m in imported_modules(path) if m in modules and m != name} for name, path in modules.items()}


def layer(module: str) -> str:
    if module in MODEL:
        return "model"
    return module.split(".")[1]


def allowed(target: str, names: tuple[str, ...]) -> bool:
    """``target`` is one of ``names`` or lies under one of them (``modeling_mfm`` itself: its ``__init__`` only)."""
    return any(target == name or (name != "modeling_mfm" and target.startswith(name + ".")) for name in names)


def test_imports_run_one_way():
    assert allowed("modeling_mfm.training.run.trackers", ALLOWED["training"])  # the check works
    assert not allowed("modeling_mfm.conversion.release", ALLOWED["training"])
    assert not allowed("modeling_mfm.publishing.hub", ALLOWED["model"])
    wrong = []
    for module, imports in package_graph().items():
        wrong += [f"{module} -> {target}" for target in imports if not allowed(target, ALLOWED[layer(module)])]
    assert not wrong, f"imports against the layering of docs/architecture.md: {wrong}"


def test_the_model_files_import_only_each_other_torch_and_transformers():  # and numpy, a transformers dependency
    standard = set(sys.stdlib_module_names)
    for name in MODEL - {"modeling_mfm"}:
        path = PACKAGE / f"{name.split('.')[1]}.py"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1, f"{path.name}: remote code must use flat relative imports"
                continue
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) else [])
            for imported in names:
                top = imported.split(".")[0]
                assert top in standard or top in ("torch", "transformers", "numpy"), f"{path.name} imports {imported}"


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_no_import_cycles():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check works
    graph = package_graph()
    # a package's __init__ importing its own children is not a cycle between modules
    graph = {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in graph.items()}
    assert not import_cycles(graph), f"import cycles: {import_cycles(graph)}"


def test_the_package_never_imports_scripts_or_benchmarks():
    for module, path in ((module_name(p), p) for p in PACKAGE.rglob("*.py")):
        for imported in imported_modules(path):
            assert not imported.startswith(("run_scripts", "benchmarks", "step_benchmark", "plain_step")), (
                f"{module} imports {imported}"
            )
