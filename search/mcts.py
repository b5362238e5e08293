"""Offline MCTS over a fixed trajectory tree: the paper's search ("tree -> values").

The tree is never expanded: a simulation descends from the root, taking an unvisited child first (in tie
order) and otherwise the child of highest UCB (:func:`~w2s_agents.search.stats.ucb_score`),

    UCB(v) = W(v) / N(v) + gamma * sqrt(ln N(parent) / N(v)),

until it reaches a leaf, evaluates the leaf by the mean final return of the data trajectories through it, and
adds that value to W and 1 to N of every node on its path (:func:`~w2s_agents.search.stats.backup`). N and W
are the paper's c_M and r_M. The best path e* goes greedily from the root to a leaf by Q = W / N
(:mod:`w2s_agents.search.values`).

With a ``discount`` d below 1 (an option; the paper's search is undiscounted), a return reached k steps below
a node counts d^k there: the leaf value backed up is d^depth(leaf) times its mean return, and each node's
W is kept relative to its own depth (divided by d^depth(node)), so that values stay in [0, 1] and, of two
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
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from w2s_agents.config import check, option
from w2s_agents.tree import TrajectoryTree

from .stats import backup
from .values import ValueKind

__all__ = ["MCTSResult", "SearchConfig", "run_mcts", "search_tree", "tie_orders"]


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
        "node value for best paths and pairs: mcts (the search value W/N), mean return, max (Bellman), "
        "success rate",
    )
    paths: Literal["tree", "loop-erased", "stitched"] = option(
        "stitched",
        "what a tree's SFT row is made of, where the env reports state keys: the greedy tree path by value "
        "(tree, the paper's), that path with its cycles cut (loop-erased), or the fewest moves over the states "
        "the trajectories reached to the best outcome observed (stitched); a shortened path becomes a row only "
        "when its replay in the env reaches that outcome",
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
    """N: simulations through each node (int64; the paper's c_M)."""
    value_sum: np.ndarray
    """W: sum of the leaf values backed up through each node (float64; the paper's r_M)."""
    iterations: int

    def values(self) -> np.ndarray:
        """Q = W / N per node, NaN where the search never went."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.visits > 0, self.value_sum / np.maximum(self.visits, 1), np.nan)


# ------------------------------------------------------------------------------------------ tie order


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
    """Run the paper's offline MCTS on ``tree`` and return N and W of every node.

    Same result as repeating :func:`~w2s_agents.search.stats.select_child` from the root to a leaf and
    :func:`~w2s_agents.search.stats.backup` of the leaf's mean return ``iterations`` times, computed on the
    tree with single-child chains contracted. With ``discount`` below 1 the leaf values are discounted by depth
    and each node's W is relative to its own depth (module docstring); UCB then compares the children's values
    from their own depth.
    """
    if tie_break not in ("order", "random"):
        raise ValueError(f"tie_break must be 'random' or 'order', got {tie_break!r}")
    if not 0.0 < discount <= 1.0:
        raise ValueError(f"discount must be in (0, 1], got {discount}")
    kids, leaf, comp, order = _contract(tree, tie_break, seed, discount)
    # W of a compressed node is relative to its head's depth; scale[c] turns it into a value at that depth
    # (1.0 without a discount, where x * 1.0 == x keeps the values exactly the plain algorithm's)
    scale = [1.0] * len(kids)
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
            else:  # UCB (stats.ucb_score), inlined: this loop is the search's whole cost
                ln = log(n)
                best = -inf
                for c in ch:
                    vc = vis[c]
                    u = val[c] * scale[c] / vc + gamma * sqrt(ln / vc)
                    if u > best:
                        best, h = u, c
            path.append(h)
            ch = kids[h]
        backup(path, leaf[h], vis, val)

    # every node of a chain has its head's statistics
    visits = np.empty(len(tree), dtype=np.int64)
    value_sum = np.empty(len(tree), dtype=np.float64)
    visits[order] = np.asarray(vis, dtype=np.int64)[comp]
    value_sum[order] = np.asarray(val, dtype=np.float64)[comp]
    if discount != 1.0:  # relative to each node's own depth
        value_sum /= discount ** np.asarray([tree.depth(n) for n in range(len(tree))], dtype=np.float64)
    return MCTSResult(visits, value_sum, iterations)


def search_tree(tree: TrajectoryTree, config: SearchConfig | None = None) -> MCTSResult:
    """Run :func:`run_mcts` with ``config`` and store N and W in the tree (``search_visits``,
    ``search_value_sum``)."""
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
