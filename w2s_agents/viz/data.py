"""What the viewer shows: the settings (:class:`VizConfig`), the JSON data a page embeds (:func:`tree_view_data`)
and the tree files of a run (:func:`find_tree_files`).

What is shown comes from the tree file (``w2s.tree/1``, written by ``w2s tree build`` and ``w2s search``) and
from :mod:`w2s_agents.search`:

* node values: ``mcts`` (r_M / c_M of the last search stored in the tree), ``mean`` (mean final return of the
  data trajectories through the node), ``success`` (share of them that were won) and ``max`` (Bellman value);
* the **best path**: computed greedily by :func:`w2s_agents.search.best_path` from the value kind of the
  :class:`~w2s_agents.search.SearchConfig` (``mcts``, falling back to ``mean`` with a note when the tree has no
  search values), then shortened over the game states as its ``paths`` says (``tree``, ``loop-erased`` or
  ``stitched``: :func:`w2s_agents.search.choose_path`, without the replay ``w2s search`` does), unless SFT rows
  are given (``paths``: an ``sft.jsonl`` written by ``w2s search``), in which case the paths of those rows are
  shown instead (a shortened path's row names its nodes, ``path_nodes``);
* the **TreeDPO pairs**: computed by :func:`w2s_agents.search.tree_pairs` with the config's value, margin and
  pairs per node, unless pair rows are given (``pairs``: a ``pairs.jsonl``), in which case those are shown;
* the **merged states**: nodes whose actions reached the same game state (the same
  :meth:`~w2s_agents.tree.TrajectoryTree.state_key`) by different histories share a state group.

Rows that name nodes the tree does not have (they come from another version of the tree) are refused with
their ``file:line``.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

import numpy as np

from w2s_agents import __version__
from w2s_agents.config import check, option
from w2s_agents.errors import DataFormatError, W2SError
from w2s_agents.search import (
    SearchConfig,
    ValueKind,
    best_path,
    choose_path,
    max_values,
    mean_values,
    search_values,
    success_values,
    tree_pairs,
)
from w2s_agents.tree import ROOT, TREE_SCHEMA, TrajectoryTree
from w2s_agents.viz.rows import read_pair_rows, read_path_rows

__all__ = [
    "NO_VALUE_COLOR",
    "VALUE_COLORS",
    "VIZ_SCHEMA",
    "VizConfig",
    "find_tree_files",
    "tree_and_file",
    "tree_view_data",
]

VIZ_SCHEMA = "w2s.viz/2"
"""Schema tag of the JSON data embedded in the viewer pages."""

VALUE_COLORS: tuple[str, str, str] = ("#d73027", "#fee08b", "#1a9850")
"""Colour scale of node values (value 0, 0.5 and 1; linear in between), shared by the pages and figures."""
NO_VALUE_COLOR = "#b0b0b0"
"""Colour of a node without a value (the search never went there)."""

ColorKind = Literal["mcts", "mean", "success", "max"]
PathKind = Literal["tree", "loop-erased", "stitched"]

_VALUE_LABELS = {
    "mcts": "MCTS value",
    "mean": "mean return",
    "success": "success rate",
    "max": "max value",
}


@dataclass(frozen=True)
class VizConfig:
    """Settings of the tree viewer and of static figures (the best path and the pairs follow
    :class:`~w2s_agents.search.SearchConfig`)."""

    color: ColorKind = option(
        "mcts",
        "colour of nodes when a page opens: mcts value, mean return, success rate or max value (the page "
        "switches; mcts falls back to mean on a tree without search values)",
    )
    expand_depth: int = option(
        1, "levels below the root expanded when a page opens (the best path always is)"
    )
    depth: int = option(3, "static figures: levels below the root that are drawn")
    max_children: int = option(
        8, "static figures: most children drawn per node (most visited first); the rest become one '+N' node"
    )
    label_chars: int = option(28, "static figures: longest action label, in characters (longer ones are cut)")
    paths: PathKind | None = option(
        None,
        "computed best path: tree (greedy by value), loop-erased or stitched over the merged game states, as "
        "SearchConfig.paths (which it overrides; null: the SearchConfig's)",
    )

    def __post_init__(self) -> None:
        check(self.expand_depth >= 0, "expand_depth", f"must be >= 0, got {self.expand_depth}")
        check(self.depth >= 1, "depth", f"must be >= 1, got {self.depth}")
        check(self.max_children >= 1, "max_children", f"must be >= 1, got {self.max_children}")
        check(self.label_chars >= 4, "label_chars", f"must be >= 4, got {self.label_chars}")
        check(
            self.paths in (None, "tree", "loop-erased", "stitched"),
            "paths",
            f"must be tree, loop-erased, stitched or null, got {self.paths!r}",
        )


def tree_and_file(tree: TrajectoryTree | str | os.PathLike[str]) -> tuple[TrajectoryTree, str]:
    """The tree, loaded when a path is given, and the file it came from ("" for a tree object).

    Raises:
        DataFormatError: the tree file is missing or invalid.
    """
    if isinstance(tree, TrajectoryTree):
        return tree, ""
    return TrajectoryTree.load(tree), str(tree)


def _rows_for(
    rows: str | os.PathLike[str] | Mapping[str, Sequence[Mapping[str, Any]]] | None,
    reader: Any,
    task_id: str,
) -> list[Mapping[str, Any]] | None:
    if rows is None:
        return None
    if isinstance(rows, (str, os.PathLike)):
        rows = reader(rows)
    assert isinstance(rows, Mapping)
    return list(rows.get(task_id, []))


_TREE_TAG = (
    '"' + TREE_SCHEMA.split("/")[0] + "/"
).encode()  # '"w2s.tree/': any version, so old ones get an error


def find_tree_files(
    run_dir: str | os.PathLike[str], *, exclude: str | os.PathLike[str] | None = None
) -> list[Path]:
    """The tree files of a run folder: ``run_dir/trees/*.json`` when that folder holds any, else every
    ``*.json`` below ``run_dir`` (``exclude`` and hidden folders skipped) whose head names a ``w2s.tree/``
    schema. Sorted by path.

    Raises:
        W2SError: ``run_dir`` is not a folder.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise W2SError(f"run folder not found: {root}")
    trees = sorted((root / "trees").glob("*.json"))
    if trees:
        return trees
    skip = Path(exclude).resolve() if exclude is not None else None
    found = []
    for p in sorted(root.rglob("*.json")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts[:-1]):
            continue
        if skip is not None and p.resolve().is_relative_to(skip):
            continue
        try:
            with p.open("rb") as fh:
                head = fh.read(65536)
        except OSError:
            continue
        if _TREE_TAG in head:
            found.append(p)
    return found


def _rounded(values: np.ndarray, digits: int = 4) -> list[float | None]:
    return [None if v != v else round(v, digits) for v in values.tolist()]


def _value_arrays(tree: TrajectoryTree, discount: float = 1.0) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    if tree.search_arrays() is not None:
        out["mcts"] = search_values(tree)
    out["mean"] = mean_values(tree, discount)
    out["success"] = success_values(tree)
    out["max"] = max_values(tree, discount)
    return out


def _resolve_value(tree: TrajectoryTree, requested: ValueKind, explicit: bool, label: str) -> tuple[str, str]:
    """The value kind to use and a note for the page ("" when the requested kind is used)."""
    if requested == "mcts" and tree.search_arrays() is None:
        if explicit:
            raise W2SError(
                f"{label or 'tree ' + repr(tree.task_id)}: no search values (run `w2s search` on it first, "
                "or choose another value: mean, max, success)"
            )
        return "mean", "this tree has no search values (run `w2s search`): best path and pairs by mean return"
    return requested, ""


def _check_pair(tree: TrajectoryTree, row: Mapping[str, Any]) -> None:
    n = len(tree)
    node, good, bad = row["node"], row["chosen_node"], row["rejected_node"]
    where = row.get("where", "pair row")
    for key, v in (("node", node), ("chosen_node", good), ("rejected_node", bad)):
        if not 0 <= v < n:
            raise DataFormatError(
                f"{where}: {key} {v} is not a node of the tree of task {tree.task_id!r} ({n} nodes); "
                "the pairs come from another version of the tree"
            )
    if tree.parent(good) != node or tree.parent(bad) != node:
        raise DataFormatError(
            f"{where}: chosen node {good} and rejected node {bad} are not children of node {node} in the tree "
            f"of task {tree.task_id!r}; the pairs come from another version of the tree"
        )


def _check_path(tree: TrajectoryTree, row: Mapping[str, Any]) -> list[int]:
    n = len(tree)
    node, steps = row["node"], row.get("steps")
    where = row.get("where", "SFT row")
    if not 0 <= node < n:
        raise DataFormatError(
            f"{where}: node {node} is not a node of the tree of task {tree.task_id!r} ({n} nodes); "
            "the rows come from another version of the tree"
        )
    if row.get("path_nodes") is not None:
        return _check_path_nodes(tree, row, where)
    path = tree.path(node)
    if steps is not None and steps != len(path) - 1:
        raise DataFormatError(
            f"{where}: the row has {steps} steps but node {node} is at depth {len(path) - 1} in the tree of "
            f"task {tree.task_id!r}; the rows come from another version of the tree"
        )
    return path


def _check_path_nodes(tree: TrajectoryTree, row: Mapping[str, Any], where: str) -> list[int]:
    """The nodes of a shortened path's row, checked against the tree: tree nodes from the root to the row's
    node, each reached from the one before it or from a node in the same game state as its parent."""
    n, task = len(tree), tree.task_id
    stale = "the rows come from another version of the tree"
    nodes = [int(v) for v in row["path_nodes"]]
    for v in nodes:
        if not 0 <= v < n:
            raise DataFormatError(
                f"{where}: path node {v} is not a node of the tree of task {task!r} ({n} nodes); {stale}"
            )
    if not nodes or nodes[0] != ROOT:
        raise DataFormatError(
            f"{where}: path_nodes must start at the root (node 0), got {nodes[:1]}; {stale}"
        )
    if nodes[-1] != row["node"]:
        raise DataFormatError(
            f"{where}: path_nodes end at node {nodes[-1]} but the row's node is {row['node']}; {stale}"
        )
    for a, b in pairwise(nodes):
        p = tree.parent(b)
        key = tree.state_key(a)
        if p != a and (key is None or tree.state_key(p) != key):
            raise DataFormatError(
                f"{where}: path node {b} does not follow node {a}: its parent {p} is neither node {a} nor in "
                f"the same game state in the tree of task {task!r}; {stale}"
            )
    steps = row.get("steps")
    if steps is not None and steps != len(nodes) - 1:
        raise DataFormatError(
            f"{where}: the row has {steps} steps but its path_nodes hold {len(nodes) - 1} actions; {stale}"
        )
    return nodes


def _computed_best_path(
    tree: TrajectoryTree, values: np.ndarray, mode: str, label: str
) -> tuple[list[int], str]:
    """The best path the search would train on (without its replay) and where it comes from, for the page."""
    raw = best_path(tree, values)
    greedy = f"greedy by {label}"
    if mode == "tree":
        return raw, f"computed: {greedy}"
    choice = choose_path(tree, raw, mode=mode, replay=None)
    if choice.kind == "stitched":
        return choice.nodes, (
            f"computed: stitched over merged states (not replayed here), {choice.steps} steps; "
            f"the greedy path by {label} has {choice.raw_steps}"
        )
    if choice.kind == "loop-erased":
        return choice.nodes, (
            f"computed: {greedy}, loop-erased over merged states (not replayed here), {choice.steps} of its "
            f"{choice.raw_steps} steps"
        )
    why = "the tree has no state keys" if not tree.has_state_keys else "no shorter path over merged states"
    return choice.nodes, f"computed: {greedy} ({mode} paths: {why})"


def _state_groups(tree: TrajectoryTree) -> tuple[list[int], int, int]:
    """Per node, the group of the game state its action reached when two or more nodes reached it (groups
    numbered by their first node), else -1; and the nodes in merged states and the number of such states."""
    keys = [tree.state_key(i) for i in range(len(tree))]
    counts = Counter(k for k in keys if k is not None)
    ids: dict[str, int] = {}
    groups: list[int] = []
    for k in keys:
        if k is None or counts[k] < 2:
            groups.append(-1)
        else:
            groups.append(ids.setdefault(k, len(ids)))
    return groups, sum(counts[k] for k in ids), len(ids)


def tree_view_data(
    tree: TrajectoryTree | str | os.PathLike[str],
    *,
    search: SearchConfig | None = None,
    value: ValueKind | None = None,
    pairs: str | os.PathLike[str] | Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    paths: str | os.PathLike[str] | Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    config: VizConfig | None = None,
    title: str | None = None,
    index_href: str | None = None,
    file: str | None = None,
) -> dict[str, Any]:
    """The JSON data a viewer page embeds (schema :data:`VIZ_SCHEMA`): nodes as columns over canonical ids,
    texts in a shared string table, values of every kind, the state group of every node (``state_group``: an
    id shared by the nodes that reached one game state, -1 for a node whose state no other node reached or that
    has no state key), the best path(s) and the pairs.

    Args:
        tree: a tree or the path of a tree file.
        search: value kind, path kind (``paths``), margin and pairs per node of the computed best path and
            pairs (default :class:`SearchConfig` defaults, as ``w2s search`` uses).
        value: overrides ``search.value``; asking for ``mcts`` on a tree without search values is an error,
            whereas the config's default ``mcts`` falls back to ``mean`` (noted on the page).
        pairs: pair rows (a ``pairs.jsonl`` path or the result of :func:`read_pair_rows`) to show instead of
            computing them; only the rows of this tree's task are used.
        paths: SFT rows (an ``sft.jsonl`` path or :func:`read_path_rows`) whose paths are shown as the best
            path instead of computing it: a row's ``path_nodes`` when it has them, else the tree path from the
            root to its ``node``.
        config: viewer settings (its ``paths``, when set, overrides ``search.paths``).
        title: page title (default: the task id).
        index_href: link back to a run index page.
        file: the tree's file as shown on the page (default: the path given as ``tree``).

    The tree is put in canonical order first (:meth:`~w2s_agents.tree.TrajectoryTree.canonicalize`; trees
    read from files already are), the numbering that node ids in pair and SFT rows refer to.

    Raises:
        DataFormatError: the tree file, or a pair / SFT row, is invalid or does not match the tree.
        W2SError: ``value="mcts"`` on a tree without search values.
    """
    tree, source_file = tree_and_file(tree)
    source_file = file if file is not None else source_file
    tree.canonicalize()
    cfg = config or VizConfig()
    scfg = search or SearchConfig()
    kind, note = _resolve_value(tree, value or scfg.value, value is not None, source_file)
    n = len(tree)
    values = _value_arrays(tree, scfg.discount)
    if kind not in values:
        raise ValueError(f"unknown value kind {kind!r}")
    chosen_values = values[kind]

    strings: list[str] = []
    string_ids: dict[str, int] = {}

    def sid(text: str) -> int:
        i = string_ids.get(text)
        if i is None:
            i = string_ids[text] = len(strings)
            strings.append(text)
        return i

    models = sorted(tree.models)
    model_ids = {m: i for i, m in enumerate(models)}
    parent = [tree.parent(i) for i in range(n)]
    action = [sid(tree.action(i)) for i in range(n)]
    thought = [sid(tree.thought(i)) for i in range(n)]
    obs = [sid(tree.observation(i)) for i in range(n)]
    obs_before = [sid(tree.observation_before(i)) for i in range(n)]
    visits, return_sum, successes = tree.stat_arrays()
    src: list[int | list[int]] = []
    terminal: dict[str, dict[str, int]] = {}
    for i in range(n):
        s = tree.sources(i)
        if len(s) == 1:
            src.append(model_ids[next(iter(s))])
        else:
            src.append([x for m, c in s.items() for x in (model_ids[m], c)])
        t = tree.terminal(i)
        if t:
            terminal[str(i)] = t
    arrays = tree.search_arrays()

    # best path(s)
    path_rows = _rows_for(paths, read_path_rows, tree.task_id)
    if path_rows is not None:
        best_paths = [_check_path(tree, row) for row in path_rows]
        kinds = Counter(str(row.get("path")) for row in path_rows if row.get("path_nodes") is not None)
        shortened = "".join(f", {c} {k}" for k, c in sorted(kinds.items()))
        best_origin = f"SFT rows ({len(best_paths)} of task {tree.task_id!r}{shortened})"
    elif n > 1:
        mode = cfg.paths or scfg.paths
        best, best_origin = _computed_best_path(tree, chosen_values, mode, _VALUE_LABELS[kind])
        best_paths = [best]
    else:
        best_paths, best_origin = [], "computed: the tree has no action"
    state_group, merged_nodes, merged_states = _state_groups(tree)

    # pairs: (divergence node, chosen, rejected) -> merged levels
    pair_rows = _rows_for(pairs, read_pair_rows, tree.task_id)
    merged: dict[tuple[int, int, int], dict[str, Any]] = {}
    trajectory_pairs = 0
    if pair_rows is not None:
        pairs_origin = "pair rows"
        for row in pair_rows:
            if row["chosen_node"] < 0 or row["rejected_node"] < 0 or row["level"] == "trajectory":
                trajectory_pairs += 1  # whole-trajectory pairs (expert vs failed) are not tree nodes
                continue
            _check_pair(tree, row)
            key = (row["node"], row["chosen_node"], row["rejected_node"])
            entry = merged.setdefault(key, {**row, "levels": []})
            if row["level"] not in entry["levels"]:
                entry["levels"].append(row["level"])
    else:
        levels = [
            name for name, on in (("step", scfg.step_pairs), ("continuation", scfg.continuation_pairs)) if on
        ]
        pairs_origin = (
            f"computed: {_VALUE_LABELS[kind]}, margin {scfg.margin:g}, at most {scfg.pairs_per_node} per node"
        )
        if levels:
            for row in tree_pairs(
                tree, chosen_values, margin=scfg.margin, per_node=scfg.pairs_per_node, step=True,
                continuation=False, system=None,
            ):  # fmt: skip
                key = (row.node, row.chosen_node, row.rejected_node)
                merged[key] = {"value_gap": row.value_gap, "levels": levels}
    pair_list = [
        [
            node,
            good,
            bad,
            None if row["value_gap"] != row["value_gap"] else round(row["value_gap"], 4),
            "+".join(row["levels"]),
        ]
        for (node, good, bad), row in merged.items()
    ]

    summary = tree.summary().to_dict()
    return {
        "schema": VIZ_SCHEMA,
        "meta": {
            "title": title or tree.task_id,
            "task_id": tree.task_id,
            "env_id": tree.env_id,
            "instruction": tree.instruction,
            "file": source_file,
            "summary": summary,
            "search": dict(tree.search_info),
            "value": kind,
            "value_label": _VALUE_LABELS[kind],
            "value_note": note,
            "best_origin": best_origin,
            "pairs_origin": pairs_origin,
            "trajectory_pairs": trajectory_pairs,
            "state_keys": tree.has_state_keys,
            "merged_nodes": merged_nodes,
            "merged_states": merged_states,
            "color": cfg.color if cfg.color in values else "mean",
            "value_kinds": [k for k in ("mcts", "mean", "success", "max") if k in values],
            "value_labels": _VALUE_LABELS,
            "expand_depth": cfg.expand_depth,
            "scale": list(VALUE_COLORS),
            "no_value": NO_VALUE_COLOR,
            "index_href": index_href,
            "version": __version__,
        },
        "n": n,
        "strings": strings,
        "models": models,
        "parent": parent,
        "action": action,
        "thought": thought,
        "obs": obs,
        "obs_before": obs_before,
        "visits": visits.tolist(),
        "return_sum": [round(x, 6) for x in return_sum.tolist()],
        "successes": successes.tolist(),
        "src": src,
        "terminal": terminal,
        "search_visits": arrays[0].tolist() if arrays is not None else None,
        "search_value_sum": [round(x, 6) for x in arrays[1].tolist()] if arrays is not None else None,
        "values": {k: _rounded(v) for k, v in values.items()},
        "state_group": state_group,
        "best_paths": best_paths,
        "pairs": pair_list,
    }
