"""Offline MCTS over a fixed trajectory tree (the paper's search) and the node values built on it.

The tree is never expanded: a simulation descends from the root, taking an unvisited child first (in tie
order) and otherwise the child of highest

    UCB(v) = r_M(v) / c_M(v) + gamma * sqrt(ln C_M / c_M(v)),      C_M = visits of v's parent,

until it reaches a leaf, evaluates the leaf by the mean final return of the data trajectories through it,
and adds that value to ``r_M`` and 1 to ``c_M`` of every node on its path (backup). The best path e* goes
greedily from the root to a leaf by ``r_M / c_M``.

Ties (between equal UCB scores, and the order in which unvisited children are tried) are broken by a fixed
order of each node's children: the canonical order (by action key) with ``tie_break="order"``, or the
order of a pseudo-random key of (node id, seed) with ``tie_break="random"`` (:func:`tie_orders`); the search
is deterministic for a seed either way.

Speed: a chain of single-child nodes is always traversed whole, so every node of a chain has the statistics
of its first node. The search runs on the tree with chains contracted (branch points and leaves only) and
copies the statistics down the chains at the end; the contracted tree is built lazily, as far as the search
reaches. This gives exactly the values of the plain algorithm
(:func:`select_child` and :func:`backup` are the plain steps, used as the reference in the tests).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from w2s_agents.config import check, option
from w2s_agents.tree import ROOT, TrajectoryTree

__all__ = [
    "MCTSResult",
    "SearchConfig",
    "ValueKind",
    "backup",
    "best_child",
    "best_path",
    "max_values",
    "mcts_values",
    "mean_values",
    "node_values",
    "run_mcts",
    "search_tree",
    "select_child",
    "success_values",
    "tie_orders",
    "ucb_score",
]

ValueKind = Literal["mcts", "mean", "max", "success"]


@dataclass(frozen=True)
class SearchConfig:
    """Offline MCTS and the extraction of best paths and preference pairs from searched trees."""

    iterations: int = option(1000, "MCTS simulations per tree (paper: 1000)")
    gamma: float = option(1.41, "exploration weight of UCB (paper: 1.41)")
    seed: int = option(0, "seed of the tie-breaking order (the search is deterministic for a seed)")
    tie_break: Literal["random", "order"] = option(
        "random",
        "order of equal-score and unvisited children: seeded permutation or canonical (action) order",
    )
    value: ValueKind = option(
        "mcts",
        "node value for best paths and pairs: mcts (r_M/c_M), mean return, max (Bellman), success rate",
    )
    margin: float = option(0.1, "smallest value gap between the chosen and the rejected child of a pair")
    pairs_per_node: int = option(4, "most pairs taken at one divergence point (largest value gaps first)")
    step_pairs: bool = option(True, "emit step-level pairs (chosen and rejected are one action each)")
    continuation_pairs: bool = option(
        True, "emit continuation-level pairs (each action followed by its greedy best continuation)"
    )
    sft_min_value: float = option(
        0.0, "a best path becomes an SFT row only when the mean return at its leaf is at least this"
    )

    def __post_init__(self) -> None:
        check(self.iterations >= 0, "iterations", f"must be >= 0, got {self.iterations}")
        check(
            self.gamma >= 0 and math.isfinite(self.gamma),
            "gamma",
            f"must be finite and >= 0, got {self.gamma}",
        )
        check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        check(self.margin >= 0, "margin", f"must be >= 0, got {self.margin}")
        check(self.pairs_per_node >= 1, "pairs_per_node", f"must be >= 1, got {self.pairs_per_node}")
        check(
            0.0 <= self.sft_min_value <= 1.0, "sft_min_value", f"must be in [0, 1], got {self.sft_min_value}"
        )


@dataclass(frozen=True)
class MCTSResult:
    """Statistics of one search, one entry per tree node."""

    visits: np.ndarray
    """c_M: simulations through each node (int64)."""
    value_sum: np.ndarray
    """r_M: sum of the leaf values backed up through each node (float64)."""
    iterations: int

    def values(self) -> np.ndarray:
        """r_M / c_M per node, NaN where the search never went."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.visits > 0, self.value_sum / np.maximum(self.visits, 1), np.nan)


# ------------------------------------------------------------------------------------------ plain steps


def ucb_score(value_sum: float, visits: int, parent_visits: int, gamma: float) -> float:
    """UCB of a child: ``value_sum/visits + gamma*sqrt(ln(parent_visits)/visits)``; +inf when unvisited."""
    if visits == 0:
        return math.inf
    return value_sum / visits + gamma * math.sqrt(math.log(parent_visits) / visits)


def select_child(
    children: Sequence[int],
    visits: Sequence[int],
    value_sum: Sequence[float],
    parent_visits: int,
    gamma: float,
) -> int:
    """The child to descend to: the first unvisited one, else the highest UCB (first of equals wins)."""
    best, best_score = children[0], -math.inf
    for c in children:
        score = ucb_score(value_sum[c], visits[c], parent_visits, gamma)
        if score > best_score:
            best, best_score = c, score
    return best


def backup(path: Sequence[int], value: float, visits: list[int], value_sum: list[float]) -> None:
    """Add one visit and ``value`` to every node on ``path`` (in place)."""
    for n in path:
        visits[n] += 1
        value_sum[n] += value


_MASK = (1 << 64) - 1


def _tie_key(node: int, seed: int) -> int:
    """A pseudo-random 64-bit key of ``node`` for ``seed`` (splitmix64 finaliser): fixes a random tie order."""
    z = (node + 1 + seed * 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def _ordered(children: tuple[int, ...], tie_break: str, seed: int) -> tuple[int, ...]:
    if tie_break == "order" or len(children) < 2:
        return children
    return tuple(sorted(children, key=lambda c: _tie_key(c, seed)))


def tie_orders(tree: TrajectoryTree, tie_break: str, seed: int) -> list[tuple[int, ...]]:
    """Each node's children in the order that breaks ties: canonical (``"order"``), or sorted by a
    pseudo-random key of (child id, ``seed``) (``"random"``)."""
    if tie_break not in ("order", "random"):
        raise ValueError(f"tie_break must be 'random' or 'order', got {tie_break!r}")
    return [_ordered(tree.children(n), tie_break, seed) for n in range(len(tree))]


def leaf_values(tree: TrajectoryTree) -> list[float]:
    """Value of each node as a leaf: the mean final return of the data trajectories through it."""
    return [tree.mean_return(n) for n in range(len(tree))]


# --------------------------------------------------------------------------------------------- search


def run_mcts(
    tree: TrajectoryTree,
    iterations: int = 1000,
    gamma: float = 1.41,
    *,
    seed: int = 0,
    tie_break: str = "random",
) -> MCTSResult:
    """Run the paper's offline MCTS on ``tree`` and return c_M and r_M of every node.

    Same result as repeating ``select_child`` from the root to a leaf and ``backup`` of the leaf's mean return
    ``iterations`` times, computed on the tree with single-child chains contracted.
    """
    if tie_break not in ("order", "random"):
        raise ValueError(f"tie_break must be 'random' or 'order', got {tie_break!r}")
    off_a, ids_a = tree.child_arrays()
    off, ids = off_a.tolist(), ids_a.tolist()
    # Contracted tree, built lazily as the search reaches it: compressed node i stands for the chain that
    # starts at tree node heads[i] and ends at ends[i], the first node without exactly one child.
    heads: list[int] = []
    ends: list[int] = []
    kids: list[list[int] | None] = []
    leaf: list[float] = []
    vis: list[int] = []
    val: list[float] = []

    def add_chain(h: int) -> int:
        e = h
        while off[e + 1] - off[e] == 1:
            e = ids[off[e]]
        heads.append(h)
        ends.append(e)
        inner = off[e + 1] > off[e]
        kids.append(None if inner else [])
        leaf.append(0.0 if inner else tree.mean_return(e))
        vis.append(0)
        val.append(0.0)
        return len(heads) - 1

    def expand(i: int) -> list[int]:
        e = ends[i]
        ch = [add_chain(c) for c in _ordered(tuple(ids[off[e] : off[e + 1]]), tie_break, seed)]
        kids[i] = ch
        return ch

    add_chain(ROOT)
    log, sqrt, inf = math.log, math.sqrt, math.inf
    for _ in range(iterations):
        h = 0
        path = [0]
        ch = kids[0]
        if ch is None:
            ch = expand(0)
        while ch:
            n = vis[h]
            if n < len(ch):  # unvisited children first, in tie order (each earlier visit took the next one)
                h = ch[n]
            else:
                ln = log(n)
                best = -inf
                for c in ch:
                    vc = vis[c]
                    u = val[c] / vc + gamma * sqrt(ln / vc)
                    if u > best:
                        best, h = u, c
            path.append(h)
            ch = kids[h]
            if ch is None:
                ch = expand(h)
        v = leaf[h]
        for p in path:
            vis[p] += 1
            val[p] += v

    # every node of a chain has its head's statistics
    nodes: list[int] = []
    comp: list[int] = []
    for i, h in enumerate(heads):
        if not vis[i]:
            continue
        n = h
        nodes.append(n)
        comp.append(i)
        while n != ends[i]:
            n = ids[off[n]]
            nodes.append(n)
            comp.append(i)
    visits = np.zeros(len(tree), dtype=np.int64)
    value_sum = np.zeros(len(tree), dtype=np.float64)
    idx = np.asarray(nodes, dtype=np.int64)
    cidx = np.asarray(comp, dtype=np.int64)
    visits[idx] = np.asarray(vis, dtype=np.int64)[cidx]
    value_sum[idx] = np.asarray(val, dtype=np.float64)[cidx]
    return MCTSResult(visits, value_sum, iterations)


def search_tree(tree: TrajectoryTree, config: SearchConfig | None = None) -> MCTSResult:
    """Run :func:`run_mcts` with ``config`` and store the statistics in the tree (``mcts_visits``, ``mcts_value``)."""
    cfg = config or SearchConfig()
    result = run_mcts(tree, cfg.iterations, cfg.gamma, seed=cfg.seed, tie_break=cfg.tie_break)
    tree.set_search_values(
        result.visits,
        result.value_sum,
        algorithm="offline-mcts",
        iterations=cfg.iterations,
        gamma=cfg.gamma,
        seed=cfg.seed,
        tie_break=cfg.tie_break,
    )
    return result


# --------------------------------------------------------------------------------------------- values


def mean_values(tree: TrajectoryTree) -> np.ndarray:
    """Mean final return of the data trajectories through each node."""
    return np.asarray(leaf_values(tree), dtype=np.float64)


def success_values(tree: TrajectoryTree) -> np.ndarray:
    """Share of the data trajectories through each node that were won."""
    return np.asarray(
        [tree.successes(n) / tree.visits(n) if tree.visits(n) else 0.0 for n in range(len(tree))],
        dtype=np.float64,
    )


def max_values(tree: TrajectoryTree) -> np.ndarray:
    """Bellman (max) value: the best outcome reachable below each node.

    V(n) = max over the children of V(child), and over the mean return of the trajectories that ended at n
    when some did; a leaf's value is its mean return.
    """
    n = len(tree)
    out = np.zeros(n, dtype=np.float64)
    for node in reversed(tree.canonical_order()):  # children before parents
        ch = tree.children(node)
        if not ch:
            out[node] = tree.mean_return(node)
            continue
        best = max(out[c] for c in ch)
        ended = tree.visits(node) - sum(tree.visits(c) for c in ch)
        if ended > 0:
            own = (tree.return_sum(node) - sum(tree.return_sum(c) for c in ch)) / ended
            best = max(best, own)
        out[node] = best
    return out


def mcts_values(tree: TrajectoryTree) -> np.ndarray:
    """r_M / c_M of the last search stored in the tree, NaN where it never went.

    Raises:
        ValueError: the tree has not been searched.
    """
    if not tree.search_info and all(tree.mcts_visits(i) == 0 for i in range(len(tree))):
        raise ValueError(f"tree of task {tree.task_id!r} has no search values; run the search first")
    visits = np.asarray([tree.mcts_visits(i) for i in range(len(tree))], dtype=np.float64)
    sums = np.asarray([tree.mcts_value(i) for i in range(len(tree))], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(visits > 0, sums / np.maximum(visits, 1), np.nan)


def node_values(tree: TrajectoryTree, kind: ValueKind = "mcts") -> np.ndarray:
    """The value of every node by ``kind`` (see :class:`SearchConfig`.value); NaN marks an unknown value."""
    if kind == "mcts":
        return mcts_values(tree)
    if kind == "mean":
        return mean_values(tree)
    if kind == "max":
        return max_values(tree)
    if kind == "success":
        return success_values(tree)
    raise ValueError(f"unknown value kind {kind!r} (expected mcts, mean, max or success)")


def best_child(tree: TrajectoryTree, node: int, values: np.ndarray) -> int | None:
    """The child of highest value (first in canonical order among equals; NaN values skipped), or None."""
    best, best_v = None, -math.inf
    for c in tree.children(node):
        v = values[c]
        if v == v and v > best_v:  # v == v: not NaN
            best, best_v = c, v
    return best


def best_path(tree: TrajectoryTree, values: np.ndarray, start: int = ROOT) -> list[int]:
    """Greedy path from ``start`` to a leaf by ``values`` (argmax per step); ``[start, ..., leaf]``."""
    path = [start]
    node = best_child(tree, start, values)
    while node is not None:
        path.append(node)
        node = best_child(tree, node, values)
    return path
