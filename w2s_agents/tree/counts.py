"""Count tables of trajectory trees: the flat rows of counts (:class:`_Rows`) and the per-model source counts.

Most nodes are reached by one model and see no trajectory end, so a tree keeps, per node, only the index of
the one model through it (``_src``, -1 when several); the counts of the nodes reached by several models, and
of the nodes where trajectories ended, are rows of a :class:`_Rows` table: one flat ``array("q")`` and a dict
node -> row, so that however many rows there are the garbage collector has no object per row to walk. With
more than :data:`_DENSE_MODELS` models a node's counts per model are a dict instead (``_src_sparse``).

Also here: the fixed-point unit of summed returns and the codes of the ways a trajectory ends.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from w2s_agents.types import END_REASONS

if TYPE_CHECKING:
    from .tree import TrajectoryTree

_SCALE = 1 << 32  # fixed-point unit of summed returns
_END_INDEX = {name: i for i, name in enumerate(END_REASONS)}
_N_END = len(END_REASONS)
_DENSE_MODELS = 32  # up to this many models, the counts per model of a node are a row of _Rows (else a dict)


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


def model_id(tree: TrajectoryTree, model: str) -> int:
    """The index of ``model`` among the tree's models (added at the end when new)."""
    s = tree._model_index.get(model)
    if s is None:
        s = tree._model_index[model] = len(tree._models)
        tree._models.append(model)
    return s


def mix_source(tree: TrajectoryTree, node: int, s: int) -> None:
    """Count model ``s`` at ``node`` whose visits were just incremented, when it is not the only one."""
    only = tree._src[node]
    mix, m = tree._mix, len(tree._models)
    if only >= 0:  # the second model through the node
        tree._src[node] = -1
        if m <= _DENSE_MODELS:
            mix.widen(m)
            mix.add(node, only, tree._visits[node] - 1)
            mix.add(node, s)
        else:
            tree._src_sparse[node] = {only: tree._visits[node] - 1, s: 1}
        return
    row = tree._src_sparse.get(node)
    if row is not None:
        row[s] = row.get(s, 0) + 1
    elif s < mix.width:
        mix.add(node, s)
    elif m <= _DENSE_MODELS:
        mix.widen(m)
        mix.add(node, s)
    else:  # a model past the dense columns: the node's counts move to a dict
        old = mix.pop(node) or []
        row = tree._src_sparse[node] = {i: x for i, x in enumerate(old) if x}
        row[s] = 1


def source_counts(tree: TrajectoryTree, node: int) -> dict[str, int]:
    """Trajectories through ``node`` per model, sorted by model name (statistics already summed)."""
    models = tree._models
    s = tree._src[node]
    if s >= 0:
        return {models[s]: tree._visits[node]}
    row = tree._src_sparse.get(node)
    items = row.items() if row is not None else [(i, n) for i, n in enumerate(tree._mix.get(node) or ()) if n]
    return {models[i]: n for i, n in sorted(items, key=lambda kv: models[kv[0]])}


def add_source_counts(
    tree: TrajectoryTree,
    pair_node: np.ndarray,
    pair_model: np.ndarray,
    pair_counts: np.ndarray,
    is_mixed: np.ndarray,
    old_src: np.ndarray,
    old_visits: np.ndarray,
) -> None:
    """Add the per-model counts of pending steps to the nodes reached by several models.

    ``(pair_node, pair_model, pair_counts)``: how many pending steps of each model went through each node, sorted
    by node; ``is_mixed``: per node, whether it now has several models (its counts go to a row or a dict);
    ``old_src`` and ``old_visits``: the one model and the visits of each node before these steps (a node that
    had one model has its earlier visits counted for it)."""
    n, m = len(is_mixed), len(tree._models)
    mix, sparse = tree._mix, tree._src_sparse
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
                # its counts in the dense columns move to the dict, or the visits of the one model it had
                old = mix.pop(c)
                row = sparse[c] = (
                    {i: y for i, y in enumerate(old) if y} if old is not None else {s0: v0} if v0 else {}
                )
            row[s] = row.get(s, 0) + x
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
