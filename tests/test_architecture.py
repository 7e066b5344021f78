"""The package's shape: imports point one way through the stages (recipe -> plan -> data -> models ->
evaluation -> training -> commands), with no cycle, counting imports inside functions too. Read from the AST, so
nothing is imported to check it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "finsft"

# Lower numbers are lower layers; a module may import its own package or a strictly lower layer.
LAYERS: dict[str, int] = {
    # errors at the bottom; the file gates (finsft.files) use only errors and serve every layer above
    "finsft.errors": -2, "finsft.files": -1,
    "finsft": 0, "finsft.quiet": 0, "finsft.progress": 0, "finsft.allocator": 0,
    "finsft.testing": 0,
    "finsft.templates": 1, "finsft.data_formats": 1,
    "finsft.recipe": 2,
    "finsft.plan": 3, "finsft.chat": 3,
    "finsft.data": 4,
    "finsft.data_sources": 5,
    "finsft.models": 6,
    "finsft.merge": 7, "finsft.gguf_export": 7, "finsft.evaluation": 7, "finsft.publish": 7,
    "finsft.preflight": 8,
    "finsft.training": 9,
    "finsft.bench": 10, "finsft.commands": 10, "finsft.docs": 10, "finsft.library_schema": 10, "finsft.cli": 11,
    "finsft.__main__": 12,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit(module: str) -> str:
    """The layer unit of a module: its stage package (finsft.training) or top-level module (finsft.merge)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def finsft_imports(path: Path) -> set[str]:
    """Every finsft module ``path`` imports, at any depth (function-level imports count)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    me = module_name(path)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            if base == "finsft" or base.startswith("finsft."):
                out.add(base)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name == "finsft" or a.name.startswith("finsft."))
    return out


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def test_every_module_has_a_layer() -> None:
    assert {unit(m) for m in MODULES} <= set(LAYERS), "add new modules to LAYERS (and to README's Architecture)"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module: str) -> None:
    mine = unit(module)
    for target in sorted(finsft_imports(MODULES[module])):
        if target == "finsft":
            continue  # the package itself: only __version__
        theirs = unit(target)
        assert theirs == mine or LAYERS[theirs] < LAYERS[mine], (
            f"{module} imports {target}: layer {LAYERS[theirs]} ({theirs}) is not below layer {LAYERS[mine]} "
            f"({mine}); move the shared code down a layer")


def test_no_import_cycle_between_modules() -> None:
    graph = {m: {t for t in finsft_imports(p) if t in MODULES and t != m and not m.startswith(t + ".")}
             for m, p in MODULES.items()}
    # Package __init__ modules re-export their own submodules; the edge from a submodule up to its package's
    # __init__ is the only thing that would close such a loop, and it is not allowed.
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*trail[trail.index(nxt):], nxt] if nxt in trail else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_the_checker_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    """The rules above cannot pass vacuously: the parser finds imports written inside functions."""
    found = finsft_imports(MODULES["finsft.cli"])
    assert "finsft.training" in found and "finsft.commands.validate" in found  # both inside functions


def test_typed_recipe_views_name_exactly_finsft_own_schema_keys() -> None:
    """A key renamed in the schema must be renamed in the typed views (and then mypy finds every use)."""
    from typing import get_type_hints

    from finsft.recipe import schema
    from finsft.recipe.model import SECTION_VIEWS

    props = schema()["properties"]
    for section, view in SECTION_VIEWS.items():
        own = {k for k, v in props[section]["properties"].items() if "x-library" not in v}
        assert set(get_type_hints(view)) == own, section
