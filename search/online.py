"""Online expansion of a trajectory tree: PUCT search that acts in the environment (beyond the paper).

Each iteration selects a path from the root by PUCT (:func:`~w2s_agents.search.stats.puct_score`),

    score(child) = Q(child) + c_puct * P(child) * sqrt(N(parent)) / (1 + N(child)),

where Q = W / N is the mean value backed up through the child by this search (the data mean return before it
is visited), P the policy's prior of the child's action (0 for data children it did not propose) and N the
search visits; actions the policy proposed at a node that are not children yet compete too (with the node's
mean as their value), so nodes widen as they are visited. At the first node not yet expanded by the search,
the environment is put into that node's state (``restore_state`` of a cached ``clone_state`` where the env has
them, otherwise a reset and a replay of the node's action prefix), the policy proposes actions with priors and
the most probable one that is not yet a child is taken. From the new action the policy's top action is
followed until the episode ends or the depth limit. The finished episode is recorded by
:class:`~w2s_agents.episode.EpisodeRecorder` (the same rule as every rollout: return = the env's normalised
score) and merged into the tree as a trajectory of role ``search`` (so new nodes carry the source ``search``'s
model); its return is backed up along its path.

The policy sees what a rollout's agent sees: the :class:`~w2s_agents.types.EpisodeState` of the episode (task,
turns, admissible commands of the current state, command grammar), never a rendered conversation.

The budget is counted in env steps (replays included) and policy tokens: no iteration starts over budget and
a rollout stops (truncated) when the budget runs out; the replay of the last iteration's prefix may go past
it by at most the prefix's length. The environment and the policy are passed in (:class:`SearchEnv`,
:data:`Policy`), so any gymnasium text env of DESIGN section 7 and any agent fit.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from w2s_agents.config import check, option
from w2s_agents.episode import EpisodeRecorder
from w2s_agents.tree import ROOT, TrajectoryTree, normalize_text
from w2s_agents.types import EpisodeState, Source, Step, Trajectory

from .stats import SearchStats, puct_score

__all__ = [
    "OnlineResult",
    "OnlineSearchConfig",
    "Policy",
    "PolicyOutput",
    "Proposal",
    "SearchEnv",
    "expand_online",
    "puct_score",
]

logger = logging.getLogger(__name__)


@runtime_checkable
class SearchEnv(Protocol):
    """The part of the env contract (DESIGN section 7) the search uses; ``clone_state`` and
    ``restore_state`` are optional (without them a node's state is reached by replaying its actions)."""

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict]:
        """Start the task; returns (observation, info)."""
        ...

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        """Act; returns (observation, reward, terminated, truncated, info with ``won``/``score``...)."""
        ...


@dataclass(frozen=True)
class Proposal:
    """An action the policy proposes in a state, with its prior probability."""

    action: str
    prior: float
    thought: str = ""


@dataclass(frozen=True)
class PolicyOutput:
    """The policy's answer for one state."""

    proposals: tuple[Proposal, ...]
    """Candidate actions, any order; priors need not sum to 1 (they are normalised)."""
    tokens: int = 0
    """Model tokens the call cost (prompt + generated), counted against the token budget."""


Policy = Callable[[EpisodeState], PolicyOutput]
"""Maps the state of an episode (task, turns so far, admissible commands) to proposals for the next action."""


@dataclass(frozen=True)
class OnlineSearchConfig:
    """Online expansion of trees with an environment and a policy prior."""

    iterations: int = option(100, "most search iterations (each ends in one new episode)")
    c_puct: float = option(1.0, "exploration weight of PUCT")
    max_env_steps: int = option(2000, "budget of env steps, replays included (0: no limit)")
    max_tokens: int = option(0, "budget of policy tokens (0: no limit)")
    max_depth: int = option(20, "longest episode in actions (deeper episodes end as truncated)")
    seed: int = option(0, "seed passed to env.reset (the search itself breaks ties by a fixed order)")
    model: str = option("search", "model name recorded in the source of the new trajectories")

    def __post_init__(self) -> None:
        check(self.iterations >= 0, "iterations", f"must be >= 0, got {self.iterations}")
        check(self.c_puct >= 0, "c_puct", f"must be >= 0, got {self.c_puct}")
        check(self.max_env_steps >= 0, "max_env_steps", f"must be >= 0, got {self.max_env_steps}")
        check(self.max_tokens >= 0, "max_tokens", f"must be >= 0, got {self.max_tokens}")
        check(self.max_depth >= 1, "max_depth", f"must be >= 1, got {self.max_depth}")


@dataclass(frozen=True)
class OnlineResult:
    """What an online expansion did."""

    iterations: int
    env_steps: int
    tokens: int
    new_nodes: int
    trajectories: tuple[Trajectory, ...]
    """The episodes the search played (already merged into the tree)."""


def _normalised(proposals: Sequence[Proposal]) -> dict[str, tuple[float, Proposal]]:
    """Priors by action key (duplicates summed, first spelling kept), normalised to sum to 1."""
    out: dict[str, tuple[float, Proposal]] = {}
    for p in proposals:
        key = normalize_text(p.action)
        if not key:
            continue
        prior = max(float(p.prior), 0.0)
        if key in out:
            out[key] = (out[key][0] + prior, out[key][1])
        else:
            out[key] = (prior, p)
    total = sum(v for v, _ in out.values())
    if total <= 0:
        return {k: (1.0 / len(out), p) for k, (_, p) in out.items()}
    return {k: (v / total, p) for k, (v, p) in out.items()}


@dataclass(frozen=True)
class _Saved:
    """An env state cached at a node: the engine state and the episode recorded up to the node."""

    env_state: Any
    steps: tuple[Step, ...]
    admissible: tuple[str, ...] | None


class _Player:
    """Plays the search's episodes in the env (resets, restores, replays, steps), counting env steps."""

    def __init__(self, env: SearchEnv, tree: TrajectoryTree, source: Source, seed: int) -> None:
        self.env, self.tree, self.source, self.seed = env, tree, source, seed
        self.env_steps = 0
        self.can_clone = callable(getattr(env, "clone_state", None)) and callable(
            getattr(env, "restore_state", None)
        )
        self.saved: dict[int, _Saved] = {}  # node -> state after reaching it (envs that clone)
        self.root: EpisodeRecorder | None = None  # the recorder right after the first reset (its task view)

    def reset(self) -> EpisodeRecorder:
        rec, _ = EpisodeRecorder.reset(
            self.env, self.tree.task_id, self.source, seed=self.seed, env_id=self.tree.env_id
        )
        # the episodes join this tree: they keep its task text and env id where it has them
        rec.instruction = self.tree.instruction or rec.instruction
        rec.env_id = self.tree.env_id or rec.env_id
        if self.root is None:
            self.root = rec
        return rec

    def step(self, rec: EpisodeRecorder, proposal: Proposal) -> tuple[bool, bool, dict]:
        """Act in the env and record the step; returns (terminated, truncated, info)."""
        self.env_steps += 1
        obs, reward, terminated, truncated, info = self.env.step(proposal.action)
        rec.step(proposal.action, obs, reward, info, thought=proposal.thought)
        return bool(terminated), bool(truncated), info

    def save(self, node: int, rec: EpisodeRecorder) -> None:
        """Cache the env's current state as the state of ``node`` (envs that clone)."""
        if self.can_clone and node not in self.saved:
            state = self.env.clone_state()  # type: ignore[attr-defined]
            self.saved[node] = _Saved(state, tuple(rec.steps), rec.admissible)

    def reach(self, path: list[int]) -> tuple[EpisodeRecorder, bool] | None:
        """Put the env into the state of ``path[-1]``: restore the deepest cached state on the path (envs that
        clone) and replay the actions after it, or reset and replay them all.

        Returns the episode recorded so far and whether it has ended, or None when a replay ends before
        reaching the node.
        """
        tree = self.tree
        start = next((i for i in range(len(path) - 1, -1, -1) if path[i] in self.saved), -1)
        if start >= 0:
            saved = self.saved[path[start]]
            self.env.restore_state(saved.env_state)  # type: ignore[attr-defined]
            root = self.root
            assert root is not None  # a state was cached after a reset
            rec = EpisodeRecorder(
                root.task_id,
                root.env_id,
                self.source,
                instruction=root.instruction,
                initial_observation=root.initial_observation,
                initial_state_key=root.initial_state_key,
                grammar=root.grammar,
            )
            rec.restore(list(saved.steps), saved.admissible)
        else:
            start = 0
            rec = self.reset()
            self.save(ROOT, rec)
        ended = False
        for i in range(start + 1, len(path)):
            n = path[i]
            terminated, truncated, _ = self.step(rec, Proposal(tree.action(n), 1.0, tree.thought(n)))
            ended = terminated or truncated
            if ended and i < len(path) - 1:
                return None
        return rec, ended


def expand_online(
    tree: TrajectoryTree,
    env: SearchEnv,
    policy: Policy,
    config: OnlineSearchConfig | None = None,
) -> OnlineResult:
    """Grow ``tree`` with episodes chosen by PUCT and played in ``env``; store the search statistics in it.

    The tree's search statistics afterwards hold this search's N and W (sum of backed-up returns) per node, so
    :func:`~w2s_agents.search.best_path` over ``node_values(tree, "mcts")`` gives the search's best path.
    Deterministic for a seed when the env and policy are.
    """
    cfg = config or OnlineSearchConfig()
    start_nodes = len(tree)
    stats = SearchStats.zeros(len(tree))
    priors: dict[
        int, dict[str, tuple[float, Proposal]]
    ] = {}  # expanded nodes: action key -> (prior, proposal)
    source = Source(model=cfg.model, role="search", sampler="online-puct", seed=cfg.seed)
    player = _Player(env, tree, source, cfg.seed)
    tokens = 0
    played: list[Trajectory] = []

    def ask(state: EpisodeState) -> dict[str, tuple[float, Proposal]]:
        nonlocal tokens
        out = policy(state)
        tokens += int(out.tokens)
        return _normalised(out.proposals)

    def over_budget() -> bool:
        return bool(
            (cfg.max_env_steps and player.env_steps >= cfg.max_env_steps)
            or (cfg.max_tokens and tokens >= cfg.max_tokens)
        )

    it = 0
    while it < cfg.iterations and not over_budget():
        it += 1
        # -- select: descend by PUCT until a node not expanded yet, or a new action wins at an expanded one
        node = ROOT
        chosen: Proposal | None = None
        while node in priors and not _ended(tree, node) and tree.depth(node) < cfg.max_depth:
            child, chosen = _select(tree, node, priors[node], stats, cfg.c_puct)
            if child is None:
                break
            node = child
        # -- reach the node's state
        path = tree.path(node)
        reached = player.reach(path)
        if reached is None:  # the env ended on the way (a replay that does not reproduce): stop here
            logger.warning("%s: replay of node %d ended early; stopping the search", tree.task_id, node)
            break
        rec, done = reached
        if done or _ended(tree, node) or len(path) - 1 >= cfg.max_depth:
            stats.backup(path, tree.mean_return(node) if tree.visits(node) else 0.0)
            continue
        # -- expand: the most probable new action, then follow the policy's top action
        if node not in priors:
            priors[node] = ask(rec.state())
        if not priors[node]:
            stats.backup(path, tree.mean_return(node))
            continue
        if chosen is None:  # first expansion: the most probable action that is not a child yet
            existing = {tree.action_key(c) for c in tree.children(node)}
            ranked = sorted(priors[node].items(), key=lambda kv: (-kv[1][0], kv[0]))
            chosen = next((p for k, (_, p) in ranked if k not in existing), ranked[0][1][1])
        first_new = rec.num_steps
        terminated, states = _rollout(player, rec, chosen, ask, cfg, over_budget)
        traj = rec.finish(terminated=terminated)
        leaf = tree.add(traj)
        new_path = tree.path(leaf)
        for n, state in zip(new_path[first_new + 1 :], states, strict=True):
            if state is not None and n not in player.saved:
                player.saved[n] = state
        played.append(traj)
        stats.backup(new_path, traj.return_)

    visits, value_sum = stats.arrays(len(tree))
    tree.set_search_values(
        visits,
        value_sum,
        algorithm="online-puct",
        iterations=it,
        c_puct=cfg.c_puct,
        seed=cfg.seed,
        model=cfg.model,
    )
    return OnlineResult(it, player.env_steps, tokens, len(tree) - start_nodes, tuple(played))


def _ended(tree: TrajectoryTree, node: int) -> bool:
    """A trajectory won or lost at ``node``: the episode cannot go on from it."""
    t = tree.terminal(node)
    return bool(t.get("won") or t.get("lost"))


def _select(
    tree: TrajectoryTree,
    node: int,
    prior: dict[str, tuple[float, Proposal]],
    stats: SearchStats,
    c_puct: float,
) -> tuple[int | None, Proposal | None]:
    """PUCT over ``node``'s children and the proposed actions that are not children yet.

    Returns ``(child, None)`` to descend, ``(None, proposal)`` to expand ``node`` with a new action, or
    ``(None, None)`` when there is nothing to choose. A child the policy did not propose has prior 0 and is
    chosen for its value; a new action's value is the node's own mean (first-play urgency). Ties go to the
    children in canonical order, then to new actions in key order.
    """
    children = tree.children(node)
    stats.grow(len(tree))
    parent_n = max(stats.visits[node], 1)
    fpu = stats.q(node, tree.mean_return(node))
    best_child: int | None = None
    best_new: Proposal | None = None
    best_score = -math.inf
    existing = set()
    for c in children:
        key = tree.action_key(c)
        existing.add(key)
        p = prior[key][0] if key in prior else 0.0
        score = puct_score(stats.q(c, tree.mean_return(c)), p, parent_n, stats.visits[c], c_puct)
        if score > best_score:
            best_child, best_new, best_score = c, None, score
    for key in sorted(prior):
        if key in existing:
            continue
        p, proposal = prior[key]
        score = puct_score(fpu, p, parent_n, 0, c_puct)
        if score > best_score:
            best_child, best_new, best_score = None, proposal, score
    return best_child, best_new


def _rollout(
    player: _Player,
    rec: EpisodeRecorder,
    first: Proposal,
    ask: Callable[[EpisodeState], dict[str, tuple[float, Proposal]]],
    cfg: OnlineSearchConfig,
    over_budget: Callable[[], bool],
) -> tuple[bool, list[_Saved | None]]:
    """Play ``first`` then the policy's most probable action until the episode ends, the depth limit or the
    budget; returns whether the env terminated the episode and the env state after each new step (None where
    the env does not clone or the episode ended)."""
    states: list[_Saved | None] = []
    proposal = first
    while True:
        terminated, truncated, _ = player.step(rec, proposal)
        saved = None
        if player.can_clone and not terminated:
            saved = _Saved(player.env.clone_state(), tuple(rec.steps), rec.admissible)  # type: ignore[attr-defined]
        states.append(saved)
        if terminated or truncated:
            return terminated, states
        if rec.num_steps >= cfg.max_depth or over_budget():
            return False, states
        ranked = ask(rec.state())
        if not ranked:
            return False, states
        proposal = min(ranked.items(), key=lambda kv: (-kv[1][0], kv[0]))[1][1]
