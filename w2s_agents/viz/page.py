"""Search visualisation: an offline, interactive tree viewer (one self-contained HTML file), an index page over
the trees of a run, and static figures (SVG, PNG) of a tree's top levels.

What is shown comes from the tree file (``w2s.tree/1``, written by ``w2s tree build`` and ``w2s search``) and
from :mod:`w2s_agents.search`:

* node values: ``mcts`` (r_M / c_M of the last search stored in the tree), ``mean`` (mean final return of the
  data trajectories through the node), ``success`` (share of them that were won) and ``max`` (Bellman value);
* the **best path**: computed greedily by :func:`w2s_agents.search.best_path` from the value kind of the
  :class:`~w2s_agents.search.SearchConfig` (``mcts``, falling back to ``mean`` with a note when the tree has no
  search values), unless SFT rows are given (``paths``: an ``sft.jsonl`` written by ``w2s search``), in which
  case the paths of those rows are shown instead;
* the **TreeDPO pairs**: computed by :func:`w2s_agents.search.tree_pairs` with the config's value, margin and
  pairs per node, unless pair rows are given (``pairs``: a ``pairs.jsonl``), in which case those are shown.

The HTML page holds its data as JSON in a ``<script type="application/json">`` element (``<``, ``>``, ``&`` and
U+2028/U+2029 escaped, so no text can close the element); its script and style are inlined from the package
data files under ``w2s_agents/viz/assets/`` and allowed by a Content-Security-Policy of their hashes only (no
network, no other script). The script puts every text from envs and models into the page with ``textContent``,
never as markup.

Public API: :func:`render_tree_html`, :func:`render_run_index`, :func:`export_static`, :func:`tree_view_data`,
:func:`find_tree_files`, :func:`read_pair_rows`, :func:`read_path_rows`, :func:`embed_json`, :class:`VizConfig`.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal
from xml.sax.saxutils import escape as _xml_escape

import numpy as np

from w2s_agents import __version__
from w2s_agents.atomic import atomic_write
from w2s_agents.config import check, option
from w2s_agents.errors import DataFormatError, W2SError
from w2s_agents.log import progress
from w2s_agents.search import (
    SearchConfig,
    ValueKind,
    best_path,
    max_values,
    mcts_values,
    mean_values,
    success_values,
    tree_pairs,
)
from w2s_agents.tree import ROOT, TREE_SCHEMA, TrajectoryTree

__all__ = [
    "VALUE_COLORS",
    "VIZ_SCHEMA",
    "TreeIndexEntry",
    "VizConfig",
    "embed_json",
    "export_static",
    "find_tree_files",
    "read_pair_rows",
    "read_path_rows",
    "render_run_index",
    "render_tree_html",
    "tree_view_data",
]

logger = logging.getLogger(__name__)

VIZ_SCHEMA = "w2s.viz/1"
"""Schema tag of the JSON data embedded in the viewer pages."""

VALUE_COLORS: tuple[str, str, str] = ("#d73027", "#fee08b", "#1a9850")
"""Colour scale of node values (value 0, 0.5 and 1; linear in between), shared by the pages and figures."""
NO_VALUE_COLOR = "#b0b0b0"
"""Colour of a node without a value (the search never went there)."""

ColorKind = Literal["mcts", "mean", "success", "max"]
StaticFormat = Literal["svg", "png"]

_VALUE_LABELS = {
    "mcts": "MCTS value",
    "mean": "mean return",
    "success": "success rate",
    "max": "max value",
}
_ASSETS = "assets"


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

    def __post_init__(self) -> None:
        check(self.expand_depth >= 0, "expand_depth", f"must be >= 0, got {self.expand_depth}")
        check(self.depth >= 1, "depth", f"must be >= 1, got {self.depth}")
        check(self.max_children >= 1, "max_children", f"must be >= 1, got {self.max_children}")
        check(self.label_chars >= 4, "label_chars", f"must be >= 4, got {self.label_chars}")


# --------------------------------------------------------------------------------------- reading inputs


def _as_tree(tree: TrajectoryTree | str | os.PathLike[str]) -> tuple[TrajectoryTree, str]:
    if isinstance(tree, TrajectoryTree):
        return tree, ""
    return TrajectoryTree.load(tree), str(tree)


def _read_jsonl(path: Path, what: str) -> Iterable[tuple[int, dict[str, Any]]]:
    try:
        fh = path.open(encoding="utf-8")
    except FileNotFoundError:
        raise DataFormatError(f"{what} file not found: {path}") from None
    except OSError as exc:
        raise DataFormatError(f"{path}: cannot read {what} file: {exc}") from None
    with fh:
        try:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataFormatError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from None
                if not isinstance(row, dict):
                    raise DataFormatError(f"{path}:{lineno}: a {what} row must be a JSON object")
                yield lineno, row
        except UnicodeDecodeError as exc:
            raise DataFormatError(f"{path}: not UTF-8 text: {exc}") from None


def _int_field(row: Mapping[str, Any], key: str, where: str) -> int:
    v = row.get(key)
    if not isinstance(v, int) or isinstance(v, bool):
        raise DataFormatError(f"{where}: field '{key}' must be an integer, got {v!r}")
    return v


def _num_field(row: Mapping[str, Any], key: str, where: str) -> float:
    v = row.get(key, math.nan)
    if v is None:
        return math.nan
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise DataFormatError(f"{where}: field '{key}' must be a number, got {v!r}")
    return float(v)


def _task_field(row: Mapping[str, Any], where: str) -> str:
    task = row.get("task_id")
    if not isinstance(task, str) or not task:
        raise DataFormatError(f"{where}: field 'task_id' must be a non-empty string, got {task!r}")
    return task


def read_pair_rows(path: str | os.PathLike[str]) -> dict[str, list[dict[str, Any]]]:
    """The node fields of the pair rows of a ``pairs.jsonl`` (as written by ``w2s search``), by task id.

    Each returned row keeps ``task_id, node, chosen_node, rejected_node, level, value_gap, chosen_value,
    rejected_value`` and ``where`` (``file:line``); the messages are dropped.

    Raises:
        DataFormatError: the file is missing, a line is not a JSON object, or a field has the wrong type
            (the message names ``file:line``).
    """
    p = Path(path)
    out: dict[str, list[dict[str, Any]]] = {}
    for lineno, row in _read_jsonl(p, "pairs"):
        where = f"{p}:{lineno}"
        level = row.get("level", "step")
        if not isinstance(level, str):
            raise DataFormatError(f"{where}: field 'level' must be a string, got {level!r}")
        out.setdefault(_task_field(row, where), []).append(
            {
                "node": _int_field(row, "node", where),
                "chosen_node": _int_field(row, "chosen_node", where),
                "rejected_node": _int_field(row, "rejected_node", where),
                "level": level,
                "value_gap": _num_field(row, "value_gap", where),
                "chosen_value": _num_field(row, "chosen_value", where),
                "rejected_value": _num_field(row, "rejected_value", where),
                "where": where,
            }
        )
    return out


def read_path_rows(path: str | os.PathLike[str]) -> dict[str, list[dict[str, Any]]]:
    """The node fields of the SFT rows of an ``sft.jsonl`` (best paths, as written by ``w2s search``), by task.

    Each returned row keeps ``task_id, node`` (the path's last node), ``steps`` (its length in actions, when
    present), ``value``, ``return`` and ``where`` (``file:line``).

    Raises:
        DataFormatError: the file is missing, a line is not a JSON object, or a field has the wrong type.
    """
    p = Path(path)
    out: dict[str, list[dict[str, Any]]] = {}
    for lineno, row in _read_jsonl(p, "SFT"):
        where = f"{p}:{lineno}"
        steps = row.get("steps")
        if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool)):
            raise DataFormatError(f"{where}: field 'steps' must be an integer, got {steps!r}")
        out.setdefault(_task_field(row, where), []).append(
            {
                "node": _int_field(row, "node", where),
                "steps": steps,
                "value": _num_field(row, "value", where),
                "return": _num_field(row, "return", where),
                "where": where,
            }
        )
    return out


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


# ------------------------------------------------------------------------------------------ view data


def _rounded(values: np.ndarray, digits: int = 4) -> list[float | None]:
    return [None if v != v else round(v, digits) for v in values.tolist()]


def _value_arrays(tree: TrajectoryTree, discount: float = 1.0) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    if tree.search_arrays() is not None:
        out["mcts"] = mcts_values(tree)
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
    path = tree.path(node)
    if steps is not None and steps != len(path) - 1:
        raise DataFormatError(
            f"{where}: the row has {steps} steps but node {node} is at depth {len(path) - 1} in the tree of "
            f"task {tree.task_id!r}; the rows come from another version of the tree"
        )
    return path


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
    texts in a shared string table, values of every kind, the best path(s) and the pairs.

    Args:
        tree: a tree or the path of a tree file.
        search: value kind, margin and pairs per node of the computed best path and pairs (default
            :class:`SearchConfig` defaults, as ``w2s search`` uses).
        value: overrides ``search.value``; asking for ``mcts`` on a tree without search values is an error,
            whereas the config's default ``mcts`` falls back to ``mean`` (noted on the page).
        pairs: pair rows (a ``pairs.jsonl`` path or the result of :func:`read_pair_rows`) to show instead of
            computing them; only the rows of this tree's task are used.
        paths: SFT rows (an ``sft.jsonl`` path or :func:`read_path_rows`) whose paths are shown as the best
            path instead of computing it.
        config: viewer settings.
        title: page title (default: the task id).
        index_href: link back to a run index page.
        file: the tree's file as shown on the page (default: the path given as ``tree``).

    The tree is put in canonical order first (:meth:`~w2s_agents.tree.TrajectoryTree.canonicalize`; trees
    read from files already are), the numbering that node ids in pair and SFT rows refer to.

    Raises:
        DataFormatError: the tree file, or a pair / SFT row, is invalid or does not match the tree.
        W2SError: ``value="mcts"`` on a tree without search values.
    """
    tree, source_file = _as_tree(tree)
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
        best_origin = f"SFT rows ({len(best_paths)} of task {tree.task_id!r})"
    else:
        best_paths = [best_path(tree, chosen_values)] if n > 1 else []
        best_origin = f"computed: greedy by {_VALUE_LABELS[kind]}"

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
                key = (row["node"], row["chosen_node"], row["rejected_node"])
                merged[key] = {**row, "levels": levels}
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
        "mcts_visits": arrays[0].tolist() if arrays is not None else None,
        "mcts_value_sum": [round(x, 6) for x in arrays[1].tolist()] if arrays is not None else None,
        "values": {k: _rounded(v) for k, v in values.items()},
        "best_paths": best_paths,
        "pairs": pair_list,
    }


# --------------------------------------------------------------------------------------------- pages


def _asset(name: str) -> str:
    return (resources.files("w2s_agents.viz") / _ASSETS / name).read_text(encoding="utf-8")


_JSON_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_JSON_UNSAFE = re.compile("[<>&\u2028\u2029]")


def embed_json(data: Any) -> str:
    """``data`` as JSON safe to place inside a ``<script type="application/json">`` element: ``<``, ``>``,
    ``&``, U+2028 and U+2029 are written as ``\\uXXXX`` escapes, so no text can end the element."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return _JSON_UNSAFE.sub(lambda m: _JSON_ESCAPES[m.group()], text)


def _write_text(path: Path, text: str) -> None:
    """Write atomically, readable by all (pages and figures are meant to be shared)."""
    with atomic_write(path) as fh:
        fh.write(text)
    path.chmod(0o644)


def _sha256(text: str) -> str:
    return base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")


def _page(title: str, css_names: Sequence[str], js_name: str, data: Any, page_class: str) -> str:
    css = "\n".join(_asset(name) for name in css_names)
    js = _asset(js_name)
    for name, code in ((js_name, js), ("css", css)):
        if re.search(r"</?(script|style)|<!--", code, re.IGNORECASE):
            raise RuntimeError(f"viewer asset {name} contains a sequence that would end its element")
    csp = (
        "default-src 'none'; "
        f"script-src 'sha256-{_sha256(js)}'; "
        f"style-src 'sha256-{_sha256(css)}'; "
        "img-src data:; base-uri 'none'; form-action 'none'"
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{html.escape(csp, quote=False)}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f'<meta name="generator" content="w2s-agents {__version__}">\n'
        f"<title>{html.escape(title)}</title>\n"
        f"<style>{css}</style>\n</head>\n"
        f'<body class="{page_class}">\n'
        '<noscript><p class="noscript">This page needs JavaScript (it runs offline; nothing is fetched).</p></noscript>\n'
        f'<script type="application/json" id="w2s-data">{embed_json(data)}</script>\n'
        f"<script>{js}</script>\n"
        "</body>\n</html>\n"
    )


def render_tree_html(
    tree: TrajectoryTree | str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    search: SearchConfig | None = None,
    value: ValueKind | None = None,
    pairs: str | os.PathLike[str] | Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    paths: str | os.PathLike[str] | Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    config: VizConfig | None = None,
    title: str | None = None,
    index_href: str | None = None,
    file: str | None = None,
) -> Path:
    """Write the interactive viewer of one tree as one self-contained HTML file (atomically); returns its path.

    Arguments as :func:`tree_view_data`. The page works offline (no network access at all: its policy
    forbids it) and shows every text of the tree as text.

    Raises:
        DataFormatError: the tree file, or a pair / SFT row, is invalid or does not match the tree.
        W2SError: ``value="mcts"`` on a tree without search values.
    """
    data = tree_view_data(
        tree, search=search, value=value, pairs=pairs, paths=paths, config=config, title=title,
        index_href=index_href, file=file,
    )  # fmt: skip
    page = _page(f"{data['meta']['title']} - w2s tree", ["viewer.css"], "tree.js", data, "w2s-tree")
    out = Path(out_path)
    _write_text(out, page)
    logger.debug("wrote %s (%d nodes, %d bytes)", out, data["n"], len(page.encode("utf-8")))
    return out


@dataclass(frozen=True)
class TreeIndexEntry:
    """One tree of a run index: its file, page and summary, or the error that kept it out."""

    file: str
    """Tree file, relative to the run folder."""
    page: str | None
    """Viewer page, relative to the index page (None when the tree could not be read)."""
    error: str | None = None
    summary: Mapping[str, Any] | None = None
    """:class:`~w2s_agents.tree.TreeSummary` fields."""
    value: str = ""
    """Value kind of the best path and pairs."""
    best_steps: int = 0
    """Actions on the best path."""
    best_value: float | None = None
    """Value of the best path's last node."""
    best_return: float | None = None
    """Mean return of the trajectories through the best path's last node."""
    pairs: int = 0
    """TreeDPO pairs (chosen, rejected) shown on the page."""
    searched: bool = False
    """Whether the tree holds MCTS values."""
    iterations: int | None = None
    """MCTS simulations of the last search."""


_PAGE_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _page_name(rel: Path, taken: set[str]) -> str:
    stem = "__".join(rel.with_suffix("").parts)
    name = _PAGE_UNSAFE.sub("_", stem).strip("._")[:100] or "tree"
    if name.lower() in taken or name.lower() == "index":
        name = f"{name}-{hashlib.sha1(str(rel).encode()).hexdigest()[:8]}"
    taken.add(name.lower())
    return name + ".html"


def render_run_index(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    search: SearchConfig | None = None,
    value: ValueKind | None = None,
    pairs: str | os.PathLike[str] | Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    paths: str | os.PathLike[str] | Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    config: VizConfig | None = None,
) -> tuple[Path, list[TreeIndexEntry]]:
    """Write a viewer page for every tree of a run and an index page over them; returns the index's path and
    one entry per tree file found (see :func:`find_tree_files`).

    Pages go to ``out_dir`` (default ``run_dir/viz``), the index as ``out_dir/index.html`` and each tree's page
    beside it, linked from it. A tree that cannot be shown (its file is invalid, rows of ``pairs`` / ``paths``
    do not fit it, or ``value="mcts"`` on a tree without search values) is listed on the index with its error
    (one line naming the file and the problem) and gets no page; the caller decides whether that is a failure.
    ``pairs`` / ``paths`` (files, or what :func:`read_pair_rows` / :func:`read_path_rows` return) hold the rows
    of all the run's tasks; each page shows those of its own.

    Raises:
        W2SError: ``run_dir`` is not a folder or holds no tree file.
        DataFormatError: a ``pairs`` / ``paths`` file is invalid.
    """
    root = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else root / "viz"
    files = find_tree_files(root, exclude=out)
    if not files:
        raise W2SError(
            f"no tree files in run folder {root} (looked for trees/*.json, then w2s.tree files below it)"
        )
    pair_rows = read_pair_rows(pairs) if isinstance(pairs, (str, os.PathLike)) else pairs
    path_rows = read_path_rows(paths) if isinstance(paths, (str, os.PathLike)) else paths
    entries: list[TreeIndexEntry] = []
    taken: set[str] = set()
    for f in progress(files, desc="tree pages", unit="tree"):
        rel = f.relative_to(root)
        try:
            tree = TrajectoryTree.load(f)
            page = _page_name(rel, taken)
            data = tree_view_data(
                tree, search=search, value=value, pairs=pair_rows, paths=path_rows, config=config,
                index_href="index.html", file=str(rel),
            )  # fmt: skip
            _write_text(
                out / page, _page(f"{tree.task_id} - w2s tree", ["viewer.css"], "tree.js", data, "w2s-tree")
            )
        except W2SError as exc:  # the tree file, or rows of the pairs / paths files that do not fit it
            logger.debug("%s", exc)
            entries.append(TreeIndexEntry(file=str(rel), page=None, error=str(exc)))
            continue
        values = data["values"][data["meta"]["value"]]
        best = data["best_paths"][0] if data["best_paths"] else [ROOT]
        leaf = best[-1]
        entries.append(
            TreeIndexEntry(
                file=str(rel),
                page=page,
                summary=data["meta"]["summary"],
                value=data["meta"]["value"],
                best_steps=len(best) - 1,
                best_value=values[leaf],
                best_return=round(tree.mean_return(leaf), 4),
                pairs=len(data["pairs"]),
                searched=tree.search_arrays() is not None,
                iterations=tree.search_info.get("iterations"),
            )
        )
    index_data = {
        "schema": VIZ_SCHEMA,
        "meta": {"title": f"w2s trees: {root.resolve().name}", "run_dir": str(root), "version": __version__,
                 "scale": list(VALUE_COLORS)},
        "trees": [
            {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in e.__dict__.items()} for e in entries
        ],
    }  # fmt: skip
    index = out / "index.html"
    _write_text(
        index, _page(index_data["meta"]["title"], ["viewer.css"], "index.js", index_data, "w2s-index")
    )
    logger.debug("wrote %s (%d trees)", index, len(entries))
    return index, entries


# ------------------------------------------------------------------------------------------ static figures


@dataclass
class _Box:
    """A node of a static figure: a tree node, or the ``+N more`` stand-in for children left out."""

    node: int  # tree node id; -1 for a stand-in
    parent: int  # index of the parent box, -1 for the root
    depth: int
    label: str
    visits: int
    value: float  # NaN when unknown
    outcome: str = ""  # "", "won", "failed" or "mixed" (how the trajectories that ended here ended)
    best: bool = False
    chosen: bool = False
    rejected: bool = False
    below: int = 0  # children not drawn because of the depth limit
    inner: bool = False  # has drawn children (its label goes above it, clear of the edges)
    x: float = 0.0
    y: float = 0.0
    r: float = 0.0


def _color(v: float) -> str:
    """Colour of value ``v`` on :data:`VALUE_COLORS` (clamped to [0, 1]; grey for NaN)."""
    if v != v:
        return NO_VALUE_COLOR
    v = min(max(v, 0.0), 1.0)
    lo, hi, t = (0, 1, v * 2) if v <= 0.5 else (1, 2, v * 2 - 1)
    a = [int(VALUE_COLORS[lo][i : i + 2], 16) for i in (1, 3, 5)]
    b = [int(VALUE_COLORS[hi][i : i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(x + (y - x) * t):02x}" for x, y in zip(a, b, strict=True))


def _cut(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _outcome(ends: Mapping[str, int]) -> str:
    if not ends:
        return ""
    won = ends.get("won", 0)
    if won == sum(ends.values()):
        return "won"
    return "mixed" if won else "failed"


@dataclass(frozen=True)
class _Figure:
    boxes: list[_Box]
    width: float
    height: float
    title: str
    subtitle: str
    legend_y: float


_ROW = 22.0  # pixels per leaf row
_TOP = 56.0
_LEFT = 16.0
_CHAR = 6.4  # approximate width of a label character at 11 px


def _static_figure(tree: TrajectoryTree, data: Mapping[str, Any], cfg: VizConfig) -> _Figure:
    """Boxes of the top ``cfg.depth`` levels (preorder) placed left to right: one row per leaf box, a parent
    centred on its drawn children."""
    color = data["meta"]["color"]
    values = data["values"][color]
    best = {n for p in data["best_paths"] for n in p}
    chosen = {p[1] for p in data["pairs"]}
    rejected = {p[2] for p in data["pairs"]}
    boxes: list[_Box] = []
    kids_of: list[list[int]] = []

    def visit(node: int, parent: int) -> None:
        depth = tree.depth(node)
        v = values[node]
        box = _Box(
            node, parent, depth, _cut(tree.task_id if node == ROOT else tree.action(node), cfg.label_chars),
            tree.visits(node), math.nan if v is None else float(v), _outcome(tree.terminal(node)),
            node in best, node in chosen, node in rejected,
        )  # fmt: skip
        i = len(boxes)
        boxes.append(box)
        kids_of.append([])
        if parent >= 0:
            kids_of[parent].append(i)
        children = tree.children(node)
        if depth >= cfg.depth:
            box.below = len(children)
            return
        ranked = sorted(children, key=lambda c: (-tree.visits(c), c))
        shown = ranked[: cfg.max_children]
        extra_best = [c for c in ranked[cfg.max_children :] if c in best]
        if extra_best:  # the best path stays in view even through a rarely visited child
            shown = [*shown[: cfg.max_children - 1], extra_best[0]]
        rest = [c for c in children if c not in shown]
        for c in sorted(shown):
            visit(c, i)
        if rest:
            j = len(boxes)
            boxes.append(
                _Box(-1, i, depth + 1, f"+{len(rest)} more", sum(tree.visits(c) for c in rest), math.nan)
            )
            kids_of.append([])
            kids_of[i].append(j)

    visit(ROOT, -1)
    row = 0
    for i, box in enumerate(boxes):
        if not kids_of[i]:
            box.y = _TOP + row * _ROW
            row += 1
    for i in range(len(boxes) - 1, -1, -1):
        if kids_of[i]:
            boxes[i].inner = True
            boxes[i].y = (boxes[kids_of[i][0]].y + boxes[kids_of[i][-1]].y) / 2
    level = cfg.label_chars * _CHAR + 120
    root_visits = max(tree.visits(ROOT), 1)
    for box in boxes:
        box.x = _LEFT + 10 + box.depth * level
        box.r = 3.0 + 6.0 * math.sqrt(min(box.visits / root_visits, 1.0))
    max_depth = max(b.depth for b in boxes)
    width = _LEFT + 10 + max_depth * level + cfg.label_chars * _CHAR + 140
    legend_y = _TOP + max(row - 1, 0) * _ROW + 30
    label = data["meta"]["value_labels"][color]
    subtitle = (
        f"{tree.summary().nodes} nodes, {tree.visits(ROOT)} trajectories; top {cfg.depth} levels, at most "
        f"{cfg.max_children} children each; colour: {label}; thick edges: best path"
    )
    return _Figure(boxes, max(width, 640.0), legend_y + 40, tree.task_id, subtitle, legend_y)


_MARK = {"won": ("\u2713", "#1a9850"), "failed": ("\u2717", "#d73027"), "mixed": ("\u25d0", "#e08214")}
_CHOSEN_RING = "#2166ac"
_HALO = 'stroke="#ffffff" stroke-width="3" stroke-linejoin="round" paint-order="stroke"'
_REJECTED_RING = "#c51b7d"


def _svg(fig: _Figure) -> str:
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{fig.width:.0f}" height="{fig.height:.0f}" '
        f'viewBox="0 0 {fig.width:.0f} {fig.height:.0f}" font-family="DejaVu Sans, Arial, sans-serif">',
        '<rect width="100%" height="100%" fill="#ffffff"/>',
        f'<text x="{_LEFT}" y="22" font-size="15" font-weight="bold">{_xml_escape(fig.title)}</text>',
        f'<text x="{_LEFT}" y="40" font-size="11" fill="#555555">{_xml_escape(fig.subtitle)}</text>',
        '<g fill="none">',
    ]
    boxes = fig.boxes
    for b in boxes:
        if b.parent < 0:
            continue
        p = boxes[b.parent]
        mx = (p.x + b.x) / 2
        on_best = p.best and b.best
        stroke, width = ("#222222", 3.0) if on_best else ("#a0a0a0", 1.0)
        out.append(
            f'<path d="M{p.x + p.r:.1f},{p.y:.1f} C{mx:.1f},{p.y:.1f} {mx:.1f},{b.y:.1f} {b.x - b.r:.1f},{b.y:.1f}" '
            f'stroke="{stroke}" stroke-width="{width}"/>'
        )
    out.append("</g>")
    for b in boxes:
        if b.node < 0:
            out.append(
                f'<text x="{b.x - 4:.1f}" y="{b.y + 4:.1f}" font-size="11" fill="#777777" font-style="italic">'
                f"{_xml_escape(b.label)} (n={b.visits})</text>"
            )
            continue
        stroke = ' stroke="#222222" stroke-width="2"' if b.best else ' stroke="#555555" stroke-width="0.6"'
        out.append(f'<circle cx="{b.x:.1f}" cy="{b.y:.1f}" r="{b.r:.1f}" fill="{_color(b.value)}"{stroke}/>')
        if b.chosen:
            out.append(f'<circle cx="{b.x:.1f}" cy="{b.y:.1f}" r="{b.r + 3:.1f}" fill="none" '
                       f'stroke="{_CHOSEN_RING}" stroke-width="1.8"/>')  # fmt: skip
        if b.rejected:
            out.append(f'<circle cx="{b.x:.1f}" cy="{b.y:.1f}" r="{b.r + 5.5:.1f}" fill="none" '
                       f'stroke="{_REJECTED_RING}" stroke-width="1.5" stroke-dasharray="3,2"/>')  # fmt: skip
        x, y = (b.x - b.r, b.y - b.r - 4) if b.inner else (b.x + b.r + 7, b.y + 4)
        weight = ' font-weight="bold"' if b.best else ""
        stats = f"n={b.visits}" + ("" if b.value != b.value else f" v={b.value:.2f}")
        parts = [f"<tspan{weight}>{_xml_escape(b.label)}</tspan>"]
        if b.outcome:
            sym, col = _MARK[b.outcome]
            parts.append(f' <tspan fill="{col}" font-weight="bold">{sym}</tspan>')
        parts.append(
            f' <tspan fill="#777777" font-size="9">{stats}{f" +{b.below} below" if b.below else ""}</tspan>'
        )
        out.append(f'<text x="{x:.1f}" y="{y:.1f}" font-size="11" {_HALO}>{"".join(parts)}</text>')
    # legend
    y = fig.legend_y
    out.append('<defs><linearGradient id="w2s-scale">'
               + "".join(f'<stop offset="{i * 50}%" stop-color="{c}"/>' for i, c in enumerate(VALUE_COLORS))
               + "</linearGradient></defs>")  # fmt: skip
    out.append(
        f'<rect x="{_LEFT}" y="{y:.1f}" width="160" height="10" fill="url(#w2s-scale)" stroke="#555555" stroke-width="0.5"/>'
    )
    for i, lab in enumerate(("0", "0.5", "1")):
        out.append(
            f'<text x="{_LEFT + i * 80:.1f}" y="{y + 24:.1f}" font-size="10" text-anchor="middle">{lab}</text>'
        )
    x0 = _LEFT + 190
    out.append(
        f'<circle cx="{x0}" cy="{y + 5:.1f}" r="5" fill="{NO_VALUE_COLOR}" stroke="#555555" stroke-width="0.6"/>'
    )
    out.append(f'<text x="{x0 + 9}" y="{y + 9:.1f}" font-size="10">no value</text>')
    x0 += 70
    out.append(
        f'<circle cx="{x0}" cy="{y + 5:.1f}" r="5" fill="#ffffff" stroke="{_CHOSEN_RING}" stroke-width="1.8"/>'
    )
    out.append(f'<text x="{x0 + 9}" y="{y + 9:.1f}" font-size="10">chosen (TreeDPO)</text>')
    x0 += 110
    out.append(
        f'<circle cx="{x0}" cy="{y + 5:.1f}" r="5" fill="#ffffff" stroke="{_REJECTED_RING}" stroke-width="1.5" stroke-dasharray="3,2"/>'
    )
    out.append(f'<text x="{x0 + 9}" y="{y + 9:.1f}" font-size="10">rejected</text>')
    x0 += 70
    out.append(f'<text x="{x0}" y="{y + 9:.1f}" font-size="10"><tspan fill="#1a9850" font-weight="bold">\u2713</tspan> won '
               f'<tspan fill="#d73027" font-weight="bold">\u2717</tspan> failed '
               f'<tspan fill="#e08214" font-weight="bold">\u25d0</tspan> mixed (trajectories ending there); '
               "size: visits; n: visits, v: value</text>")  # fmt: skip
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _png(fig: _Figure, path: Path, dpi: int) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle, PathPatch
    from matplotlib.path import Path as MPath
    from matplotlib.patheffects import withStroke

    w, h = fig.width, fig.height
    figure = Figure(figsize=(w / 100, h / 100), dpi=dpi)
    FigureCanvasAgg(figure)
    ax = figure.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.axis("off")
    pt = 0.72  # points per pixel of the layout (100 layout pixels = 1 inch = 72 points)
    halo = [withStroke(linewidth=3 * pt, foreground="white")]

    def text(x: float, y: float, s: str, size: float, **kw: Any) -> None:
        ax.text(x, y, s, fontsize=size * pt, va="center", parse_math=False, **kw)

    text(_LEFT, 18, fig.title, 15, fontweight="bold")
    text(_LEFT, 37, fig.subtitle, 11, color="#555555")
    boxes = fig.boxes
    for b in boxes:
        if b.parent < 0:
            continue
        p = boxes[b.parent]
        mx = (p.x + b.x) / 2
        verts = [(p.x + p.r, p.y), (mx, p.y), (mx, b.y), (b.x - b.r, b.y)]
        best = p.best and b.best
        ax.add_patch(PathPatch(MPath(verts, [MPath.MOVETO, MPath.CURVE4, MPath.CURVE4, MPath.CURVE4]),
                               fill=False, edgecolor="#222222" if best else "#a0a0a0",
                               linewidth=(3.0 if best else 1.0) * pt))  # fmt: skip
    for b in boxes:
        if b.node < 0:
            text(b.x - 4, b.y, f"{b.label} (n={b.visits})", 11, color="#777777", style="italic")
            continue
        ax.add_patch(Circle((b.x, b.y), b.r, facecolor=_color(b.value),
                            edgecolor="#222222" if b.best else "#555555",
                            linewidth=(2.0 if b.best else 0.6) * pt))  # fmt: skip
        if b.chosen:
            ax.add_patch(Circle((b.x, b.y), b.r + 3, fill=False, edgecolor=_CHOSEN_RING, linewidth=1.8 * pt))
        if b.rejected:
            ax.add_patch(Circle((b.x, b.y), b.r + 5.5, fill=False, edgecolor=_REJECTED_RING,
                                linewidth=1.5 * pt, linestyle=(0, (3, 2))))  # fmt: skip
        stats = f"n={b.visits}" + ("" if b.value != b.value else f" v={b.value:.2f}")
        if b.below:
            stats += f" +{b.below} below"
        x, y = (b.x - b.r, b.y - b.r - 8) if b.inner else (b.x + b.r + 7, b.y)
        t = ax.text(x, y, b.label, fontsize=11 * pt, va="center", parse_math=False, path_effects=halo,
                    fontweight="bold" if b.best else "normal")  # fmt: skip
        if b.outcome:
            sym, col = _MARK[b.outcome]
            t = ax.annotate(" " + sym, xycoords=t, xy=(1, 0.5), va="center", fontsize=11 * pt, color=col,
                            fontweight="bold", annotation_clip=False, path_effects=halo)  # fmt: skip
        ax.annotate(" " + stats, xycoords=t, xy=(1, 0.5), va="center", fontsize=9 * pt, color="#777777",
                    annotation_clip=False, path_effects=halo)  # fmt: skip
    y = fig.legend_y
    cmap = LinearSegmentedColormap.from_list("w2s", list(VALUE_COLORS))
    ax.imshow(
        np.linspace(0, 1, 256)[None, :], cmap=cmap, extent=(_LEFT, _LEFT + 160, y + 10, y), aspect="auto"
    )
    for i, lab in enumerate(("0", "0.5", "1")):
        text(_LEFT + i * 80, y + 20, lab, 10, ha="center")
    x0 = _LEFT + 190
    ax.add_patch(Circle((x0, y + 5), 5, facecolor=NO_VALUE_COLOR, edgecolor="#555555", linewidth=0.6 * pt))
    text(x0 + 9, y + 5, "no value", 10)
    x0 += 70
    ax.add_patch(Circle((x0, y + 5), 5, fill=False, edgecolor=_CHOSEN_RING, linewidth=1.8 * pt))
    text(x0 + 9, y + 5, "chosen (TreeDPO)", 10)
    x0 += 110
    ax.add_patch(Circle((x0, y + 5), 5, fill=False, edgecolor=_REJECTED_RING, linewidth=1.5 * pt,
                        linestyle=(0, (3, 2))))  # fmt: skip
    text(x0 + 9, y + 5, "rejected", 10)
    x0 += 70
    text(x0, y + 5, "\u2713 won  \u2717 failed  \u25d0 mixed (trajectories ending there); size: visits; "
         "n: visits, v: value", 10)  # fmt: skip
    with atomic_write(path) as fh:  # a text handle: write the bytes through its buffer
        figure.savefig(fh.buffer, format="png", dpi=dpi, facecolor="white")
        fh.buffer.flush()
    path.chmod(0o644)


def export_static(
    tree: TrajectoryTree | str | os.PathLike[str],
    path: str | os.PathLike[str],
    format: StaticFormat | None = None,
    depth: int | None = None,
    *,
    search: SearchConfig | None = None,
    value: ValueKind | None = None,
    pairs: str | os.PathLike[str] | Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    paths: str | os.PathLike[str] | Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    config: VizConfig | None = None,
    dpi: int = 200,
) -> Path:
    """Draw the top levels of a tree as a static figure (for papers and reports); returns the path written.

    The root is on the left, each level to the right of its parent; a node's circle is coloured by the value
    of ``config.color`` and sized by visits, the best path is drawn with thick edges and bold labels, chosen
    and rejected children of TreeDPO pairs are ringed, and the outcomes of trajectories ending at a node are
    marked. Per node at most ``config.max_children`` children are drawn (most visited first, the best path's
    child always); the rest are one ``+N more`` node.

    Args:
        format: ``"svg"`` (written directly) or ``"png"`` (matplotlib); default from ``path``'s suffix.
        depth: levels below the root to draw (default ``config.depth``).
        dpi: resolution of a PNG.
        search, value, pairs, paths: as :func:`tree_view_data`.

    Raises:
        DataFormatError: the tree file, or a pair / SFT row, is invalid.
        ValueError: an unknown format.
    """
    cfg = config or VizConfig()
    if depth is not None:
        cfg = replace(cfg, depth=depth)
    out = Path(path)
    fmt = format or out.suffix.lstrip(".").lower()
    if fmt not in ("svg", "png"):
        raise ValueError(f"unknown figure format {fmt!r} (expected svg or png)")
    if dpi < 10:
        raise ValueError(f"dpi must be at least 10, got {dpi}")
    tree, _ = _as_tree(tree)
    data = tree_view_data(tree, search=search, value=value, pairs=pairs, paths=paths, config=cfg)
    fig = _static_figure(tree, data, cfg)
    if fmt == "svg":
        _write_text(out, _svg(fig))
    else:
        _png(fig, out, dpi)
    logger.debug("wrote %s (%d nodes drawn)", out, len(fig.boxes))
    return out
