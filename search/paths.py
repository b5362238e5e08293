"""Best paths without detours: loop erasure and stitching over the game states the weak agent reached.

A tree node stands for an action taken after a history, so the same game state reached on two branches (or
twice on one path: "go east, go west, go east") gives separate nodes. With the env's state keys
(:meth:`~w2s_agents.tree.TrajectoryTree.state_key`: the state a node's action reached; the root's is the first
state) the nodes that reach the same state merge into a **state graph**: a vertex per state, an edge per
(state, action) observed in some trajectory, with the tree nodes that witness it. A node without a key is a
state of its own (it merges with nothing).

* :func:`loop_erase` cuts the cycles out of one path: where a path returns to a state it visited, the actions
  between the two visits are dropped.
* :func:`stitched_path` takes the best path over the graph: the fewest steps from the first state to a state
  where the best outcome reachable in the graph was observed (the max value backed up over the graph). It may
  jump between branches: a prefix of one trajectory to a state, the suffix of another from that state on.

A shortened path is a sequence of tree nodes whose actions, played from the reset, should reach the outcome it
was taken for; whether they do is settled by replaying it in the env (:func:`replay_path`), since a state key
can merge states that differ in what it does not see. Every function here is deterministic: ties go to the
edge whose action key, then witness node, comes first.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import numpy as np

from w2s_agents.episode import EpisodeRecorder
from w2s_agents.tree import ROOT, TrajectoryTree
from w2s_agents.types import Source, Trajectory

__all__ = [
    "PathChoice",
    "PathOutcome",
    "PathReplayer",
    "StateGraph",
    "choose_path",
    "env_replayer",
    "is_tree_path",
    "loop_erase",
    "replay_path",
    "stitched_path",
]


@dataclass
class StateGraph:
    """The states of one tree and the observed moves between them (see the module docstring).

    Built with a few numpy passes over the nodes: the moves are the distinct (state, action, next state) of the
    tree's steps, each with its smallest witness node, so the searches below run over the moves, not the nodes.

    Attributes:
        state_id: the state of every tree node as a small integer.
        names: the state of every id: its key, or ``"#<node>"`` for a node without one.
        ends: per state, the best mean return of the trajectories that ended at one of its nodes, and that
            node (the smallest of equals).
    """

    tree: TrajectoryTree
    state_id: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    names: list[str] = field(default_factory=list)
    ends: dict[str, tuple[float, int]] = field(default_factory=dict)
    # the moves, grouped by their state (CSR: _off[s]:_off[s + 1]), each group in tie order (action key, then
    # witness node)
    _off: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64))
    _action: list[str] = field(default_factory=list)
    _dst: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    _node: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @classmethod
    def build(cls, tree: TrajectoryTree) -> StateGraph:
        """The state graph of ``tree``."""
        keys = tree.state_keys()
        n = len(keys)
        index = {k: i for i, k in enumerate(dict.fromkeys(keys))}
        sid = np.fromiter(map(index.__getitem__, keys), dtype=np.int64, count=n)
        names: list[str] = [k if k is not None else "" for k in index]
        if None in index:  # a node without a key is a state of its own
            alone = np.flatnonzero(sid == index[None])
            sid[alone] = np.arange(len(index), len(index) + len(alone))
            names += [f"#{v}" for v in alone.tolist()]
        g = cls(tree, sid, names)
        # the moves: (state before, action, state after) of every step, with the smallest node taking it
        parents = tree.parent_array()
        actions = tree.action_keys()
        alphabetical = sorted(set(actions))  # action ids in the order of their keys: the tie order
        aindex = {a: i for i, a in enumerate(alphabetical)}
        rank = np.fromiter(map(aindex.__getitem__, actions), dtype=np.int64, count=n)
        src, act, dst = sid[parents[1:]], rank[1:], sid[1:]
        n_states, n_actions = len(names), max(len(alphabetical), 1)
        if n_states * n_actions * n_states < 2**62:  # one integer per move: a single sort finds them all
            code = (src * n_actions + act) * n_states + dst
            _, first = np.unique(code, return_index=True)  # the first step of each move: its smallest node
        else:
            perm = np.lexsort((dst, act, src))  # stable: equal moves keep their node order
            s, a, d = src[perm], act[perm], dst[perm]
            keep = np.ones(len(perm), dtype=bool)
            keep[1:] = (s[1:] != s[:-1]) | (a[1:] != a[:-1]) | (d[1:] != d[:-1])
            first = perm[keep]
        src, act, dst, nodes = src[first], act[first], dst[first], first.astype(np.int64) + 1
        order = np.lexsort((nodes, act, src))  # tie order: action key, then witness node
        src, act, dst, nodes = src[order], act[order], dst[order], nodes[order]
        g._off = np.searchsorted(src, np.arange(len(names) + 1)).astype(np.int64)
        g._action = [alphabetical[i] for i in act.tolist()]
        g._dst, g._node = dst, nodes
        # where trajectories ended: a node's visits less its children's, and their mean return
        visits, returns, _ = tree.stat_arrays()
        child_visits = np.bincount(parents[1:], weights=visits[1:], minlength=n).astype(np.int64)
        child_returns = np.bincount(parents[1:], weights=returns[1:], minlength=n)
        ended = visits - child_visits
        at = np.flatnonzero(ended > 0)
        means = (returns[at] - child_returns[at]) / ended[at]
        best = np.lexsort((at, -means, sid[at]))  # per state: the best mean, then the smallest node
        first_of = np.ones(len(best), dtype=bool)
        first_of[1:] = sid[at][best][1:] != sid[at][best][:-1]
        for node, ret in zip(at[best][first_of].tolist(), means[best][first_of].tolist(), strict=True):
            g.ends[names[sid[node]]] = (ret, node)
        return g

    @property
    def state(self) -> list[str]:
        """The state of every tree node (``names[state_id[n]]``)."""
        names = self.names
        return [names[i] for i in self.state_id.tolist()]

    @property
    def merged(self) -> int:
        """Tree nodes that share their state with another node (what the graph merges)."""
        counts = np.bincount(self.state_id, minlength=len(self.names))
        return int(counts[counts > 1].sum())

    def moves(self, s: str) -> list[tuple[str, str, int]]:
        """``(action key, next state, witness node)`` of every move out of ``s``, in tie order; an action seen
        reaching several states (a key that merges states the env tells apart) gives each."""
        i = self.names.index(s)
        lo, hi = int(self._off[i]), int(self._off[i + 1])
        return [(self._action[k], self.names[int(self._dst[k])], int(self._node[k])) for k in range(lo, hi)]

    def _best_reachable(self) -> np.ndarray:
        """Per state id, the best mean return observed at any state reachable from it (-inf where none)."""
        best = np.full(len(self.names), -math.inf)
        for ret, node in self.ends.values():
            best[self.state_id[node]] = ret
        src = np.repeat(np.arange(len(self.names)), np.diff(self._off))
        while True:  # back up the maxima along the moves until nothing improves (at most the graph's depth)
            new = best.copy()
            np.maximum.at(new, src, best[self._dst])
            if np.array_equal(new, best):
                return best
            best = new

    def best_reachable(self) -> dict[str, float]:
        """Per state, the best mean return observed at any state reachable from it (the max value backed up
        over the graph; -inf where no trajectory ended below)."""
        return dict(zip(self.names, self._best_reachable().tolist(), strict=True))


def loop_erase(tree: TrajectoryTree, path: Sequence[int], graph: StateGraph | None = None) -> list[int]:
    """``path`` (tree nodes from the root) with every cycle cut out.

    Walking the path, a node whose state was already visited at position i drops every node after position i
    up to and including itself: the episode was back in that state, so the actions in between went round in
    a circle. Returns the kept nodes, the root first.
    """
    g = graph or StateGraph.build(tree)
    sid = g.state_id
    kept: list[int] = []
    at: dict[int, int] = {}  # state id -> its position in kept
    for node in path:
        s = int(sid[node])
        if s in at:
            for dropped in kept[at[s] + 1 :]:
                del at[int(sid[dropped])]
            del kept[at[s] + 1 :]
            continue
        at[s] = len(kept)
        kept.append(node)
    return kept


def stitched_path(tree: TrajectoryTree, graph: StateGraph | None = None) -> list[int] | None:
    """The best path over the state graph: the fewest moves from the root's state to a state where the best
    outcome reachable from the root was observed. Returns tree nodes (the root first; consecutive nodes need not
    be parent and child), or None when no trajectory ended anywhere.
    """
    g = graph or StateGraph.build(tree)
    start = int(g.state_id[ROOT])
    best = g._best_reachable()
    goal_value = best[start]
    if goal_value == -math.inf:
        return None
    goals = {int(g.state_id[node]) for ret, node in g.ends.values() if ret == goal_value}
    # breadth-first from the start: the first goal reached is one of the nearest; moves in tie order
    parent: dict[int, tuple[int, int] | None] = {start: None}
    queue = deque([start])
    found = start if start in goals else None
    off, dst, witness = g._off, g._dst, g._node
    while queue and found is None:
        s = queue.popleft()
        for k in range(int(off[s]), int(off[s + 1])):
            t = int(dst[k])
            if t in parent:
                continue
            parent[t] = (s, int(witness[k]))
            if t in goals:
                found = t
                break
            queue.append(t)
    if found is None:  # pragma: no cover - a reachable goal is always found
        return None
    nodes: list[int] = []
    s = found
    while (step := parent[s]) is not None:
        s, node = step
        nodes.append(node)
    return [ROOT, *reversed(nodes)]


def is_tree_path(tree: TrajectoryTree, nodes: Sequence[int]) -> bool:
    """Whether ``nodes`` go down the tree one child at a time from its first node."""
    return all(tree.parent(b) == a for a, b in pairwise(nodes))


@dataclass(frozen=True)
class PathOutcome:
    """What a replayed path gave."""

    trajectory: Trajectory | None
    """The replayed episode (None when the env ended it before the path's last action)."""
    verified: bool
    """The replay reached at least the return the path was taken for."""


def replay_path(
    env: Any,
    tree: TrajectoryTree,
    nodes: Sequence[int],
    *,
    expected_return: float,
    source: Source,
    seed: int | None = None,
) -> PathOutcome:
    """Play the actions of ``nodes`` (the root first) from the reset of ``env`` and record the episode.

    The path is verified when every action was played (the env did not end the episode early) and the episode's
    return is at least ``expected_return`` (with a small tolerance for float sums).
    """
    rec, _ = EpisodeRecorder.reset(env, tree.task_id, source, seed=seed, env_id=tree.env_id)
    rec.instruction = tree.instruction or rec.instruction
    info: dict[str, Any] = {}
    terminated = truncated = False
    actions = [tree.action(n) for n in nodes[1:]]
    for i, action in enumerate(actions):
        obs, reward, terminated, truncated, info = env.step(action)
        rec.step(action, obs, reward, info, thought=tree.thought(nodes[i + 1]))
        if (terminated or truncated) and i < len(actions) - 1:
            return PathOutcome(rec.finish(info, bool(terminated)), False)
    traj = rec.finish(info, bool(terminated))
    return PathOutcome(traj, traj.return_ >= expected_return - 1e-9)


PathReplayer = Callable[[TrajectoryTree, Sequence[int], float], PathOutcome]
"""Replays a path of a tree for the return it was taken for (an env bound by the caller)."""


def env_replayer(env: Any, *, model: str = "path-replay") -> PathReplayer:
    """A :data:`PathReplayer` that plays paths in ``env`` (episodes recorded with role ``search`` and ``model``)."""
    source = Source(model=model, role="search", sampler="replay")

    def replay(tree: TrajectoryTree, nodes: Sequence[int], target: float) -> PathOutcome:
        return replay_path(env, tree, nodes, expected_return=target, source=source)

    return replay


@dataclass(frozen=True)
class PathChoice:
    """The best path of one tree as it becomes a training row, and how it was found."""

    nodes: list[int]
    """The chosen path's tree nodes, the root first."""
    kind: str
    """``tree`` (the greedy tree path), ``loop-erased`` or ``stitched``."""
    trajectory: Trajectory | None
    """The replayed episode of a shortened path (its texts are the env's), None for a tree path."""
    raw_steps: int
    """Actions on the greedy tree path."""
    tried: tuple[str, ...] = ()
    """Shortened paths tried and dropped because their replay did not reach the outcome they were taken for."""

    @property
    def steps(self) -> int:
        """Actions on the chosen path."""
        return len(self.nodes) - 1


def choose_path(
    tree: TrajectoryTree,
    raw: Sequence[int],
    *,
    mode: str,
    replay: PathReplayer | None,
    graph: StateGraph | None = None,
) -> PathChoice:
    """The path a tree's SFT row is made of: ``raw`` (the greedy tree path by the search's values) shortened by
    ``mode`` where the tree has state keys.

    ``mode`` is ``tree`` (``raw`` as it is), ``loop-erased`` (``raw`` with its cycles cut) or ``stitched`` (the
    fewest moves over the state graph to the best outcome observed, :func:`stitched_path`; when its replay fails,
    ``raw`` loop-erased is tried next). A candidate is tried only when it is shorter than ``raw`` or was taken
    for a better outcome than ``raw``'s (the mean return at its last node). A shortened path becomes the choice only when ``replay`` reaches at least
    the return it was taken for (None: a shortened path is taken without replay); otherwise it is dropped and
    counted in :attr:`PathChoice.tried`, and the next candidate is tried, down to ``raw``.

    Raises:
        ValueError: an unknown mode.
    """
    if mode not in ("tree", "loop-erased", "stitched"):
        raise ValueError(f"unknown path mode {mode!r} (expected tree, loop-erased or stitched)")
    raw = list(raw)
    if mode == "tree" or len(raw) < 2 or not tree.has_state_keys:
        return PathChoice(raw, "tree", None, len(raw) - 1)
    g = graph or StateGraph.build(tree)
    candidates: list[tuple[str, list[int], float]] = []
    if mode == "stitched":
        stitched = stitched_path(tree, g)
        if stitched is not None and len(stitched) > 1:
            goal = g.ends[g.state[stitched[-1]]][0]
            candidates.append(("stitched", stitched, goal))
    erased = loop_erase(tree, raw, g)
    leaf_return = tree.mean_return(raw[-1])
    candidates.append(("loop-erased", erased, leaf_return))
    dropped: list[str] = []
    raw_return = leaf_return
    for kind, nodes, target in candidates:
        # a candidate is worth a replay only if it is shorter, or was taken for a better outcome
        if len(nodes) < 2 or not (len(nodes) < len(raw) or target > raw_return):
            continue
        if replay is None:
            return PathChoice(nodes, kind, None, len(raw) - 1, tuple(dropped))
        outcome = replay(tree, nodes, target)
        if outcome.verified:
            return PathChoice(nodes, kind, outcome.trajectory, len(raw) - 1, tuple(dropped))
        dropped.append(kind)
    return PathChoice(raw, "tree", None, len(raw) - 1, tuple(dropped))
