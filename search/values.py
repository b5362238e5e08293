"""Node values of a trajectory tree, and the greedy best path they give.

Every value is an array with one entry per node (NaN: unknown), chosen by :data:`ValueKind`:

* ``mcts``: the search value Q = W / N stored in the tree by the last search (:func:`search_values`);
* ``mean``: the mean final return of the data trajectories through the node (:func:`mean_values`);
* ``max``: the Bellman value, the best outcome reachable below the node (:func:`max_values`);
* ``success``: the share of the trajectories through the node that were won (:func:`success_values`).

With a ``discount`` d below 1, a return reached k steps below a node counts d^k there (mean and max values;
the search discounts its own values). :func:`best_path` goes greedily from the root by a value array.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

from w2s_agents.tree import ROOT, TrajectoryTree

__all__ = [
    "ValueKind",
    "best_child",
    "best_path",
    "leaf_values",
    "max_values",
    "mean_values",
    "node_values",
    "search_values",
    "success_values",
]

ValueKind = Literal["mcts", "mean", "max", "success"]
"""How nodes are valued for best paths and pairs (``search.value``)."""


def leaf_values(tree: TrajectoryTree, discount: float = 1.0) -> list[float]:
    """Value of each node as a leaf: the mean final return of the data trajectories through it, times
    ``discount ** depth`` (the value the plain search backs up; see the module docstring)."""
    return [tree.mean_return(n) * discount ** tree.depth(n) for n in range(len(tree))]


def _ended(tree: TrajectoryTree, node: int, children: Sequence[int]) -> tuple[int, float]:
    """Trajectories that ended at ``node`` and the sum of their returns."""
    ended = tree.visits(node) - sum(tree.visits(c) for c in children)
    return ended, tree.return_sum(node) - sum(tree.return_sum(c) for c in children)


def mean_values(tree: TrajectoryTree, discount: float = 1.0) -> np.ndarray:
    """Mean final return of the data trajectories through each node; with ``discount`` below 1 each return
    counts ``discount ** k``, k the steps from the node to where its trajectory ended."""
    if discount == 1.0:
        return np.asarray(leaf_values(tree), dtype=np.float64)
    total = np.zeros(len(tree), dtype=np.float64)  # sum over trajectories of discount^k * return
    for node in reversed(tree.canonical_order()):  # children before parents
        ch = tree.children(node)
        total[node] = _ended(tree, node, ch)[1] + discount * sum(total[c] for c in ch)
    visits = np.asarray([tree.visits(n) for n in range(len(tree))], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(visits > 0, total / np.maximum(visits, 1), 0.0)


def success_values(tree: TrajectoryTree) -> np.ndarray:
    """Share of the data trajectories through each node that were won."""
    return np.asarray(
        [tree.successes(n) / tree.visits(n) if tree.visits(n) else 0.0 for n in range(len(tree))],
        dtype=np.float64,
    )


def max_values(tree: TrajectoryTree, discount: float = 1.0) -> np.ndarray:
    """Bellman (max) value: the best outcome reachable below each node.

    V(n) = max over the children of ``discount`` * V(child), and over the mean return of the trajectories
    that ended at n when some did; a leaf's value is its mean return.
    """
    n = len(tree)
    out = np.zeros(n, dtype=np.float64)
    for node in reversed(tree.canonical_order()):  # children before parents
        ch = tree.children(node)
        if not ch:
            out[node] = tree.mean_return(node)
            continue
        best = discount * max(out[c] for c in ch)
        ended, ended_return = _ended(tree, node, ch)
        if ended > 0:
            best = max(best, ended_return / ended)
        out[node] = best
    return out


def search_values(tree: TrajectoryTree) -> np.ndarray:
    """Q = W / N of the last search stored in the tree (offline MCTS or online PUCT), NaN where it never went.

    Raises:
        ValueError: the tree has not been searched.
    """
    arrays = tree.search_arrays()
    if arrays is None:
        raise ValueError(f"tree of task {tree.task_id!r} has no search values; run the search first")
    visits, sums = arrays
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(visits > 0, sums / np.maximum(visits, 1), np.nan)


def node_values(tree: TrajectoryTree, kind: ValueKind = "mcts", discount: float = 1.0) -> np.ndarray:
    """The value of every node by ``kind`` (see :class:`SearchConfig`.value); NaN marks an unknown value.

    ``discount`` applies to the mean and max values; mcts values were discounted by the search that stored
    them (:class:`SearchConfig`.discount), success rates are not discounted.
    """
    if kind == "mcts":
        return search_values(tree)
    if kind == "mean":
        return mean_values(tree, discount)
    if kind == "max":
        return max_values(tree, discount)
    if kind == "success":
        return success_values(tree)
    raise ValueError(f"unknown value kind {kind!r} (expected mcts, mean, max or success)")


def best_child(tree: TrajectoryTree, node: int, values: np.ndarray | Sequence[float]) -> int | None:
    """The child of highest value (first in canonical order among equals; NaN values skipped), or None."""
    best, best_v = None, -math.inf
    for c in tree.children(node):
        v = values[c]
        if v == v and v > best_v:  # v == v: not NaN
            best, best_v = c, v
    return best


def best_path(tree: TrajectoryTree, values: np.ndarray | Sequence[float], start: int = ROOT) -> list[int]:
    """Greedy path from ``start`` to a leaf by ``values`` (argmax per step); ``[start, ..., leaf]``."""
    path = [start]
    node = best_child(tree, start, values)
    while node is not None:
        path.append(node)
        node = best_child(tree, node, values)
    return path
