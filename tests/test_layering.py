"""The import-layering contract of DESIGN section 3, checked on the source with the AST.

Layers, bottom to top (a module may import its own part and any part of a lower layer; the parts of one layer
are independent of each other)::

    core      w2s_agents (types, store, config, messages, episode, ...) and w2s_agents.tree
    envs | search
    agents
    trainers | rollout
    pipeline | viz
    cli

Every import counts, also the lazy ones inside functions (a module depends on what it imports whenever it
imports it); imports under ``if TYPE_CHECKING:`` count for the layers but not for cycles, since they never run.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import pytest

REPO = Path(__file__).resolve().parents[1]
# installed package -> source folder (pyproject's package-dir mapping)
ROOTS = {"w2s_agents.envs": "envs", "w2s_agents.search": "search", "w2s_agents.trainers": "trainers"}
LAYERS: list[tuple[str, ...]] = [
    ("core",),
    ("envs", "search"),
    ("agents",),
    ("trainers", "rollout"),
    ("pipeline", "viz"),
    ("cli",),
]
SUBPACKAGE_PARTS = ("envs", "search", "agents", "trainers", "rollout", "pipeline", "viz", "cli")
HEAVY = ("torch", "transformers", "accelerate", "peft", "trl", "datasets", "ray", "textworld", "scienceworld",
         "gymnasium", "tokenizers", "safetensors", "matplotlib")  # fmt: skip
# third-party packages a part may import (besides the standard library and this project)
ALLOWED_THIRD_PARTY: dict[str, tuple[str, ...]] = {
    "core": ("numpy", "networkx", "yaml", "tqdm"),
    "search": ("numpy",),
}
# the one exception: seeding seeds torch too, importing it only inside seed_everything
ALLOWED_HEAVY = {("w2s_agents.seeding", "torch")}


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (for this project: the deepest module that exists)
    line: int
    type_checking: bool


def _module_files() -> dict[str, Path]:
    """Every module of the installed package, by dotted name."""
    out: dict[str, Path] = {}
    for path in (REPO / "w2s_agents").rglob("*.py"):
        rel = path.relative_to(REPO).with_suffix("")
        out[".".join(rel.parts).removesuffix(".__init__")] = path
    for package, folder in ROOTS.items():
        for path in (REPO / folder).rglob("*.py"):
            rel = path.relative_to(REPO / folder).with_suffix("")
            name = ".".join((package, *rel.parts)).removesuffix(".__init__")
            out[name] = path
    return out


MODULES = _module_files()


def part_of(module: str) -> str:
    """The layer part of one of this project's modules."""
    parts = module.split(".")
    if module == "w2s_agents.__main__":
        return "cli"
    if len(parts) >= 2 and parts[1] in SUBPACKAGE_PARTS:
        return parts[1]
    return "core"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(name: str) -> str:
    """The deepest existing module of this project that ``name`` (a module or module.attribute) names."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def imports_of(module: str) -> list[Import]:
    """The imports of a module: this project's as resolved modules, others by their top-level name."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []

    def add(name: str, line: int, tc: bool) -> None:
        if name.split(".")[0] == "w2s_agents":
            target = _resolve(name)
            assert target, f"{path}:{line}: imports {name}, which is not a module of this project"
            found.append(Import(module, target, line, tc))
        else:
            found.append(Import(module, name.split(".")[0], line, tc))

    def visit(node: ast.AST, tc: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, tc)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno, tc)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            for alias in node.names:
                add(f"{stem}.{alias.name}", node.lineno, tc)
        for child in ast.iter_child_nodes(node):
            visit(child, tc)

    visit(tree, False)
    return found


ALL_IMPORTS = [imp for m in sorted(MODULES) for imp in imports_of(m)]


def _rank(part: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if part in layer)


def test_every_module_belongs_to_a_layer() -> None:
    parts = {part_of(m) for m in MODULES}
    assert parts == {p for layer in LAYERS for p in layer}
    assert len(MODULES) > 60  # the walk found the code


def test_nothing_imports_upwards_or_sideways() -> None:
    bad = []
    for imp in ALL_IMPORTS:
        if imp.target not in MODULES:
            continue
        src, dst = part_of(imp.source), part_of(imp.target)
        if src != dst and _rank(dst) >= _rank(src):
            where = MODULES[imp.source].relative_to(REPO)
            bad.append(f"{where}:{imp.line}: {src} imports {dst} ({imp.target})")
    assert not bad, "layering broken:\n" + "\n".join(bad)


@pytest.mark.parametrize("part", sorted(ALLOWED_THIRD_PARTY))
def test_low_layers_import_no_heavy_packages(part: str) -> None:
    """Core needs no ML stack (a config or a tree is read without torch); search never imports torch."""
    allowed = ALLOWED_THIRD_PARTY[part]
    bad = [
        f"{MODULES[imp.source].relative_to(REPO)}:{imp.line}: {imp.target}"
        for imp in ALL_IMPORTS
        if part_of(imp.source) == part and imp.target not in MODULES
        if (imp.source, imp.target) not in ALLOWED_HEAVY
        if imp.target in HEAVY or (imp.target not in allowed and not _is_stdlib(imp.target))
    ]
    assert not bad, f"{part} imports packages outside {allowed} and the standard library:\n" + "\n".join(bad)


def test_only_the_ray_module_imports_ray() -> None:
    importers = sorted({imp.source for imp in ALL_IMPORTS if imp.target == "ray"})
    assert importers == ["w2s_agents.rollout.ray"]


def test_no_import_cycles() -> None:
    graph = nx.DiGraph()
    graph.add_nodes_from(MODULES)
    graph.add_edges_from(
        (imp.source, imp.target)
        for imp in ALL_IMPORTS
        if imp.target in MODULES and not imp.type_checking and imp.target != imp.source
    )
    cycles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    assert not cycles, f"import cycles: {cycles}"


def test_the_checks_catch_a_violation(tmp_path: Path) -> None:
    """The AST walk sees lazy, relative and TYPE_CHECKING imports (so the checks above can fail)."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from w2s_agents.cli import main\n"
        "def f():\n    from ..rollout import collect\n    import torch\n"
    )
    fake = "w2s_agents.search.fake_module"
    path = tmp_path / "fake_module.py"
    path.write_text(source, encoding="utf-8")
    MODULES[fake] = path
    try:
        found = {(i.target, i.type_checking) for i in imports_of(fake)}
    finally:
        del MODULES[fake]
    assert any(t.startswith("w2s_agents.cli") and tc for t, tc in found)
    assert ("torch", False) in found
    # relative to w2s_agents.search: ..rollout is w2s_agents.rollout (a part above search)
    assert any(t.startswith("w2s_agents.rollout") for t, _ in found)


def _is_stdlib(name: str) -> bool:
    import sys

    return name in sys.stdlib_module_names or name == "__future__"


def test_moved_modules_keep_their_old_import_paths() -> None:
    """Scripts written against the flat layout (``w2s_agents.models`` ...) still import, with a warning."""
    import importlib
    import sys
    import warnings

    from w2s_agents._moved import MOVED

    for old, new in MOVED.items():
        assert new in MODULES, f"{old} points at {new}, which does not exist"
        sys.modules.pop(old, None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = importlib.import_module(old)
        assert module is importlib.import_module(new)
        assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught)
