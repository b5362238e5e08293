"""Trajectory trees: the trajectories of one task, successes and failures alike, merged into one tree.

The root is the task (instruction and first observation). A step of a trajectory joins an existing child of
the node it starts from when its action matches after normalisation (strip, lowercase, collapse spaces) *and*
the key of the observation it acted on matches (by default the normalised text; pass ``obs_key`` for envs with
noisy observations). Children are found by one dict lookup, so inserting a trajectory costs O(length). A node
therefore stands for "this action, taken on this observation, after this history".

Per node the tree keeps the data statistics of DESIGN section 4: ``visits`` (trajectories through the node),
``return_sum`` (their final returns), ``successes`` and ``failures`` (won / not won), ``sources`` (trajectories
per model) and ``terminal`` (how the trajectories that ended at the node ended), plus the search statistics
``mcts_visits`` and ``mcts_value`` written by :mod:`w2s_agents.search`.

Storage is a struct of arrays: one ``array("q")`` per integer attribute and one Python list per text
attribute, indexed by node id (texts are references to strings, not copies), a dict ``(parent, action key,
observation key) -> child`` for merging, flat count tables for the rarer cases (nodes reached by several
models, nodes where trajectories ended), and the children in CSR form (two numpy arrays,
:meth:`TrajectoryTree.child_arrays`). A tree of any size thus holds a few dozen objects that the garbage
collector tracks, not one per node. :func:`add_trajectories` groups trajectories by task before merging, so
that a tree's index stays in the CPU caches while its trajectories go in. Normalised keys are cached per raw
text, and the observation after a known step is first compared with a raw text of the node's observation key,
so a repeated step costs a string comparison rather than a hash of the observation. Returns are summed in fixed
point (units of 2**-32, exact for the usual returns and within 2**-32 per trajectory otherwise), so the sums,
and the whole tree, do not depend on the order trajectories are added in.

:meth:`TrajectoryTree.add` merges the steps and keeps the thoughts at once, but only records each trajectory's
path of node ids for the counted statistics (visits, return sums, successes, sources, terminal outcomes and
depths): they are summed the next time any of them is read (every reader does it first, or
:meth:`~TrajectoryTree.update_statistics`), with numpy when many steps are pending and one by one when few are,
so the results are those of adding the statistics step by step.

The tree's texts are order-independent too: where merged steps differ in spelling, a node shows the smallest
raw text of its key; its thought is that of the highest-return trajectory through it (smallest text on ties).
:meth:`TrajectoryTree.canonicalize` renumbers nodes in preorder with children sorted by (action key,
observation key); the builders, :meth:`~TrajectoryTree.to_networkx` and :meth:`~TrajectoryTree.save` apply it,
so the same trajectories in any order give the same node ids and the same file.

Trees are saved as versioned networkx node-link JSON (``w2s.tree/1``)::

    {"schema": "w2s.tree/1", "directed": true, "multigraph": false,
     "graph": {"task_id": ..., "env_id": ..., "instruction": ..., "sources": [...], "search": {...}},
     "nodes": [{"id": 0, "depth": 0, "action": "", "thought": "", "observation": ..., "observation_before": "",
                "visits": 12, "return_sum": 4.5, "successes": 4, "failures": 8, "sources": {"weak-sft": 12},
                "mcts_visits": 1000, "mcts_value": 398.2, "terminal": {}, "thought_return": 0.0}, ...],
     "edges": [{"source": 0, "target": 1}, ...]}
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import os
import re
from array import array
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from operator import itemgetter
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np

from w2s_agents.atomic import atomic_write
from w2s_agents.errors import DataFormatError
from w2s_agents.types import END_REASONS, Trajectory

__all__ = [
    "ROOT",
    "TREE_SCHEMA",
    "ObservationKey",
    "TrajectoryTree",
    "TreeSummary",
    "add_trajectories",
    "build_trees",
    "normalize_text",
    "tree_filename",
]

logger = logging.getLogger(__name__)

TREE_SCHEMA = "w2s.tree/1"
"""Schema tag of saved trees; :meth:`TrajectoryTree.load` rejects any other value."""

ROOT = 0
"""Node id of the root (the task) in every tree."""

ObservationKey = Callable[[str], Hashable]
"""Maps an observation to the key steps merge on; keys must be hashable and mutually orderable."""

_SCALE = 1 << 32  # fixed-point unit of summed returns
# per-node lists other than _key, permuted together by canonicalize()
_NODE_LISTS = (
    "_depth",
    "_oka",
    "_otext",
    "_thought",
    "_tret",
    "_visits",
    "_ret",
    "_succ",
    "_src",
)
_END_INDEX = {name: i for i, name in enumerate(END_REASONS)}
_N_END = len(END_REASONS)
_DENSE_MODELS = 32  # up to this many models, the counts per model of a node are a list (else a dict)
_BULK_STEPS = 2048  # pending steps from which statistics are summed with numpy rather than one by one
# per-node int64 statistics held as array('q') (8 bytes a node, copied to and from numpy without a loop);
# return sums stay a list: past 2**62 they are summed as Python ints
_INT_ARRAYS = ("_depth", "_tret", "_visits", "_succ", "_src")


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the garbage collector (restoring its state after).

    For the bulk passes that allocate one short-lived or untracked object per step or node (lookup keys,
    the tuples of renumbered keys): otherwise the allocations trigger full collections, and every full
    collection walks the per-node lists of every tree in memory, for no garbage: these passes make no
    reference cycles."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _zeros(n: int) -> array:
    """An ``array("q")`` of ``n`` zeros."""
    return array("q", bytes(8 * n))


def _int_array(values: np.ndarray) -> array:
    """An ``array("q")`` of the values of a numpy array (copied without a Python loop)."""
    out = array("q")
    out.frombytes(np.ascontiguousarray(values, dtype=np.int64).tobytes())
    return out


class _Rows:
    """Rows of int64 counts for some of a tree's nodes: one flat ``array("q")`` of ``width`` counts a row and a
    dict node -> row number. It holds no Python object per row, so the garbage collector has nothing to scan
    however many rows there are (a list per row made every full collection walk them all)."""

    __slots__ = ("data", "index", "width")

    def __init__(self, width: int) -> None:
        self.width = width
        self.index: dict[int, int] = {}
        self.data = array("q")

    def get(self, node: int) -> list[int] | None:
        """The counts of ``node`` (a copy), or None when it has no row."""
        r = self.index.get(node)
        if r is None:
            return None
        w = self.width
        return self.data[r * w : (r + 1) * w].tolist()

    def add(self, node: int, col: int, x: int = 1) -> None:
        """Add ``x`` to column ``col`` of ``node``'s row (created with zeros when missing)."""
        r = self.index.get(node)
        if r is None:
            r = self.index[node] = len(self.data) // self.width
            self.data.extend(_zeros(self.width))
        self.data[r * self.width + col] += x

    def pop(self, node: int) -> list[int] | None:
        """Remove ``node``'s row and return its counts (its space is not reused)."""
        row = self.get(node)
        if row is not None:
            del self.index[node]
        return row

    def widen(self, width: int) -> None:
        """Give every row ``width`` columns (the new ones zero)."""
        if width <= self.width:
            return
        if self.data:
            old = np.frombuffer(self.data, dtype=np.int64).reshape(-1, self.width)
            new = np.zeros((len(old), width), dtype=np.int64)
            new[:, : self.width] = old
            del old  # release the buffer before the array is replaced
            self.data = _int_array(new)
        self.width = width

    def add_table(self, nodes: list[int], table: np.ndarray) -> None:
        """Add ``table[i]`` (``width`` columns) to the row of ``nodes[i]`` for every i, creating missing rows."""
        index, w = self.index, self.width
        have = np.fromiter((index.get(c, -1) for c in nodes), dtype=np.int64, count=len(nodes))
        old = have >= 0
        n_rows = len(self.data) // w if w else 0
        rows = np.frombuffer(self.data, dtype=np.int64).reshape(n_rows, w) if n_rows else None
        if rows is not None and old.any():
            rows = rows.copy()
            rows[have[old]] += table[old]
        fresh = np.flatnonzero(~old)
        index.update(zip([nodes[i] for i in fresh.tolist()], range(n_rows, n_rows + len(fresh)), strict=True))
        parts = [table[fresh]] if rows is None else [rows, table[fresh]]
        self.data = _int_array(np.concatenate(parts))

    def remap(self, new_id: Sequence[int]) -> None:
        """Renumber the nodes (``new_id[old]``)."""
        self.index = {new_id[n]: r for n, r in self.index.items()}


def normalize_text(text: str) -> str:
    """Strip, lowercase and collapse runs of whitespace to one space (the default action and observation key)."""
    return " ".join(text.split()).lower()


@dataclass(frozen=True)
class TreeSummary:
    """Shape and outcome counts of one tree."""

    task_id: str
    nodes: int
    """Number of nodes, root included."""
    depth: int
    """Depth of the deepest node (the root has depth 0)."""
    leaves: int
    """Nodes without children."""
    trajectories: int
    """Trajectories merged into the tree (the root's visits)."""
    successes: int
    failures: int
    mean_return: float
    branch_points: int
    """Nodes with two or more children (where pairs can be taken)."""
    branching_mean: float
    """Mean number of children over the nodes that have any."""
    branching_max: int
    sources: Mapping[str, int]
    """Trajectories per model."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready mapping."""
        d = dict(self.__dict__)
        d["sources"] = dict(self.sources)
        return d


class TrajectoryTree:
    """The trajectories of one task merged into a tree with per-node statistics.

    Args:
        task_id: the task every added trajectory must belong to.
        env_id: the env of the task (taken from the first trajectory when empty).
        instruction: the task's goal (taken from the trajectories when empty).
        obs_key: key of an observation for merging (default :func:`normalize_text`); keys must be hashable
            and orderable (children are sorted by them).

    Node ids are integers, ``ROOT`` (0) being the task. Attributes are read with the accessor methods
    (:meth:`action`, :meth:`visits`, ...) or all at once with :meth:`node`.
    """

    def __init__(
        self,
        task_id: str,
        *,
        env_id: str = "",
        instruction: str = "",
        obs_key: ObservationKey | None = None,
    ) -> None:
        self.task_id = task_id
        self.env_id = env_id
        self.instruction = instruction
        self.obs_key: ObservationKey = obs_key or normalize_text
        # struct of arrays, indexed by node id
        self._key: list[tuple[int, Any, Any]] = [(-1, "", None)]  # (parent, action key, obs key acted on)
        self._parent = array("q", [-1])  # the parents of _key, for numpy
        self._depth = array("q", [0])
        self._oka: list[Any] = [None]  # key of the observation after the action (root: first observation)
        # a raw text of key _oka (compared with each step's observation before hashing it; any text of the
        # key will do, so it is not kept in step with the displayed text)
        self._otext: list[str | None] = [None]
        self._thought: list[str] = [""]
        self._tret = array("q", [-1])  # fixed-point return of the trajectory whose thought is kept
        self._visits = array("q", [0])
        self._ret: list[int] = [0]  # fixed-point return sums
        self._succ = array("q", [0])
        self._src = array("q", [-1])  # index of the only model through the node, -1 when several (or none)
        # counts per model index where several models went through the node: a row of _mix (columns: the
        # first models, up to _DENSE_MODELS), or a dict in _src_sparse (more models, or loaded from a file,
        # which keeps explicit zero counts); a node is in one or the other
        self._mix = _Rows(0)
        self._src_sparse: dict[int, dict[int, int]] = {}
        self._terminal = _Rows(_N_END)  # node -> counts per END_REASONS, where trajectories ended
        # trajectories added since the statistics were last summed (see _flush): their paths, concatenated
        # (the root at the start of each path is marked by a negative code: see add)
        self._pend_nodes = array("q")
        self._pend_ret = array("q")  # fixed-point return of each pending trajectory
        self._ret_bound = 0  # upper bound of every |return sum| (the sum of every |return| added)
        self._index: dict[tuple[int, Any, Any], int] = {}
        # text tables: raw -> key, key -> smallest raw text (the node's displayed text)
        self._akc: dict[str, str] = {}
        self._okc: dict[str, Any] = {}
        self._action_text: dict[str, str] = {"": ""}
        self._obs_text: dict[Any, str] = {}
        self._obs_intern: dict[Any, Any] = {}
        self._models: list[str] = []
        self._model_index: dict[str, int] = {}
        self._children: tuple[np.ndarray, np.ndarray] | None = None  # CSR, see child_arrays()
        self._canonical = True  # ids are in canonical preorder (true until a node is added)
        self._mcts_visits: np.ndarray | None = None
        self._mcts_value: np.ndarray | None = None
        self.search_info: dict[str, Any] = {}
        """Settings of the last search that wrote ``mcts_*`` values (saved with the tree)."""

    # ------------------------------------------------------------------------------------------- building

    def _new_action(self, raw: str) -> str:
        key = normalize_text(raw)
        old = self._action_text.get(key)
        if old is None or raw < old:
            self._action_text[key] = raw
        self._akc[raw] = key
        return key

    def _new_obs(self, raw: str) -> Any:
        key = self.obs_key(raw)
        key = self._obs_intern.setdefault(key, key)
        old = self._obs_text.get(key)
        if old is None or raw < old:
            self._obs_text[key] = raw
        self._okc[raw] = key
        return key

    def _model_id(self, model: str) -> int:
        s = self._model_index.get(model)
        if s is None:
            s = self._model_index[model] = len(self._models)
            self._models.append(model)
        return s

    def _mix_source(self, node: int, s: int) -> None:
        """Count model ``s`` at ``node`` whose visits were just incremented, when it is not the only one."""
        only = self._src[node]
        mix, m = self._mix, len(self._models)
        if only >= 0:  # the second model through the node
            self._src[node] = -1
            if m <= _DENSE_MODELS:
                mix.widen(m)
                mix.add(node, only, self._visits[node] - 1)
                mix.add(node, s)
            else:
                self._src_sparse[node] = {only: self._visits[node] - 1, s: 1}
            return
        row = self._src_sparse.get(node)
        if row is not None:
            row[s] = row.get(s, 0) + 1
        elif s < mix.width:
            mix.add(node, s)
        elif m <= _DENSE_MODELS:
            mix.widen(m)
            mix.add(node, s)
        else:  # a model past the dense columns: the node's counts move to a dict
            old = mix.pop(node) or []
            row = self._src_sparse[node] = {i: x for i, x in enumerate(old) if x}
            row[s] = 1

    def update_statistics(self) -> None:
        """Sum the statistics of the trajectories added since the last read into the per-node totals.

        :meth:`add` records only each trajectory's path; every method that reads visits, returns, successes
        or sources calls this first, so calling it is never needed for correct results (it only moves the
        cost)."""
        if self._pend_ret:
            self._flush()

    def _flush(self) -> None:
        flat, rets = self._pend_nodes, self._pend_ret
        if not rets:
            return
        self._pend_nodes, self._pend_ret = array("q"), array("q")
        self._ret_bound += sum(map(abs, rets))
        n = len(self._key)
        fresh = len(self._visits) == 1 and self._visits[0] == 0  # nothing summed yet
        grow = n - len(self._visits)
        if grow:
            zeros = array("q", bytes(8 * grow))
            self._visits.extend(zeros)
            self._ret.extend([0] * grow)
            self._succ.extend(zeros)
            self._src.extend(array("q", [-1]) * grow)
            self._depth.extend(array("q", [-1]) * grow)
        if len(flat) < _BULK_STEPS or 4 * len(flat) < n or self._ret_bound >= 1 << 62:
            self._flush_loop(flat, rets)
        else:
            self._flush_bulk(flat, rets, fresh)

    def _flush_loop(self, flat: array, rets: array) -> None:
        """Few pending steps: update the touched nodes one by one."""
        visits, ret, succs, srcs, depths = self._visits, self._ret, self._succ, self._src, self._depth
        end_at = self._terminal.add
        t = end = -1
        r = won = s = depth = prev = 0
        for c in flat:
            if c < 0:  # the root, at the start of the next trajectory
                if t >= 0:
                    end_at(prev, end)
                t += 1
                code, end = divmod(~c, _N_END)
                s, won = code >> 1, code & 1
                r, c, depth = rets[t], 0, 0
            else:
                depth += 1
                depths[c] = depth
            v = visits[c] = visits[c] + 1
            ret[c] += r
            if won:
                succs[c] += 1
            if srcs[c] != s:
                if v == 1:
                    srcs[c] = s
                else:
                    self._mix_source(c, s)
            prev = c
        end_at(prev, end)

    def _flush_bulk(self, flat: array, rets: array, fresh: bool) -> None:
        """Many pending steps: count them with numpy (exact: integer counts and fixed-point sums in int64)."""
        n, k = len(self._key), len(flat)
        nodes = np.frombuffer(flat, dtype=np.int64).copy()
        starts = np.flatnonzero(nodes < 0)
        code, end = np.divmod(~nodes[starts], _N_END)
        nodes[starts] = 0
        traj = np.zeros(k, dtype=np.int64)
        traj[starts[1:]] = 1
        np.cumsum(traj, out=traj)  # trajectory of each pending step
        depths = np.zeros(n, dtype=np.int64) if fresh else np.asarray(self._depth, dtype=np.int64)
        depths[nodes] = np.arange(k, dtype=np.int64) - starts[traj]
        # how the trajectories ended, at their last nodes
        last = nodes[np.append(starts[1:], k) - 1]
        end_nodes, which = np.unique(last, return_inverse=True)
        table = np.zeros((len(end_nodes), _N_END), dtype=np.int64)
        np.add.at(table, (which, end), 1)
        self._terminal.add_table(end_nodes.tolist(), table)
        won = (code & 1).astype(bool)[traj]
        model = (code >> 1)[traj]
        add_visits = np.bincount(nodes, minlength=n)
        add_ret = np.zeros(n, dtype=np.int64)
        np.add.at(add_ret, nodes, np.frombuffer(rets, dtype=np.int64)[traj])
        add_succ = np.bincount(nodes[won], minlength=n)
        old_visits = np.zeros(n, dtype=np.int64) if fresh else np.asarray(self._visits, dtype=np.int64)
        # sources: per node, the (model, count) pairs of the pending steps
        m = len(self._models)
        pairs = nodes * m + model
        if n * m <= 4 * (len(flat) + n):
            pair_counts = np.bincount(pairs, minlength=n * m)
            pairs = np.flatnonzero(pair_counts)
            pair_counts = pair_counts[pairs]
        else:
            pairs, pair_counts = np.unique(pairs, return_counts=True)
        pair_node, pair_model = np.divmod(pairs, m)  # sorted by node
        kinds = np.bincount(pair_node, minlength=n)
        only = np.full(n, -1, dtype=np.int64)
        only[pair_node] = pair_model  # the model of the nodes with one kind
        old_src = np.full(n, -1, dtype=np.int64) if fresh else np.asarray(self._src, dtype=np.int64)
        single = kinds == 1
        first = single & (old_visits == 0)  # new to the tree: one model
        same = single & (old_visits > 0) & (old_src == only)  # one model, the one it had
        is_mixed = (kinds > 0) & ~first & ~same
        src = old_src.copy()
        src[first] = only[first]
        src[is_mixed] = -1
        mix, sparse = self._mix, self._src_sparse
        if m > _DENSE_MODELS:  # many models: counts in dicts, pair by pair
            at = is_mixed[pair_node]
            for c, s, x, s0, v0 in zip(
                pair_node[at].tolist(),
                pair_model[at].tolist(),
                pair_counts[at].tolist(),
                old_src[pair_node[at]].tolist(),
                old_visits[pair_node[at]].tolist(),
                strict=True,
            ):
                row = sparse.get(c)
                if row is None:
                    old = mix.pop(c)  # counts in the dense columns move to the dict
                    if old is not None:
                        row = {i: y for i, y in enumerate(old) if y}
                    else:
                        row = {s0: v0} if v0 else {}
                    sparse[c] = row
                row[s] = row.get(s, 0) + x
            self._set_stats(fresh, old_visits, add_visits, add_ret, add_succ, src, depths)
            return
        # the mixed nodes' counts per model: pending pairs, plus the visits of the one model they had
        mixed = np.flatnonzero(is_mixed)
        row_of = np.zeros(n, dtype=np.int64)
        row_of[mixed] = np.arange(len(mixed))
        sel = is_mixed[pair_node]
        table = np.zeros((len(mixed), m), dtype=np.int64)
        np.add.at(table, (row_of[pair_node[sel]], pair_model[sel]), pair_counts[sel])
        had_one = np.flatnonzero((old_src[mixed] >= 0) & (old_visits[mixed] > 0))
        table[had_one, old_src[mixed[had_one]]] += old_visits[mixed[had_one]]
        dense = np.ones(len(mixed), dtype=bool)
        if sparse:  # nodes already counted in dicts (loaded from a file) stay there
            for i in np.flatnonzero((old_src[mixed] < 0) & (old_visits[mixed] > 0)).tolist():
                row = sparse.get(int(mixed[i]))
                if row is not None:
                    for j, x in enumerate(table[i].tolist()):
                        if x:
                            row[j] = row.get(j, 0) + x
                    dense[i] = False
        mix.widen(m)
        mix.add_table(mixed[dense].tolist(), table[dense])  # adds to the rows of already mixed nodes
        self._set_stats(fresh, old_visits, add_visits, add_ret, add_succ, src, depths)

    def _set_stats(
        self,
        fresh: bool,
        old_visits: np.ndarray,
        add_visits: np.ndarray,
        add_ret: np.ndarray,
        add_succ: np.ndarray,
        src: np.ndarray,
        depths: np.ndarray,
    ) -> None:
        if fresh:
            self._visits, self._ret, self._succ = (
                _int_array(add_visits),
                add_ret.tolist(),
                _int_array(add_succ),
            )
        else:
            self._visits = _int_array(old_visits + add_visits)
            self._ret = (np.asarray(self._ret, dtype=np.int64) + add_ret).tolist()
            self._succ = _int_array(np.asarray(self._succ, dtype=np.int64) + add_succ)
        self._src = _int_array(src)
        self._depth = _int_array(depths)

    def add(self, traj: Trajectory) -> int:
        """Merge one trajectory into the tree; returns the id of the node it ended at.

        Raises:
            ValueError: the trajectory belongs to another task.
        """
        return self._merge((traj,))[1]

    def extend(self, trajectories: Iterable[Trajectory]) -> int:
        """Merge several trajectories (faster than :meth:`add` one by one); returns how many were added.

        Raises:
            ValueError: a trajectory belongs to another task (those before it are merged).
        """
        if isinstance(trajectories, (list, tuple)):  # nothing of the caller's runs meanwhile
            with _gc_paused():
                return self._merge(trajectories)[0]
        return self._merge(trajectories)[0]

    def _merge(self, trajectories: Iterable[Trajectory]) -> tuple[int, int]:
        """Merge trajectories; returns how many, and the node the last one ended at (-1 when none)."""
        task_id = self.task_id
        akc, okc, index, keys, parents = self._akc, self._okc, self._index, self._key, self._parent
        oka, otext, thoughts, trets = self._oka, self._otext, self._thought, self._tret
        models, new_obs, new_action = self._model_index, self._new_obs, self._new_action
        flat_append, ret_append = self._pend_nodes.append, self._pend_ret.append
        end_index, n_end = _END_INDEX, _N_END
        n0 = len(keys)
        count = 0
        node = -1
        try:
            for traj in trajectories:
                if traj.task_id != task_id:
                    raise ValueError(
                        f"trajectory of task {traj.task_id!r} added to the tree of task {task_id!r}"
                    )
                if traj.instruction != self.instruction and (
                    not self.instruction or traj.instruction < self.instruction
                ):
                    self.instruction = traj.instruction  # smallest wins: order-independent
                if not self.env_id:
                    self.env_id = traj.env_id
                r = round(traj.return_ * _SCALE)
                s = models.get(traj.source.model)
                if s is None:
                    s = self._model_id(traj.source.model)
                # an observation is first compared with a raw text of the key the node has seen (it nearly
                # always is that text): one string comparison instead of hashing the observation

                # the root: the task itself
                o = traj.initial_observation
                okey = oka[0]
                if okey is None or o != otext[0]:
                    okey = okc.get(o)
                    if okey is None:
                        okey = new_obs(o)
                    if oka[0] is None or (okey is not oka[0] and okey < oka[0]):
                        oka[0] = okey
                        otext[0] = o
                # the root starts the trajectory's path, marked by ~code (negative): model, success and how
                # it ended
                flat_append(~(((s << 1) | (1 if traj.success else 0)) * n_end + end_index[traj.end]))
                ret_append(r)
                count += 1
                node = 0
                for step in traj.steps:
                    a = step.action
                    ak = akc.get(a)
                    if ak is None:
                        ak = new_action(a)
                    key = (node, ak, okey)
                    c = index.get(key)
                    o = step.observation
                    if c is None:
                        okey = okc.get(o)
                        if okey is None:
                            okey = new_obs(o)
                        c = index[key] = len(keys)
                        keys.append(key)
                        parents.append(node)
                        oka.append(okey)
                        otext.append(o)
                        thoughts.append(step.thought)
                        trets.append(r)
                    else:
                        if o == otext[c]:
                            okey = oka[c]
                        else:
                            ok2 = oka[c]
                            okey = okc.get(o)
                            if okey is None:
                                okey = new_obs(o)
                            if okey is not ok2 and okey < ok2:
                                oka[c] = okey
                                otext[c] = o
                        t = trets[c]
                        if r >= t and (r > t or step.thought < thoughts[c]):
                            thoughts[c] = step.thought
                            trets[c] = r
                    flat_append(c)
                    node = c
        finally:
            if len(keys) != n0:
                self._canonical = False
                self._children = None
        # visits, return sums, successes, sources, depths and ends are summed when next read (see _flush)
        return count, node

    # -------------------------------------------------------------------------------------------- queries

    def __len__(self) -> int:
        return len(self._key)

    @property
    def num_nodes(self) -> int:
        """Number of nodes, root included."""
        return len(self._key)

    @property
    def models(self) -> tuple[str, ...]:
        """Models whose trajectories are in the tree, in order of first appearance."""
        return tuple(self._models)

    def parent(self, node: int) -> int:
        """Parent id (-1 for the root)."""
        return self._parent[node]

    def depth(self, node: int) -> int:
        """Number of actions from the root to ``node``."""
        if self._pend_ret:
            self._flush()
        return self._depth[node]

    def action_key(self, node: int) -> str:
        """Normalised action of ``node`` ("" for the root)."""
        return self._key[node][1]

    def obs_key_before(self, node: int) -> Any:
        """Key of the observation the node's action was chosen on (None for the root)."""
        return self._key[node][2]

    def action(self, node: int) -> str:
        """The action as sent (the smallest raw spelling of its normalised form; "" for the root)."""
        return self._action_text[self._key[node][1]]

    def thought(self, node: int) -> str:
        """The thought before the action (from the highest-return trajectory through the node)."""
        return self._thought[node]

    def observation(self, node: int) -> str:
        """The observation after the node's action (for the root: the first observation)."""
        k = self._oka[node]
        return "" if k is None else self._obs_text[k]

    def observation_before(self, node: int) -> str:
        """The observation the node's action was chosen on ("" for the root)."""
        k = self._key[node][2]
        return "" if k is None else self._obs_text[k]

    def visits(self, node: int) -> int:
        """Trajectories through ``node``."""
        if self._pend_ret:
            self._flush()
        return self._visits[node]

    def return_sum(self, node: int) -> float:
        """Sum of the final returns of the trajectories through ``node``."""
        if self._pend_ret:
            self._flush()
        return self._ret[node] / _SCALE

    def mean_return(self, node: int) -> float:
        """Mean final return of the trajectories through ``node`` (0 when none)."""
        if self._pend_ret:
            self._flush()
        v = self._visits[node]
        return self._ret[node] / _SCALE / v if v else 0.0

    def mean_returns(self, nodes: Iterable[int]) -> list[float]:
        """:meth:`mean_return` of several nodes."""
        if self._pend_ret:
            self._flush()
        visits, rets = self._visits, self._ret
        return [rets[n] / _SCALE / visits[n] if visits[n] else 0.0 for n in nodes]

    def successes(self, node: int) -> int:
        """Trajectories through ``node`` that were won."""
        if self._pend_ret:
            self._flush()
        return self._succ[node]

    def failures(self, node: int) -> int:
        """Trajectories through ``node`` that were not won (lost, truncated or failed): visits - successes."""
        if self._pend_ret:
            self._flush()
        return self._visits[node] - self._succ[node]

    def sources(self, node: int) -> dict[str, int]:
        """Trajectories through ``node`` per model, sorted by model name."""
        if self._pend_ret:
            self._flush()
        s = self._src[node]
        if s >= 0:
            return {self._models[s]: self._visits[node]}
        row = self._src_sparse.get(node)
        items = (
            row.items() if row is not None else [(i, n) for i, n in enumerate(self._mix.get(node) or ()) if n]
        )
        return {self._models[i]: n for i, n in sorted(items, key=lambda kv: self._models[kv[0]])}

    def terminal(self, node: int) -> dict[str, int]:
        """How the trajectories that ended at ``node`` ended (outcome -> count; empty when none ended here)."""
        if self._pend_ret:
            self._flush()
        ends = self._terminal.get(node)
        if ends is None:
            return {}
        return {name: n for name, n in zip(END_REASONS, ends, strict=True) if n}

    def mcts_visits(self, node: int) -> int:
        """Simulations of the last search through ``node`` (0 before any search)."""
        return 0 if self._mcts_visits is None else int(self._mcts_visits[node])

    def mcts_value(self, node: int) -> float:
        """Sum of the values backed up through ``node`` by the last search (r_M; 0 before any search)."""
        return 0.0 if self._mcts_value is None else float(self._mcts_value[node])

    def children(self, node: int) -> tuple[int, ...]:
        """Children of ``node`` in canonical order (by action key, then observation key)."""
        off, ids = self.child_arrays()
        return tuple(ids[off[node] : off[node + 1]].tolist())

    def child_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Children of every node in CSR form: ``ids[off[n]:off[n + 1]]`` are ``n``'s children in canonical
        order (``off``: int64, one more entry than nodes; ``ids``: int32). A shared cache; do not modify."""
        if self._children is None:
            self._children = self._build_children()
        return self._children

    def _build_children(self) -> tuple[np.ndarray, np.ndarray]:
        n = len(self._key)
        parents = np.array(self._parent, dtype=np.int64)[1:]
        counts = np.bincount(parents, minlength=n)
        off = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(counts, out=off[1:])
        if self._canonical:  # grouped by parent, ascending ids: the canonical order
            return off, (np.argsort(parents, kind="stable") + 1).astype(np.int32)
        # sort each group of siblings by (action key, observation key): by the ranks of their keys among the
        # keys of the nodes that have siblings (one lexsort instead of a sort per group)
        multi = np.flatnonzero(counts[parents] >= 2) + 1
        arank = np.zeros(n - 1, dtype=np.int64)
        orank = np.zeros(n - 1, dtype=np.int64)
        if len(multi):
            picked = [self._key[c] for c in multi.tolist()]
            for col, rank in ((1, arank), (2, orank)):
                values = [k[col] for k in picked]
                of = {v: i for i, v in enumerate(sorted(set(values)))}
                rank[multi - 1] = np.fromiter(map(of.__getitem__, values), dtype=np.int64, count=len(values))
        return off, (np.lexsort((orank, arank, parents)) + 1).astype(np.int32)

    def path(self, node: int) -> list[int]:
        """Node ids from the root to ``node``, both included."""
        out = []
        while node >= 0:
            out.append(node)
            node = self._parent[node]
        out.reverse()
        return out

    def node(self, node: int) -> dict[str, Any]:
        """Every attribute of ``node`` (the node attributes of the saved format)."""
        if self._pend_ret:
            self._flush()
        return {
            "depth": self._depth[node],
            "action": self.action(node),
            "thought": self._thought[node],
            "observation": self.observation(node),
            "observation_before": self.observation_before(node),
            "visits": self._visits[node],
            "return_sum": self.return_sum(node),
            "successes": self._succ[node],
            "failures": self.failures(node),
            "sources": self.sources(node),
            "mcts_visits": self.mcts_visits(node),
            "mcts_value": self.mcts_value(node),
            "terminal": self.terminal(node),
            "thought_return": max(self._tret[node], 0) / _SCALE,
        }

    @property
    def is_canonical(self) -> bool:
        """Whether node ids are in canonical preorder (see :meth:`canonicalize`)."""
        return self._canonical

    def stat_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(visits, return_sum, successes)`` of every node as new numpy arrays (int64, float64, int64)."""
        if self._pend_ret:
            self._flush()
        return (
            np.array(self._visits, dtype=np.int64),  # a copy: a view would pin the array's size
            np.asarray(self._ret, dtype=np.float64) / _SCALE,
            np.array(self._succ, dtype=np.int64),
        )

    def search_arrays(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(mcts_visits, mcts_value)`` of every node (int64, float64; shared, do not modify), or None
        before any search."""
        if self._mcts_visits is None or self._mcts_value is None:
            return None
        return self._mcts_visits, self._mcts_value

    def set_search_values(
        self, mcts_visits: Sequence[int] | np.ndarray, mcts_value: Sequence[float] | np.ndarray, **info: Any
    ) -> None:
        """Store the statistics of a search (one entry per node) and the settings that produced them."""
        v = np.asarray(mcts_visits, dtype=np.int64)
        w = np.asarray(mcts_value, dtype=np.float64)
        if v.shape != (len(self),) or w.shape != (len(self),):
            raise ValueError(f"search values need {len(self)} entries per array, got {v.shape} and {w.shape}")
        self._mcts_visits, self._mcts_value = v, w
        self.search_info = dict(info)

    def summary(self) -> TreeSummary:
        """Node, leaf and outcome counts and branching statistics."""
        if self._pend_ret:
            self._flush()
        n = len(self)
        counts = np.bincount(np.array(self._parent, dtype=np.int64)[1:], minlength=n)
        inner = counts[counts > 0]
        visits = self._visits[0]
        return TreeSummary(
            task_id=self.task_id,
            nodes=n,
            depth=max(self._depth),
            leaves=int((counts == 0).sum()),
            trajectories=visits,
            successes=self._succ[0],
            failures=visits - self._succ[0],
            mean_return=self.mean_return(0),
            branch_points=int((counts >= 2).sum()),
            branching_mean=float(inner.mean()) if inner.size else 0.0,
            branching_max=int(counts.max()) if n else 0,
            sources=self.sources(0),
        )

    # ---------------------------------------------------------------------------------- canonical ids

    def canonical_order(self) -> list[int]:
        """Node ids in preorder with children in canonical order (the numbering of saved trees)."""
        return self._preorder().tolist()

    def _preorder(self) -> np.ndarray:
        """:meth:`canonical_order` as an int64 array, computed level by level with numpy: a node's position
        is its parent's plus one plus the sizes of the subtrees of its earlier siblings."""
        if self._pend_ret:
            self._flush()
        n = len(self)
        if self._canonical:
            return np.arange(n, dtype=np.int64)
        off, ids32 = self.child_arrays()
        ids = ids32.astype(np.int64)
        parent = np.array(self._parent, dtype=np.int64)
        depth = np.array(self._depth, dtype=np.int64)
        by_depth = np.argsort(depth, kind="stable")
        bounds = np.searchsorted(depth[by_depth], np.arange(int(depth.max()) + 2)).tolist()
        levels = [by_depth[bounds[d] : bounds[d + 1]] for d in range(len(bounds) - 1)]
        size = np.ones(n, dtype=np.int64)
        for nodes in reversed(levels[1:]):  # subtree sizes, deepest level first
            size += np.bincount(parent[nodes], weights=size[nodes], minlength=n).astype(np.int64)
        before = np.zeros(len(ids) + 1, dtype=np.int64)  # sizes of the CSR slots before each one
        np.cumsum(size[ids], out=before[1:])
        rel = np.zeros(n, dtype=np.int64)  # position relative to the parent's
        rel[ids] = 1 + before[:-1] - before[off[parent[ids]]]
        pos = np.zeros(n, dtype=np.int64)
        for nodes in levels[1:]:
            pos[nodes] = pos[parent[nodes]] + rel[nodes]
        order = np.empty(n, dtype=np.int64)
        order[pos] = np.arange(n, dtype=np.int64)
        return order

    def canonicalize(self) -> None:
        """Renumber the nodes in canonical preorder, so that ids do not depend on insertion order.

        Ids held from before the call refer to other nodes afterwards.
        """
        if self._pend_ret:
            self._flush()
        if self._canonical:
            return
        with _gc_paused():
            self._renumber()

    def _renumber(self) -> None:
        perm = self._preorder()
        n = len(perm)
        if np.array_equal(perm, np.arange(n)):
            self._canonical = True
            return
        order = perm.tolist()
        new = np.empty(n, dtype=np.int64)
        new[perm] = np.arange(n, dtype=np.int64)
        new_id = new.tolist()
        pick = itemgetter(*order[1:]) if n > 2 else (lambda values: tuple(values[i] for i in order[1:]))
        moved = pick(self._key)  # every node but the root (order[0])
        parents = new[np.array(self._parent, dtype=np.int64)[perm[1:]]]
        self._parent = array("q", [-1]) + _int_array(parents)
        self._key = [
            (-1, "", None),
            *zip(parents.tolist(), map(itemgetter(1), moved), map(itemgetter(2), moved), strict=True),
        ]
        for name in _NODE_LISTS:
            values = getattr(self, name)
            if name in _INT_ARRAYS:
                setattr(self, name, _int_array(np.array(values, dtype=np.int64)[perm]))
            else:
                setattr(self, name, [values[0], *pick(values)])
        self._src_sparse = {new_id[n]: d for n, d in self._src_sparse.items()}
        self._mix.remap(new_id)
        self._terminal.remap(new_id)
        self._index = dict(zip(self._key[1:], range(1, n), strict=True))
        if self._mcts_visits is not None and self._mcts_value is not None:
            self._mcts_visits = self._mcts_visits[perm]
            self._mcts_value = self._mcts_value[perm]
        self._canonical = True
        self._children = self._build_children()  # no sorting now that ids are canonical

    # -------------------------------------------------------------------------------------- networkx

    def to_networkx(self) -> nx.DiGraph:
        """The tree as a ``networkx.DiGraph`` (canonical ids; node attributes of :meth:`node`).

        The graph attributes hold ``task_id``, ``env_id``, ``instruction``, ``sources`` (models) and
        ``search`` (settings of the last search).
        """
        self.canonicalize()
        g = nx.DiGraph(
            task_id=self.task_id,
            env_id=self.env_id,
            instruction=self.instruction,
            sources=sorted(self._models),
            search=dict(self.search_info),
        )
        for n in range(len(self)):
            g.add_node(n, **self.node(n))
        for n in range(1, len(self)):
            g.add_edge(self._parent[n], n)
        return g

    @classmethod
    def from_networkx(cls, graph: nx.DiGraph, *, obs_key: ObservationKey | None = None) -> TrajectoryTree:
        """Rebuild a tree from :meth:`to_networkx` output.

        Raises:
            DataFormatError: the graph is not a tree rooted at node 0 or a node attribute is missing or invalid.
        """
        nodes = [{"id": n, **attrs} for n, attrs in graph.nodes(data=True)]
        edges = [{"source": u, "target": v} for u, v in graph.edges()]
        return cls._from_records(dict(graph.graph), nodes, edges, "graph", obs_key)

    @classmethod
    def _from_records(
        cls,
        gattrs: Mapping[str, Any],
        nodes: Sequence[Mapping[str, Any]],
        edges: Sequence[Mapping[str, Any]],
        where: str,
        obs_key: ObservationKey | None,
    ) -> TrajectoryTree:
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
        order = sorted(range(n), key=lambda v: (depth[v], v))
        new_id = {old: i for i, old in enumerate(order)}
        tree._key, tree._parent, tree._depth, tree._oka, tree._otext = [], array("q"), array("q"), [], []
        tree._canonical = False
        tree._thought, tree._tret, tree._ret = [], array("q"), []
        tree._visits, tree._succ, tree._src = array("q"), array("q"), array("q")
        mv: list[int] = []
        mval: list[float] = []
        for old in order:
            rec = by_id[old]
            attrs = _check_node(rec, old, fail)
            if attrs["depth"] != depth[old]:
                raise fail(f"node {old}: depth {attrs['depth']} but it is {depth[old]} edges below the root")
            i = new_id[old]
            if old == 0:
                okey, akey = None, ""
            else:
                okey = tree._new_obs(attrs["observation_before"])
                akey = tree._new_action(attrs["action"])
            after = tree._new_obs(attrs["observation"])
            tree._oka.append(after)
            tree._otext.append(attrs["observation"])
            key = (new_id[parent[old]] if old else -1, akey, okey)
            if old and key in tree._index:
                raise fail(
                    f"node {old}: same action and observation as its sibling {order[tree._index[key]]}"
                )
            if old:
                tree._index[key] = i
            tree._key.append(key)
            tree._parent.append(key[0])
            tree._depth.append(depth[old])
            tree._thought.append(attrs["thought"])
            tree._tret.append(round(attrs["thought_return"] * _SCALE) if old else -1)
            tree._visits.append(attrs["visits"])
            tree._ret.append(round(attrs["return_sum"] * _SCALE))
            tree._succ.append(attrs["successes"])
            srcs = attrs["sources"]
            ids = {tree._model_id(m): c for m, c in sorted(srcs.items())}
            if len(ids) == 1 and next(iter(ids.values())) == attrs["visits"]:
                tree._src.append(next(iter(ids)))
            else:
                tree._src.append(-1)
                if ids:
                    tree._src_sparse[i] = ids
            if attrs["terminal"]:
                for j, name in enumerate(END_REASONS):
                    tree._terminal.add(i, j, attrs["terminal"].get(name, 0))
            mv.append(attrs["mcts_visits"])
            mval.append(attrs["mcts_value"])
        for model in gattrs.get("sources", []) or []:
            if isinstance(model, str):
                tree._model_id(model)
        if any(mv) or any(mval):
            tree._mcts_visits = np.asarray(mv, dtype=np.int64)
            tree._mcts_value = np.asarray(mval, dtype=np.float64)
        tree._ret_bound = max(map(abs, tree._ret))
        search = gattrs.get("search", {})
        tree.search_info = dict(search) if isinstance(search, Mapping) else {}
        tree.canonicalize()
        return tree

    # ------------------------------------------------------------------------------------ persistence

    def to_json(self) -> dict[str, Any]:
        """The saved form: node-link JSON with the schema tag."""
        g = self.to_networkx()
        return {
            "schema": TREE_SCHEMA,
            "directed": True,
            "multigraph": False,
            "graph": dict(g.graph),
            "nodes": [{"id": n, **attrs} for n, attrs in g.nodes(data=True)],
            "edges": [{"source": u, "target": v} for u, v in g.edges()],
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the tree as versioned node-link JSON, atomically (temp file + rename); returns the path."""
        p = Path(path)
        data = json.dumps(self.to_json(), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        with atomic_write(p) as fh:
            fh.write(data)
        return p

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, obs_key: ObservationKey | None = None) -> TrajectoryTree:
        """Read a tree written by :meth:`save`.

        Raises:
            DataFormatError: the file is missing, not JSON, of another schema version, or not a valid tree
                (the message names the file and the problem).
        """
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
        if schema != TREE_SCHEMA:
            what = "missing field 'schema'" if schema is None else f"unsupported tree schema {schema!r}"
            raise DataFormatError(f"{p}: {what} (this version reads {TREE_SCHEMA!r})")
        nodes, edges = data.get("nodes"), data.get("edges")
        if not isinstance(nodes, list) or not isinstance(edges, list):
            raise DataFormatError(f"{p}: 'nodes' and 'edges' must be lists")
        gattrs = data.get("graph")
        if not isinstance(gattrs, dict):
            raise DataFormatError(f"{p}: 'graph' must be an object")
        return cls._from_records(gattrs, nodes, edges, str(p), obs_key)

    def __repr__(self) -> str:
        self.update_statistics()
        return f"TrajectoryTree({self.task_id!r}, nodes={len(self)}, trajectories={self._visits[0]})"


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
    "mcts_visits": (int,),
    "mcts_value": (int, float),
    "terminal": (dict,),
    "thought_return": (int, float),
}


def _check_node(rec: Mapping[str, Any], nid: int, fail: Callable[[str], DataFormatError]) -> dict[str, Any]:
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


def add_trajectories(
    trajectories: Iterable[Trajectory],
    trees: dict[str, TrajectoryTree] | None = None,
    *,
    obs_key: ObservationKey | None = None,
    chunk: int = 1 << 15,
) -> dict[str, TrajectoryTree]:
    """Merge trajectories into one tree per task; returns ``{task_id: tree}``.

    ``trees`` (updated in place, missing tasks added) holds the trees to merge into; ``obs_key`` is the
    observation key of new trees. The trajectories are taken ``chunk`` at a time and grouped by task before
    they are merged, so that a tree's index stays in the CPU caches while its trajectories go in: with many
    tasks interleaved in a file this is much faster than adding them in file order, and gives the same trees
    (the order of trajectories does not matter). Statistics are summed on first read, ids are not canonical:
    see :func:`build_trees`.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    out: dict[str, TrajectoryTree] = {} if trees is None else trees
    it = iter(trajectories)
    while batch := list(islice(it, chunk)):
        groups: dict[str, list[Trajectory]] = {}
        for traj in batch:
            group = groups.get(traj.task_id)
            if group is None:
                group = groups[traj.task_id] = []
            group.append(traj)
        del batch
        with _gc_paused():  # see TrajectoryTree.extend
            for task_id, group in groups.items():
                tree = out.get(task_id)
                if tree is None:
                    tree = out[task_id] = TrajectoryTree(task_id, obs_key=obs_key)
                tree._merge(group)
    return out


def build_trees(
    trajectories: Iterable[Trajectory], *, obs_key: ObservationKey | None = None
) -> dict[str, TrajectoryTree]:
    """One canonical tree per task from any number of trajectories; returns ``{task_id: tree}`` sorted by task."""
    trees = add_trajectories(trajectories, obs_key=obs_key)
    for tree in trees.values():
        tree.canonicalize()
    return {k: trees[k] for k in sorted(trees)}


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def tree_filename(task_id: str) -> str:
    """A safe, unique file name for the tree of ``task_id``: readable part plus a short hash of the id."""
    readable = _UNSAFE.sub("_", task_id).strip("._")[:80] or "task"
    digest = hashlib.sha1(task_id.encode("utf-8")).hexdigest()[:8]
    return f"{readable}-{digest}.json"
