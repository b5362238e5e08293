"""Trajectory trees as networkx graphs and as versioned node-link JSON files (``w2s.tree/2``).

The saved form (canonical ids; node attributes of :meth:`TrajectoryTree.node`)::

    {"schema": "w2s.tree/2", "directed": true, "multigraph": false,
     "graph": {"task_id": ..., "env_id": ..., "instruction": ..., "sources": [...], "search": {...}},
     "nodes": [{"id": 0, "depth": 0, "action": "", "thought": "", "observation": ..., "observation_before": "",
                "visits": 12, "return_sum": 4.5, "successes": 4, "failures": 8, "sources": {"weak-sft": 12},
                "search_visits": 1000, "search_value_sum": 398.2, "state_key": "9f1c...", "terminal": {},
                "thought_return": 0.0}, ...],
     "edges": [{"source": 0, "target": 1}, ...]}

``search_visits`` and ``search_value_sum`` are N and W of the last search; ``state_key`` (null when unknown) is
the key of the game state the node's action reached. Files of the first version (``w2s.tree/1``: the same
with ``mcts_visits`` and ``mcts_value`` for N and W, and no state keys) are read too. A node whose kept
thought came from a step with recorded token ids also has ``agent_tokens`` (``{"ids": [...], "tokenizer":
fingerprint}``); nodes without them have no such attribute, and readers that do not know it ignore it. Readers check every node
and edge and name the file (or graph) and the node of the first problem.
"""

from __future__ import annotations

import json
import math
import os
from array import array
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import networkx as nx
import numpy as np

from w2s_agents.atomic import atomic_write
from w2s_agents.errors import DataFormatError
from w2s_agents.tokens import recorded_token_ids
from w2s_agents.types import END_REASONS

from .counts import _SCALE, model_id
from .keys import FIRST_SEEN, ObservationKey, action_key, observation_key

if TYPE_CHECKING:
    from .tree import TrajectoryTree

TREE_SCHEMA = "w2s.tree/2"
"""Schema tag of saved trees; :meth:`TrajectoryTree.load` reads this and :data:`OLD_TREE_SCHEMAS`."""

OLD_TREE_SCHEMAS = {"w2s.tree/1": {"mcts_visits": "search_visits", "mcts_value": "search_value_sum"}}
"""Earlier schemas still read, with the names their node attributes had (old name -> name now)."""


def to_networkx(tree: TrajectoryTree) -> nx.DiGraph:
    """``tree`` as a ``networkx.DiGraph`` (see :meth:`TrajectoryTree.to_networkx`)."""
    tree.canonicalize()
    g = nx.DiGraph(
        task_id=tree.task_id,
        env_id=tree.env_id,
        instruction=tree.instruction,
        sources=sorted(tree._models),
        search=dict(tree.search_info),
    )
    if tree._state_conflicts:  # nodes reached with two different state keys (their state_key is null)
        g.graph["state_conflicts"] = sorted(tree._state_conflicts)
    for n in range(len(tree)):
        g.add_node(n, **tree.node(n))
    for n in range(1, len(tree)):
        g.add_edge(tree._parent[n], n)
    return g


def to_json(tree: TrajectoryTree) -> dict[str, Any]:
    """The saved form of ``tree``: node-link JSON with the schema tag."""
    g = to_networkx(tree)
    return {
        "schema": TREE_SCHEMA,
        "directed": True,
        "multigraph": False,
        "graph": dict(g.graph),
        "nodes": [{"id": n, **attrs} for n, attrs in g.nodes(data=True)],
        "edges": [{"source": u, "target": v} for u, v in g.edges()],
    }


def save(tree: TrajectoryTree, path: str | os.PathLike[str]) -> Path:
    """Write ``tree`` as versioned node-link JSON, atomically (temp file + rename); returns the path.

    Raises:
        DataFormatError: a text of the tree is not valid Unicode (a lone surrogate); nothing is written.
    """
    p = Path(path)
    data = json.dumps(to_json(tree), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    try:
        with atomic_write(p) as fh:
            fh.write(data)
    except UnicodeEncodeError as exc:
        raise DataFormatError(
            f"{p}: the tree of task {tree.task_id!r} holds text that is not valid Unicode "
            f"({exc.reason}: {exc.object[exc.start : exc.end]!r} at character {exc.start}); nothing written"
        ) from None
    return p


def load(
    cls: type[TrajectoryTree], path: str | os.PathLike[str], obs_key: ObservationKey | None
) -> TrajectoryTree:
    """Read a tree written by :func:`save` (see :meth:`TrajectoryTree.load`)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataFormatError(f"tree file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataFormatError(f"{p}: cannot read tree file: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{p}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(data, dict):
        raise DataFormatError(f"{p}: a tree file must hold a JSON object, got {type(data).__name__}")
    schema = data.get("schema")
    if schema != TREE_SCHEMA and schema not in OLD_TREE_SCHEMAS:
        what = "missing field 'schema'" if schema is None else f"unsupported tree schema {schema!r}"
        readable = ", ".join(repr(s) for s in (TREE_SCHEMA, *OLD_TREE_SCHEMAS))
        raise DataFormatError(f"{p}: {what} (this version reads {readable})")
    nodes, edges = data.get("nodes"), data.get("edges")
    if not isinstance(nodes, list) or not isinstance(edges, list):
        raise DataFormatError(f"{p}: 'nodes' and 'edges' must be lists")
    renamed = OLD_TREE_SCHEMAS.get(schema)
    if renamed:
        nodes = [
            {renamed.get(k, k): v for k, v in rec.items()} if isinstance(rec, dict) else rec for rec in nodes
        ]
    gattrs = data.get("graph")
    if not isinstance(gattrs, dict):
        raise DataFormatError(f"{p}: 'graph' must be an object")
    return from_records(cls, gattrs, nodes, edges, str(p), obs_key)


def from_networkx(
    cls: type[TrajectoryTree], graph: nx.DiGraph, obs_key: ObservationKey | None
) -> TrajectoryTree:
    """Rebuild a tree from :func:`to_networkx` output (see :meth:`TrajectoryTree.from_networkx`)."""
    nodes = [{"id": n, **attrs} for n, attrs in graph.nodes(data=True)]
    edges = [{"source": u, "target": v} for u, v in graph.edges()]
    return from_records(cls, dict(graph.graph), nodes, edges, "graph", obs_key)


def from_records(
    cls: type[TrajectoryTree],
    gattrs: Mapping[str, Any],
    nodes: Sequence[Mapping[str, Any]],
    edges: Sequence[Mapping[str, Any]],
    where: str,
    obs_key: ObservationKey | None,
) -> TrajectoryTree:
    """A canonical tree from node-link records (graph attributes, nodes, edges), every record checked.

    Raises:
        DataFormatError: ``where``, then the problem: the records are not a tree rooted at node 0, or a node
            attribute is missing or invalid.
    """

    def fail(msg: str) -> DataFormatError:
        return DataFormatError(f"{where}: {msg}")

    task_id = gattrs.get("task_id")
    if not isinstance(task_id, str) or not task_id:
        raise fail("graph attribute 'task_id' must be a non-empty string")
    for name in ("env_id", "instruction"):
        if not isinstance(gattrs.get(name, ""), str):
            raise fail(f"graph attribute '{name}' must be a string")
    tree = cls(
        task_id,
        env_id=gattrs.get("env_id", ""),
        instruction=gattrs.get("instruction", ""),
        obs_key=obs_key,
    )
    n = len(nodes)
    if n == 0:
        raise fail("no nodes (a tree has at least its root)")
    by_id: dict[int, Mapping[str, Any]] = {}
    for i, rec in enumerate(nodes):
        nid = rec.get("id") if isinstance(rec, Mapping) else None
        if not isinstance(nid, int) or isinstance(nid, bool) or not 0 <= nid < n or nid in by_id:
            raise fail(f"nodes[{i}]: id must be a unique integer in 0..{n - 1}, got {nid!r}")
        by_id[nid] = rec
    parent = [-1] * n
    for i, e in enumerate(edges):
        u, v = (e.get("source"), e.get("target")) if isinstance(e, Mapping) else (None, None)
        if u not in by_id or v not in by_id or v == 0:
            raise fail(
                f"edges[{i}]: source and target must be node ids (target not the root), got {u!r}->{v!r}"
            )
        if parent[v] != -1:
            raise fail(f"node {v}: more than one parent")
        parent[v] = u
    for v in range(1, n):
        if parent[v] == -1:
            raise fail(f"node {v}: no parent (not connected to the root)")
    depth = [-1] * n
    depth[0] = 0
    # ids are canonical preorder in saved files, but accept any order: resolve depths iteratively
    for v in range(1, n):
        chain = []
        u = v
        while depth[u] < 0:
            chain.append(u)
            u = parent[u]
            if len(chain) > n:
                raise fail(f"node {v}: its parents form a cycle")
        for w in reversed(chain):
            depth[w] = depth[parent[w]] + 1
    order = sorted(range(n), key=lambda v: (depth[v], v))  # parents before their children
    new_id = {old: i for i, old in enumerate(order)}
    tree._key, tree._parent, tree._depth, tree._oka, tree._otext = [], array("q"), array("q"), [], []
    tree._canonical = False
    tree._thought, tree._tret, tree._ret, tree._tokens = [], array("q"), [], []
    tree._visits, tree._succ, tree._src = array("q"), array("q"), array("q")
    tree._state = []
    mv: list[int] = []
    mval: list[float] = []
    for old in order:
        rec = by_id[old]
        attrs = _check_node(rec, old, fail)
        if attrs["depth"] != depth[old]:
            raise fail(f"node {old}: depth {attrs['depth']} but it is {depth[old]} edges below the root")
        i = new_id[old]
        if old == 0:
            key: tuple[int, Any, Any] = (-1, "", None)
        else:
            p = new_id[parent[old]]
            okey = observation_key(tree, attrs["observation_before"])
            # the parent's first text is its shown observation, whose key is its shown key
            key = (p, action_key(tree, attrs["action"]), FIRST_SEEN if okey is tree._oka[p] else okey)
            if key in tree._index:
                raise fail(
                    f"node {old}: same action and observation as its sibling {order[tree._index[key]]}"
                )
            tree._index[key] = i
        tree._oka.append(observation_key(tree, attrs["observation"]))
        tree._otext.append(attrs["observation"])
        tree._key.append(key)
        tree._parent.append(key[0])
        tree._depth.append(depth[old])
        tree._thought.append(attrs["thought"])
        tree._tret.append(round(attrs["thought_return"] * _SCALE) if old else -1)
        tree._tokens.append(_agent_tokens(rec.get("agent_tokens"), old, fail))
        tree._visits.append(attrs["visits"])
        tree._ret.append(round(attrs["return_sum"] * _SCALE))
        tree._succ.append(attrs["successes"])
        srcs = attrs["sources"]
        ids = {model_id(tree, m): c for m, c in sorted(srcs.items())}
        if len(ids) == 1 and next(iter(ids.values())) == attrs["visits"]:
            tree._src.append(next(iter(ids)))
        else:
            tree._src.append(-1)
            if ids:
                tree._src_sparse[i] = ids
        if attrs["terminal"]:
            for j, name in enumerate(END_REASONS):
                tree._terminal.add(i, j, attrs["terminal"].get(name, 0))
        mv.append(attrs["search_visits"])
        mval.append(attrs["search_value_sum"])
        state = rec.get("state_key")
        if state is not None and (not isinstance(state, str) or not state):
            raise fail(f"node {old}: attribute 'state_key' must be a non-empty string or null, got {state!r}")
        tree._state.append(state)
    tree._state_seen = any(s is not None for s in tree._state)
    conflicts = gattrs.get("state_conflicts", [])
    if not isinstance(conflicts, list) or not all(isinstance(v, int) and v in new_id for v in conflicts):
        raise fail("graph attribute 'state_conflicts' must be a list of node ids")
    tree._state_conflicts = {new_id[v] for v in conflicts}
    for model in gattrs.get("sources", []) or []:
        if isinstance(model, str):
            model_id(tree, model)
    if any(mv) or any(mval):
        tree._search_visits = np.asarray(mv, dtype=np.int64)
        tree._search_value_sum = np.asarray(mval, dtype=np.float64)
    tree._ret_bound = max(map(abs, tree._ret))
    tree._settled_below = n  # every text was keyed above
    search = gattrs.get("search", {})
    tree.search_info = dict(search) if isinstance(search, Mapping) else {}
    tree.canonicalize()
    return tree


_NODE_FIELDS: dict[str, tuple[type, ...]] = {
    "depth": (int,),
    "action": (str,),
    "thought": (str,),
    "observation": (str,),
    "observation_before": (str,),
    "visits": (int,),
    "return_sum": (int, float),
    "successes": (int,),
    "failures": (int,),
    "sources": (dict,),
    "search_visits": (int,),
    "search_value_sum": (int, float),
    "terminal": (dict,),
    "thought_return": (int, float),
}


def _agent_tokens(
    v: Any, nid: int, fail: Callable[[str], DataFormatError]
) -> tuple[tuple[int, ...], str] | None:
    """The optional node attribute ``agent_tokens`` (``{"ids": [token ids], "tokenizer": fingerprint}``)."""
    if v is None:
        return None
    record = recorded_token_ids(v)
    if record is None:
        raise fail(
            f"node {nid}: attribute 'agent_tokens' must be {{'ids': [token ids], 'tokenizer': fingerprint}}"
        )
    return tuple(record[0]), record[1]


def _check_node(rec: Mapping[str, Any], nid: int, fail: Callable[[str], DataFormatError]) -> dict[str, Any]:
    """The attributes of the node record ``rec`` (id ``nid``), each checked; raises ``fail(problem)``."""
    out: dict[str, Any] = {}
    for name, types in _NODE_FIELDS.items():
        if name not in rec:
            raise fail(f"node {nid}: missing attribute '{name}'")
        v = rec[name]
        if not isinstance(v, types) or isinstance(v, bool):
            raise fail(
                f"node {nid}: attribute '{name}' must be {' or '.join(t.__name__ for t in types)}, got {v!r}"
            )
        if isinstance(v, float) and not math.isfinite(v):
            raise fail(f"node {nid}: attribute '{name}' must be finite, got {v!r}")
        out[name] = v
    if out["visits"] < 0 or not 0 <= out["successes"] <= out["visits"]:
        raise fail(f"node {nid}: need 0 <= successes <= visits, got {out['successes']} and {out['visits']}")
    if out["failures"] != out["visits"] - out["successes"]:
        raise fail(f"node {nid}: failures {out['failures']} != visits - successes")
    if not 0 <= out["thought_return"] <= 1:
        raise fail(
            f"node {nid}: attribute 'thought_return' must be a return in [0, 1], got {out['thought_return']!r}"
        )
    for name in ("sources", "terminal"):
        for k, c in out[name].items():
            if not isinstance(k, str) or not isinstance(c, int) or isinstance(c, bool) or c < 0:
                raise fail(f"node {nid}: attribute '{name}' must map names to counts, got {k!r}: {c!r}")
    if sum(out["sources"].values()) != out["visits"]:
        raise fail(
            f"node {nid}: source counts sum to {sum(out['sources'].values())}, not visits {out['visits']}"
        )
    bad = set(out["terminal"]) - set(END_REASONS)
    if bad:
        raise fail(
            f"node {nid}: unknown terminal outcome {sorted(bad)[0]!r} (expected {', '.join(END_REASONS)})"
        )
    return out
