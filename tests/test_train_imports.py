"""The import graph of the trainers package, read from the source with the AST: no cycle among its modules
(imports inside functions and under ``if TYPE_CHECKING:`` count too), and the training loop reaches
neither objective (the objectives are handed to it)."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE = "w2s_agents.trainers"
FOLDER = Path(__file__).resolve().parents[1] / "trainers"


def _modules() -> dict[str, Path]:
    return {
        ".".join((PACKAGE, *p.relative_to(FOLDER).with_suffix("").parts)).removesuffix(".__init__"): p
        for p in FOLDER.rglob("*.py")
    }


def _import_graph() -> nx.DiGraph:
    """module -> the package's modules it imports, at any depth of its AST."""
    modules = _modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                # `from . import logps` imports the module logps; `from .loop import Trainer` the module loop
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules and "." in target:
                    target = target.rpartition(".")[0]  # `import w2s_agents.trainers.x.y` -> its module
                if target in modules and target != name:
                    graph.add_edge(name, target, line=node.lineno)
    return graph


def test_the_import_graph_is_read_from_every_kind_of_import() -> None:
    graph = _import_graph()
    assert len(graph) >= 15
    assert graph.has_edge(f"{PACKAGE}.loop", f"{PACKAGE}.logps")  # from . import logps as logps_module
    assert graph.has_edge(f"{PACKAGE}.dpo", f"{PACKAGE}.loop")  # from .loop import Trainer, ValidFn
    assert graph.has_edge(f"{PACKAGE}", f"{PACKAGE}.sft")  # under TYPE_CHECKING


def test_trainers_have_no_import_cycle() -> None:
    graph = _import_graph()
    cycles = []
    for cycle in nx.simple_cycles(graph):
        hops = zip(cycle, [*cycle[1:], cycle[0]], strict=True)
        cycles.append(" -> ".join(f"{a.removeprefix(PACKAGE)}:{graph.edges[a, b]['line']}" for a, b in hops))
    assert not cycles, cycles


def test_the_loop_knows_no_objective() -> None:
    reached = nx.descendants(_import_graph(), f"{PACKAGE}.loop")
    assert f"{PACKAGE}.batch" in reached
    assert not reached & {f"{PACKAGE}.sft", f"{PACKAGE}.dpo", f"{PACKAGE}.reference", PACKAGE}
