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

from w2s_agents.episode import EpisodeRecorder
from w2s_agents.tree import ROOT, TrajectoryTree
from w2s_agents.types import Source, Trajectory

__all__ = [
    "PathChoice",
    "PathOutcome",
    "PathReplayer",
    "StateGraph",
    "choose_path",
    "is_tree_path",
    "loop_erase",
    "replay_path",
    "stitched_path",
]


def _end_return(tree: TrajectoryTree, node: int) -> float | None:
    """Mean return of the trajectories that ended at ``node``, None when none did."""
    children = tree.children(node)
    ended = tree.visits(node) - sum(tree.visits(c) for c in children)
    if ended <= 0:
        return None
    return (tree.return_sum(node) - sum(tree.return_sum(c) for c in children)) / ended


@dataclass
class StateGraph:
    """The states of one tree and the observed moves between them (see the module docstring).

    Attributes:
        state: the state of every tree node (its key, or ``"#<node>"`` for a node without one).
        edges: per state, per action key, the tree nodes whose action was taken in that state, grouped by the
            state they reached: ``edges[s][a] = {t: [nodes]}``.
        ends: per state, the best mean return of the trajectories that ended at one of its nodes, and that node.
    """

    tree: TrajectoryTree
    state: list[str] = field(default_factory=list)
    edges: dict[str, dict[str, dict[str, list[int]]]] = field(default_factory=dict)
    ends: dict[str, tuple[float, int]] = field(default_factory=dict)

    @classmethod
    def build(cls, tree: TrajectoryTree) -> StateGraph:
        """The state graph of ``tree``."""
        g = cls(tree)
        g.state = [tree.state_key(n) or f"#{n}" for n in range(len(tree))]
        for node in tree.canonical_order():
            s = g.state[node]
            g.edges.setdefault(s, {})
            if node != ROOT:
                before = g.state[tree.parent(node)]
                targets = g.edges[before].setdefault(tree.action_key(node), {})
                targets.setdefault(s, []).append(node)
            ret = _end_return(tree, node)
            if ret is not None and (s not in g.ends or ret > g.ends[s][0]):
                g.ends[s] = (ret, node)
        return g

    @property
    def merged(self) -> int:
        """Tree nodes that share their state with another node (what the graph merges)."""
        counts: dict[str, int] = {}
        for s in self.state:
            counts[s] = counts.get(s, 0) + 1
        return sum(c for c in counts.values() if c > 1)

    def moves(self, s: str) -> list[tuple[str, str, int]]:
        """``(action key, next state, witness node)`` of every move out of ``s``, in tie order; an action seen
        reaching several states (a key that merges states the env tells apart) gives each."""
        out = []
        for action in sorted(self.edges.get(s, {})):
            for t, nodes in sorted(self.edges[s][action].items(), key=lambda kv: min(kv[1])):
                out.append((action, t, min(nodes)))
        return out

    def best_reachable(self) -> dict[str, float]:
        """Per state, the best mean return observed at any state reachable from it (the max value backed up
        over the graph; -inf where no trajectory ended below)."""
        best = {s: self.ends.get(s, (-math.inf, -1))[0] for s in self.edges}
        preds: dict[str, set[str]] = {}
        for s in self.edges:
            for _, t, _ in self.moves(s):
                preds.setdefault(t, set()).add(s)
        queue = deque(s for s in best if best[s] > -math.inf)
        while queue:  # propagate maxima backwards until nothing improves
            t = queue.popleft()
            for s in preds.get(t, ()):
                if best[t] > best[s]:
                    best[s] = best[t]
                    queue.append(s)
        return best


def loop_erase(tree: TrajectoryTree, path: Sequence[int], graph: StateGraph | None = None) -> list[int]:
    """``path`` (tree nodes from the root) with every cycle cut out.

    Walking the path, a node whose state was already visited at position i drops every node after position i
    up to and including itself: the episode was back in that state, so the actions in between went round in
    a circle. Returns the kept nodes, the root first.
    """
    g = graph or StateGraph.build(tree)
    kept: list[int] = []
    at: dict[str, int] = {}  # state -> its position in kept
    for node in path:
        s = g.state[node]
        if s in at:
            for dropped in kept[at[s] + 1 :]:
                del at[g.state[dropped]]
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
    start = g.state[ROOT]
    best = g.best_reachable()
    goal_value = best.get(start, -math.inf)
    if goal_value == -math.inf:
        return None
    goals = {s for s, (ret, _) in g.ends.items() if ret == goal_value}
    # breadth-first from the start: the first goal reached is one of the nearest; moves in tie order
    parent: dict[str, tuple[str, int] | None] = {start: None}
    queue = deque([start])
    found = start if start in goals else None
    while queue and found is None:
        s = queue.popleft()
        for _, t, node in g.moves(s):
            if t in parent:
                continue
            parent[t] = (s, node)
            if t in goals:
                found = t
                break
            queue.append(t)
    if found is None:  # pragma: no cover - a reachable goal is always found
        return None
    nodes: list[int] = []
    s = found
    while parent[s] is not None:
        s, node = parent[s]  # type: ignore[misc]
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
    ``raw`` loop-erased is tried next). A shortened path becomes the choice only when ``replay`` reaches at least
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
    for kind, nodes, target in candidates:
        if nodes == raw or len(nodes) < 2:
            continue
        if replay is None:
            return PathChoice(nodes, kind, None, len(raw) - 1, tuple(dropped))
        outcome = replay(tree, nodes, target)
        if outcome.verified:
            return PathChoice(nodes, kind, outcome.trajectory, len(raw) - 1, tuple(dropped))
        dropped.append(kind)
    return PathChoice(raw, "tree", None, len(raw) - 1, tuple(dropped))
