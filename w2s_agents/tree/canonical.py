"""Canonical node ids of trajectory trees: children in canonical order, the canonical preorder, renumbering.

Siblings are ordered by (action key, key of the observation acted on); the canonical ids number the nodes in
preorder over that order, so that the same trajectories added in any order give the same ids. Until
:func:`canonicalize` renumbers them, ids are in insertion order and the children are sorted on request
(:func:`build_children`), in CSR form: ``ids[off[n]:off[n + 1]]`` are ``n``'s children.
"""

from __future__ import annotations

from array import array
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import numpy as np

from .counts import _int_array
from .keys import FIRST_SEEN
from .merge import flush, gc_paused

if TYPE_CHECKING:
    from .tree import TrajectoryTree

# per-node lists other than _key, permuted together by canonicalize()
_NODE_LISTS = (
    "_depth",
    "_oka",
    "_otext",
    "_thought",
    "_tret",
    "_tokens",
    "_visits",
    "_ret",
    "_succ",
    "_src",
    "_state",
)
# per-node int64 statistics held as array('q') (8 bytes a node, copied to and from numpy without a loop);
# return sums stay a list: past 2**62 they are summed as Python ints
_INT_ARRAYS = ("_depth", "_tret", "_visits", "_succ", "_src")


def build_children(tree: TrajectoryTree) -> tuple[np.ndarray, np.ndarray]:
    """The children of every node in canonical order, in CSR form ``(off, ids)`` (int64 and int32)."""
    n = len(tree._key)
    parents = np.array(tree._parent, dtype=np.int64)[1:]
    counts = np.bincount(parents, minlength=n)
    off = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=off[1:])
    if tree._canonical:  # grouped by parent, ascending ids: the canonical order
        return off, (np.argsort(parents, kind="stable") + 1).astype(np.int32)
    # sort each group of siblings by (action key, observation key): by the ranks of their keys among the
    # keys of the nodes that have siblings (one lexsort instead of a sort per group)
    multi = np.flatnonzero(counts[parents] >= 2) + 1
    arank = np.zeros(n - 1, dtype=np.int64)
    orank = np.zeros(n - 1, dtype=np.int64)
    if len(multi):
        picked = [tree._key[c] for c in multi.tolist()]
        actions = [k[1] for k in picked]
        of = {v: i for i, v in enumerate(sorted(set(actions)))}
        arank[multi - 1] = np.fromiter(map(of.__getitem__, actions), dtype=np.int64, count=len(actions))
        # a token FIRST_SEEN stands for the key of the parent's first text, known whenever a sibling acted on
        # another key (the merge keyed it to compare); when it is not known, every sibling acted on that
        # same key, and rank 0 for all of them keeps their order to the action keys
        okc, otext = tree._okc, tree._otext
        at: list[int] = []
        values: list[Any] = []
        for c, (p, _, token) in zip(multi.tolist(), picked, strict=True):
            if token is FIRST_SEEN:
                token = okc.get(otext[p])
                if token is None:
                    continue
            at.append(c)
            values.append(token)
        if values:
            of = {v: i for i, v in enumerate(sorted(set(values)))}
            rank = np.fromiter(map(of.__getitem__, values), dtype=np.int64, count=len(values))
            orank[np.array(at, dtype=np.int64) - 1] = rank
    return off, (np.lexsort((orank, arank, parents)) + 1).astype(np.int32)


def preorder(tree: TrajectoryTree) -> np.ndarray:
    """Node ids in canonical preorder as an int64 array, computed level by level with numpy: a node's position
    is its parent's plus one plus the sizes of the subtrees of its earlier siblings."""
    flush(tree)
    n = len(tree._key)
    if tree._canonical:
        return np.arange(n, dtype=np.int64)
    off, ids32 = tree.child_arrays()
    ids = ids32.astype(np.int64)
    parent = np.array(tree._parent, dtype=np.int64)
    depth = np.array(tree._depth, dtype=np.int64)
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


def canonicalize(tree: TrajectoryTree) -> None:
    """Renumber the nodes of ``tree`` in canonical preorder (statistics summed first)."""
    flush(tree)
    if tree._canonical:
        return
    with gc_paused():
        _renumber(tree)


def _renumber(tree: TrajectoryTree) -> None:
    perm = preorder(tree)
    n = len(perm)
    if np.array_equal(perm, np.arange(n)):
        tree._canonical = True
        return
    order = perm.tolist()
    new = np.empty(n, dtype=np.int64)
    new[perm] = np.arange(n, dtype=np.int64)
    new_id = new.tolist()
    pick = itemgetter(*order[1:]) if n > 2 else (lambda values: tuple(values[i] for i in order[1:]))
    moved = pick(tree._key)  # every node but the root (order[0])
    parents = new[np.array(tree._parent, dtype=np.int64)[perm[1:]]]
    tree._parent = array("q", [-1]) + _int_array(parents)
    # the tokens stay valid: a FIRST_SEEN refers to the parent's first text, which moves with the parent
    tree._key = [
        (-1, "", None),
        *zip(parents.tolist(), map(itemgetter(1), moved), map(itemgetter(2), moved), strict=True),
    ]
    for name in _NODE_LISTS:
        values = getattr(tree, name)
        if name in _INT_ARRAYS:
            setattr(tree, name, _int_array(np.array(values, dtype=np.int64)[perm]))
        else:
            setattr(tree, name, [values[0], *pick(values)])
    tree._src_sparse = {new_id[n]: d for n, d in tree._src_sparse.items()}
    tree._state_conflicts = {new_id[n] for n in tree._state_conflicts}
    tree._mix.remap(new_id)
    tree._terminal.remap(new_id)
    tree._index = dict(zip(tree._key[1:], range(1, n), strict=True))
    if tree._search_visits is not None and tree._search_value_sum is not None:
        tree._search_visits = tree._search_visits[perm]
        tree._search_value_sum = tree._search_value_sum[perm]
    if tree._settled_below < n:  # the nodes not settled are scattered now
        tree._settled_below = 0
    tree._canonical = True
    tree._children = build_children(tree)  # no sorting now that ids are canonical
