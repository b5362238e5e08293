"""Merging trajectories into a trajectory tree, and summing the statistics the merge leaves pending.

:func:`merge` walks each trajectory down the tree: a step joins the child of its node that has the same action
key and the same observation token (see :mod:`w2s_agents.tree.keys`), found by one dict lookup, or becomes a
new child; the steps after a new child make new children too, with no lookup (a new node has no children).
It keeps each node's thought (that of the highest-return trajectory, smallest text on ties) at once, but only
records each trajectory's path of node ids for the counted statistics (visits, return sums, successes,
sources, terminal outcomes and depths). :func:`flush` sums them when they are next read: with numpy
when many steps are pending (:func:`_flush_bulk`) and one by one when few are (:func:`_flush_loop`), with the
results of adding them step by step.

Bulk passes run with the garbage collector paused (:func:`gc_paused`): they allocate an untracked object per
step or node, which would otherwise trigger full collections walking every tree in memory for no garbage.
"""

from __future__ import annotations

import gc
from array import array
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from w2s_agents.types import Trajectory

from .counts import _END_INDEX, _N_END, _SCALE, _int_array, add_source_counts, mix_source, model_id
from .keys import FIRST_SEEN, action_key, other_text

if TYPE_CHECKING:
    from .tree import TrajectoryTree

_BULK_STEPS = 2048  # pending steps from which statistics are summed with numpy rather than one by one


@contextmanager
def gc_paused() -> Iterator[None]:
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


def merge(tree: TrajectoryTree, trajectories: Iterable[Trajectory]) -> tuple[int, int]:
    """Merge trajectories into ``tree``; returns how many, and the node the last one ended at (-1 when none).

    Raises:
        ValueError: a trajectory belongs to another task (those before it are merged).
    """
    task_id = tree.task_id
    akc, index, keys, parents = tree._akc, tree._index, tree._key, tree._parent
    oka, otext, thoughts, trets, toks = tree._oka, tree._otext, tree._thought, tree._tret, tree._tokens
    states = tree._state
    states_append = states.append
    models = tree._model_index
    flat_append, ret_append = tree._pend_nodes.append, tree._pend_ret.append
    end_index, n_end, first = _END_INDEX, _N_END, FIRST_SEEN
    n0 = len(keys)
    count = 0
    node = -1
    try:
        for traj in trajectories:
            if traj.task_id != task_id:
                raise ValueError(f"trajectory of task {traj.task_id!r} added to the tree of task {task_id!r}")
            if traj.instruction != tree.instruction and (
                not tree.instruction or traj.instruction < tree.instruction
            ):
                tree.instruction = traj.instruction  # smallest wins: order-independent
            if not tree.env_id:
                tree.env_id = traj.env_id
            r = round(traj.return_ * _SCALE)
            s = models.get(traj.source.model)
            if s is None:
                s = model_id(tree, traj.source.model)
            # an observation is compared with the first text seen at its node (it nearly always is that
            # text): one string comparison, and no key, instead of hashing and normalising the observation

            # the root: the task itself
            o = traj.initial_observation
            t0 = otext[0]
            if t0 is None:
                otext[0] = o
                tree._settled_below = 0
                token = first
            else:
                token = first if o == t0 else other_text(tree, 0, o)
            sk = traj.initial_state_key
            if sk is not None:
                tree._state_seen = True
                if sk != states[0]:
                    state_mismatch(tree, 0, sk)
            # the root starts the trajectory's path, marked by ~code (negative): model, success and how
            # it ended
            flat_append(~(((s << 1) | (1 if traj.success else 0)) * n_end + end_index[traj.end]))
            ret_append(r)
            count += 1
            node = 0
            steps = iter(traj.steps)
            for step in steps:  # down the existing nodes
                a = step.action
                ak = akc.get(a)
                if ak is None:
                    ak = action_key(tree, a)
                key = (node, ak, token)
                c = index.get(key)
                o = step.observation
                if c is None:
                    c = index[key] = len(keys)
                    keys.append(key)
                    parents.append(node)
                    oka.append(None)  # shown key: that of the first text, settled when read
                    otext.append(o)
                    thoughts.append(step.thought)
                    trets.append(r)
                    toks.append(None if step.token_ids is None else (step.token_ids, step.tokenizer))
                    states_append(step.state_key)
                    flat_append(c)
                    node = c
                    break
                token = first if o == otext[c] else other_text(tree, c, o)
                if step.state_key != states[c]:
                    state_mismatch(tree, c, step.state_key)
                t = trets[c]
                if r >= t and (r > t or step.thought < thoughts[c]):
                    thoughts[c] = step.thought
                    trets[c] = r
                    toks[c] = None if step.token_ids is None else (step.token_ids, step.tokenizer)
                flat_append(c)
                node = c
            # past a new node every step makes a new node (a new node has no children, so no lookup), whose
            # observation is its first text
            c = len(keys)
            for step in steps:
                a = step.action
                ak = akc.get(a)
                if ak is None:
                    ak = action_key(tree, a)
                key = (node, ak, first)
                index[key] = c
                keys.append(key)
                parents.append(node)
                oka.append(None)
                otext.append(step.observation)
                thoughts.append(step.thought)
                trets.append(r)
                toks.append(None if step.token_ids is None else (step.token_ids, step.tokenizer))
                states_append(step.state_key)
                flat_append(c)
                node = c
                c += 1
    finally:
        if len(keys) != n0:
            tree._canonical = False
            tree._children = None
    # visits, return sums, successes, sources, depths and ends are summed when next read (see flush)
    return count, node


def state_mismatch(tree: TrajectoryTree, node: int, key: str | None) -> None:
    """A step reached ``node`` with a state key other than the one recorded there.

    A node keeps the key its trajectories agree on (a trajectory without keys agrees with any); a node reached
    with two different keys (an env that is not deterministic given its key, or a key that misses part of the
    state) gets None for good, so the result does not depend on the order trajectories are added in.
    """
    if key is None or node in tree._state_conflicts:
        return
    tree._state_seen = True
    if tree._state[node] is None:
        tree._state[node] = key
    else:
        tree._state[node] = None
        tree._state_conflicts.add(node)


def flush(tree: TrajectoryTree) -> None:
    """Sum the statistics of the trajectories merged since the last call into the per-node totals."""
    flat, rets = tree._pend_nodes, tree._pend_ret
    if not rets:
        return
    tree._pend_nodes, tree._pend_ret = array("q"), array("q")
    tree._ret_bound += sum(map(abs, rets))
    n = len(tree._key)
    fresh = len(tree._visits) == 1 and tree._visits[0] == 0  # nothing summed yet
    grow = n - len(tree._visits)
    if grow:
        zeros = array("q", bytes(8 * grow))
        tree._visits.extend(zeros)
        tree._ret.extend([0] * grow)
        tree._succ.extend(zeros)
        tree._src.extend(array("q", [-1]) * grow)
        tree._depth.extend(array("q", [-1]) * grow)
    if len(flat) < _BULK_STEPS or 4 * len(flat) < n or tree._ret_bound >= 1 << 62:
        _flush_loop(tree, flat, rets)
    else:
        _flush_bulk(tree, flat, rets, fresh)


def _flush_loop(tree: TrajectoryTree, flat: array, rets: array) -> None:
    """Few pending steps: update the touched nodes one by one."""
    visits, ret, succs, srcs, depths = tree._visits, tree._ret, tree._succ, tree._src, tree._depth
    end_at = tree._terminal.add
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
                mix_source(tree, c, s)
        prev = c
    end_at(prev, end)


def _flush_bulk(tree: TrajectoryTree, flat: array, rets: array, fresh: bool) -> None:
    """Many pending steps: count them with numpy (exact: integer counts and fixed-point sums in int64)."""
    n, k = len(tree._key), len(flat)
    nodes = np.frombuffer(flat, dtype=np.int64).copy()
    starts = np.flatnonzero(nodes < 0)
    code, end = np.divmod(~nodes[starts], _N_END)
    nodes[starts] = 0
    traj = np.zeros(k, dtype=np.int64)
    traj[starts[1:]] = 1
    np.cumsum(traj, out=traj)  # trajectory of each pending step
    depths = np.zeros(n, dtype=np.int64) if fresh else np.asarray(tree._depth, dtype=np.int64)
    depths[nodes] = np.arange(k, dtype=np.int64) - starts[traj]
    # how the trajectories ended, at their last nodes
    last = nodes[np.append(starts[1:], k) - 1]
    end_nodes, which = np.unique(last, return_inverse=True)
    table = np.zeros((len(end_nodes), _N_END), dtype=np.int64)
    np.add.at(table, (which, end), 1)
    tree._terminal.add_table(end_nodes.tolist(), table)
    won = (code & 1).astype(bool)[traj]
    model = (code >> 1)[traj]
    add_visits = np.bincount(nodes, minlength=n)
    add_ret = np.zeros(n, dtype=np.int64)
    np.add.at(add_ret, nodes, np.frombuffer(rets, dtype=np.int64)[traj])
    add_succ = np.bincount(nodes[won], minlength=n)
    old_visits = np.zeros(n, dtype=np.int64) if fresh else np.asarray(tree._visits, dtype=np.int64)
    # sources: per node, the (model, count) pairs of the pending steps
    m = len(tree._models)
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
    old_src = np.full(n, -1, dtype=np.int64) if fresh else np.asarray(tree._src, dtype=np.int64)
    single = kinds == 1
    first = single & (old_visits == 0)  # new to the tree: one model
    same = single & (old_visits > 0) & (old_src == only)  # one model, the one it had
    is_mixed = (kinds > 0) & ~first & ~same
    src = old_src.copy()
    src[first] = only[first]
    src[is_mixed] = -1
    add_source_counts(tree, pair_node, pair_model, pair_counts, is_mixed, old_src, old_visits)
    if fresh:
        tree._visits, tree._ret, tree._succ = _int_array(add_visits), add_ret.tolist(), _int_array(add_succ)
    else:
        tree._visits = _int_array(old_visits + add_visits)
        tree._ret = (np.asarray(tree._ret, dtype=np.int64) + add_ret).tolist()
        tree._succ = _int_array(np.asarray(tree._succ, dtype=np.int64) + add_succ)
    tree._src = _int_array(src)
    tree._depth = _int_array(depths)
