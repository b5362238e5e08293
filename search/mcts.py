"""Offline MCTS over a fixed trajectory tree (the paper's search) and the node values built on it.

The tree is never expanded: a simulation descends from the root, taking an unvisited child first (in tie
order) and otherwise the child of highest

    UCB(v) = r_M(v) / c_M(v) + gamma * sqrt(ln C_M / c_M(v)),      C_M = visits of v's parent,

until it reaches a leaf, evaluates the leaf by the mean final return of the data trajectories through it,
and adds that value to ``r_M`` and 1 to ``c_M`` of every node on its path (backup). The best path e* goes
greedily from the root to a leaf by ``r_M / c_M``.

With a ``discount`` d below 1 (an option; the paper's search is undiscounted), a return reached k steps below
a node counts d^k there: the leaf value backed up is d^depth(leaf) times its mean return, and each node's
``r_M`` is kept relative to its own depth (divided by d^depth(node)), so that values stay in [0, 1] and, of two
branches that succeed, the shorter one is worth more. In games whose score does not depend on the path's
length this keeps detours out of the best paths.

Ties (between equal UCB scores, and the order in which unvisited children are tried) are broken by a fixed
order of each node's children: the canonical order (by action key) with ``tie_break="order"``, or the
order of a pseudo-random key of (node id, seed) with ``tie_break="random"`` (:func:`tie_orders`); the search
is deterministic for a seed either way.

Speed: a chain of single-child nodes is always traversed whole, so every node of a chain has the statistics
of its first node. The search runs on the tree with chains contracted (branch points and leaves only) and
copies the statistics down the chains at the end. In canonical preorder a chain is a run of consecutive
positions, so the contraction is a few vectorised numpy passes. This gives exactly the values of the plain
algorithm
(:func:`select_child` and :func:`backup` are the plain steps, used as the reference in the tests).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

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
    discount: float = option(
        1.0,
        "weight d^k of a return reached k steps below a node, for the mcts, mean and max values: 1 is the "
        "paper's undiscounted return; below 1 the shorter of two successful branches is worth more",
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
        check(0.0 < self.discount <= 1.0, "discount", f"must be in (0, 1], got {self.discount}")


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


def _tie_key(node: int, seed: int) -> int:
    """A pseudo-random 32-bit key of ``node`` for ``seed`` (multiplicative hashing): fixes a random tie order."""
    return ((node ^ (seed * 0x9E3779B1 & 0xFFFFFFFF)) * 0x85EBCA6B) & 0xFFFFFFFF


def _ordered(children: tuple[int, ...], tie_break: str, seed: int) -> tuple[int, ...]:
    if tie_break == "order" or len(children) < 2:
        return children
    mix = seed * 0x9E3779B1 & 0xFFFFFFFF
    return tuple(sorted(children, key=lambda c: ((c ^ mix) * 0x85EBCA6B) & 0xFFFFFFFF))


def tie_orders(tree: TrajectoryTree, tie_break: str, seed: int) -> list[tuple[int, ...]]:
    """Each node's children in the order that breaks ties: canonical (``"order"``), or sorted by a
    pseudo-random key of (child id, ``seed``) (``"random"``)."""
    if tie_break not in ("order", "random"):
        raise ValueError(f"tie_break must be 'random' or 'order', got {tie_break!r}")
    return [_ordered(tree.children(n), tie_break, seed) for n in range(len(tree))]


def leaf_values(tree: TrajectoryTree, discount: float = 1.0) -> list[float]:
    """Value of each node as a leaf: the mean final return of the data trajectories through it, times
    ``discount ** depth`` (the value the plain search backs up; see the module docstring)."""
    return [tree.mean_return(n) * discount ** tree.depth(n) for n in range(len(tree))]


# --------------------------------------------------------------------------------------------- search


def _preorder_children(tree: TrajectoryTree) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(order, off, ids)``: the nodes in canonical preorder and the children in CSR form over positions in
    that order (the identity and the tree's own arrays when its ids are canonical)."""
    off, ids = tree.child_arrays()
    n = len(tree)
    if tree.is_canonical:
        return np.arange(n, dtype=np.int64), off, ids.astype(np.int64)
    order = np.asarray(tree.canonical_order(), dtype=np.int64)
    pos = np.empty(n, dtype=np.int64)
    pos[order] = np.arange(n)
    counts = np.diff(off)[order]
    off_p = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=off_p[1:])
    src = np.repeat(off[order] - off_p[:-1], counts) + np.arange(off_p[-1])  # CSR slot of each child
    return order, off_p, pos[ids[src]]


def _contract(
    tree: TrajectoryTree, tie_break: str, seed: int, discount: float = 1.0
) -> tuple[list[list[int]], list[float], Any, Any]:
    """The tree with single-child chains contracted, vectorised over canonical preorder positions.

    In preorder a chain is a run of consecutive positions, so compressed node i (the chain starting at a
    "head": the root or a child of a node with two or more children) covers positions ``heads[i]`` up to the
    first position without exactly one child. Returns the children of every compressed node (in tie order),
    the leaf value of every compressed node (the mean return at its chain's end times ``discount`` to the
    power of that end's depth; 0 when the end branches),
    the compressed node of every position, and the preorder (position -> node id).
    """
    order, off, ids = _preorder_children(tree)
    n = len(order)
    nk = np.diff(off)
    ar = np.arange(n)
    end = np.minimum.accumulate(np.where(nk != 1, ar, n)[::-1])[::-1]  # chain end of every position
    parent = np.repeat(ar, nk)  # parent position of each CSR slot
    is_head = np.zeros(n, dtype=bool)
    is_head[0] = True
    is_head[ids] = nk[parent] >= 2
    heads = np.flatnonzero(is_head)
    cid = np.full(n, -1, dtype=np.int64)
    cid[heads] = np.arange(len(heads))
    # children of branching nodes, grouped by parent (CSR order), each group in tie order
    sel = np.flatnonzero(nk[parent] >= 2)
    if tie_break == "random" and len(sel):
        mix = seed * 0x9E3779B1 & 0xFFFFFFFF
        keys = ((order[ids[sel]].astype(np.uint64) ^ np.uint64(mix)) * np.uint64(0x85EBCA6B)) & np.uint64(
            0xFFFFFFFF
        )
        sel = sel[np.argsort((parent[sel].astype(np.uint64) << np.uint64(32)) | keys, kind="stable")]
    flat = cid[ids[sel]].tolist()
    ends = end[heads]
    branching = np.flatnonzero(nk[ends] >= 2)
    starts = np.searchsorted(parent[sel], ends[branching]).tolist()  # parent[sel] ascends
    stops = (np.asarray(starts, dtype=np.int64) + nk[ends[branching]]).tolist()
    empty: list[int] = []
    kids = [empty] * len(heads)  # leaves share one empty list (the search only reads it)
    for i, a, b in zip(branching.tolist(), starts, stops, strict=True):
        kids[i] = flat[a:b]
    leaf_ends = np.flatnonzero(nk[ends] == 0)
    at = order[ends[leaf_ends]]  # node ids of the leaves
    visits, returns, _ = tree.stat_arrays()
    values = np.zeros(len(heads), dtype=np.float64)
    v = visits[at]
    values[leaf_ends] = np.divide(returns[at], v, out=np.zeros(len(at), dtype=np.float64), where=v > 0)
    if discount != 1.0:
        values[leaf_ends] *= discount ** np.asarray([tree.depth(int(n)) for n in at], dtype=np.float64)
    leaf = values.tolist()
    comp = cid[np.maximum.accumulate(np.where(is_head, ar, 0))]  # compressed node of every position
    return kids, leaf, comp, order


def run_mcts(
    tree: TrajectoryTree,
    iterations: int = 1000,
    gamma: float = 1.41,
    *,
    seed: int = 0,
    tie_break: str = "random",
    discount: float = 1.0,
) -> MCTSResult:
    """Run the paper's offline MCTS on ``tree`` and return c_M and r_M of every node.

    Same result as repeating ``select_child`` from the root to a leaf and ``backup`` of the leaf's mean return
    ``iterations`` times, computed on the tree with single-child chains contracted. With ``discount`` below 1
    the leaf values are discounted by depth and each node's r_M is relative to its own depth (module
    docstring); UCB then compares the children's values from their own depth.
    """
    if tie_break not in ("order", "random"):
        raise ValueError(f"tie_break must be 'random' or 'order', got {tie_break!r}")
    if not 0.0 < discount <= 1.0:
        raise ValueError(f"discount must be in (0, 1], got {discount}")
    kids, leaf, comp, order = _contract(tree, tie_break, seed, discount)
    scale = None
    if discount != 1.0:
        # 1 / discount^depth of each compressed node's head, its first position (comp is non-decreasing)
        firsts = np.r_[0, np.flatnonzero(np.diff(comp)) + 1]
        head_depth = np.asarray([tree.depth(int(order[p])) for p in firsts], dtype=np.float64)
        scale = (discount**-head_depth).tolist()

    vis = [0] * len(kids)
    val = [0.0] * len(kids)
    log, sqrt, inf = math.log, math.sqrt, math.inf
    for _ in range(iterations):
        h = 0
        path = [0]
        ch = kids[0]
        while ch:
            n = vis[h]
            if n < len(ch):  # unvisited children first, in tie order (each earlier visit took the next one)
                h = ch[n]
            elif scale is None:
                ln = log(n)
                best = -inf
                for c in ch:
                    vc = vis[c]
                    u = val[c] / vc + gamma * sqrt(ln / vc)
                    if u > best:
                        best, h = u, c
            else:
                ln = log(n)
                best = -inf
                for c in ch:
                    vc = vis[c]
                    u = val[c] * scale[c] / vc + gamma * sqrt(ln / vc)
                    if u > best:
                        best, h = u, c
            path.append(h)
            ch = kids[h]
        v = leaf[h]
        for p in path:
            vis[p] += 1
            val[p] += v

    # every node of a chain has its head's statistics
    visits = np.empty(len(tree), dtype=np.int64)
    value_sum = np.empty(len(tree), dtype=np.float64)
    visits[order] = np.asarray(vis, dtype=np.int64)[comp]
    value_sum[order] = np.asarray(val, dtype=np.float64)[comp]
    if discount != 1.0:  # relative to each node's own depth
        value_sum /= discount ** np.asarray([tree.depth(n) for n in range(len(tree))], dtype=np.float64)
    return MCTSResult(visits, value_sum, iterations)


def search_tree(tree: TrajectoryTree, config: SearchConfig | None = None) -> MCTSResult:
    """Run :func:`run_mcts` with ``config`` and store the statistics in the tree (``mcts_visits``, ``mcts_value``)."""
    cfg = config or SearchConfig()
    result = run_mcts(
        tree, cfg.iterations, cfg.gamma, seed=cfg.seed, tie_break=cfg.tie_break, discount=cfg.discount
    )
    tree.set_search_values(
        result.visits,
        result.value_sum,
        algorithm="offline-mcts",
        iterations=cfg.iterations,
        gamma=cfg.gamma,
        seed=cfg.seed,
        tie_break=cfg.tie_break,
        discount=cfg.discount,
    )
    return result


# --------------------------------------------------------------------------------------------- values


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


def mcts_values(tree: TrajectoryTree) -> np.ndarray:
    """r_M / c_M of the last search stored in the tree, NaN where it never went.

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
        return mcts_values(tree)
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
