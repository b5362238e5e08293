"""Online expansion of a trajectory tree: PUCT search that acts in the environment (beyond the paper).

Each iteration selects a path from the root by PUCT,

    score(child) = Q(child) + c_puct * P(child) * sqrt(N(parent)) / (1 + N(child)),

where ``Q`` is the mean value backed up through the child by this search (the data mean return before it is
visited), ``P`` the policy's prior of the child's action (0 for data children it did not propose) and ``N``
the search visits; actions the policy proposed at a node that are not children yet compete too (with the
node's mean as their value), so nodes widen as they are visited. At the first node not yet expanded by the
search, the environment is put into that node's state (``restore_state`` of a cached ``clone_state`` where the
env has them, otherwise a reset and a replay of the node's action prefix), the policy proposes actions with
priors and the most probable one that is not yet a child is taken. From the new action the policy's top
action is followed until the episode ends or the depth limit. The finished episode is merged into the tree as a trajectory of role ``search`` (so new
nodes carry the source ``search``'s model) and its return is backed up along its path.

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

import numpy as np

from w2s_agents.config import check, option
from w2s_agents.messages import Message, agent_message, task_messages
from w2s_agents.tree import ROOT, TrajectoryTree, normalize_text
from w2s_agents.types import Source, Step, Trajectory

from .extract import context_messages

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


Policy = Callable[[Sequence[Message]], PolicyOutput]
"""Maps the conversation up to a state (``w2s_agents.messages`` format) to proposals for the next action."""


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


def puct_score(q: float, prior: float, parent_visits: int, visits: int, c_puct: float) -> float:
    """PUCT: ``q + c_puct * prior * sqrt(parent_visits) / (1 + visits)``."""
    return q + c_puct * prior * math.sqrt(parent_visits) / (1 + visits)


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


class _Episode:
    """Replays and plays one episode in the env, counting env steps."""

    def __init__(self, env: SearchEnv, task_id: str, seed: int) -> None:
        self.env, self.task_id, self.seed = env, task_id, seed
        self.steps = 0
        self.can_clone = callable(getattr(env, "clone_state", None)) and callable(
            getattr(env, "restore_state", None)
        )
        self.states: dict[int, Any] = {}  # node -> env state after reaching it (envs that clone)
        self.pending_states: list[Any] = []  # states after each step of the last rollout

    def reset(self) -> str:
        obs, _ = self.env.reset(seed=self.seed, options={"task": self.task_id})
        return obs

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        self.steps += 1
        return self.env.step(action)


def _outcome(info: dict, terminated: bool, truncated: bool, reward_sum: float) -> tuple[float, bool, str]:
    """(return in [0, 1], won, end) from the last step's info (``score``/``max_score``, else the rewards)."""
    score = info.get("score")
    if score is None:
        score = reward_sum
    max_score = info.get("max_score")
    if max_score:
        score = score / max_score
    ret = min(max(float(score), 0.0), 1.0)
    won = bool(info.get("won", False))
    if won:
        return ret, True, "won"
    if terminated:
        return ret, False, "lost"
    return ret, False, "truncated"


def expand_online(
    tree: TrajectoryTree,
    env: SearchEnv,
    policy: Policy,
    config: OnlineSearchConfig | None = None,
) -> OnlineResult:
    """Grow ``tree`` with episodes chosen by PUCT and played in ``env``; store the search statistics in it.

    The tree's ``mcts_visits`` / ``mcts_value`` afterwards hold this search's N and W (sum of backed-up
    returns) per node, so :func:`~w2s_agents.search.best_path` over ``node_values(tree, "mcts")`` gives the
    search's best path. Deterministic for a seed when the env and policy are.
    """
    cfg = config or OnlineSearchConfig()
    start_nodes = len(tree)
    n_vis: dict[int, int] = {}
    w_sum: dict[int, float] = {}
    priors: dict[
        int, dict[str, tuple[float, Proposal]]
    ] = {}  # expanded nodes: action key -> (prior, proposal)
    episode = _Episode(env, tree.task_id, cfg.seed)
    tokens = 0
    played: list[Trajectory] = []
    source = Source(model=cfg.model, role="search", sampler="online-puct", seed=cfg.seed)

    def ask(node_messages: list[Message]) -> dict[str, tuple[float, Proposal]]:
        nonlocal tokens
        out = policy(node_messages)
        tokens += int(out.tokens)
        return _normalised(out.proposals)

    def over_budget() -> bool:
        return (cfg.max_env_steps and episode.steps >= cfg.max_env_steps) or (
            cfg.max_tokens and tokens >= cfg.max_tokens
        )

    it = 0
    while it < cfg.iterations and not over_budget():
        it += 1
        # -- select: descend by PUCT until a node not expanded yet, or a new action wins at an expanded one
        node = ROOT
        chosen: Proposal | None = None
        while node in priors and not _ended(tree, node) and tree.depth(node) < cfg.max_depth:
            child, chosen = _select(tree, node, priors[node], n_vis, w_sum, cfg)
            if child is None:
                break
            node = child
        # -- reach the node's state
        path = tree.path(node)
        prefix = _reach(tree, episode, path)
        if prefix is None:  # the env ended on the way (a replay that does not reproduce): stop here
            logger.warning("%s: replay of node %d ended early; stopping the search", tree.task_id, node)
            break
        first_obs, steps, obs, done = prefix
        if done or _ended(tree, node) or len(path) - 1 >= cfg.max_depth:
            value = tree.mean_return(node) if tree.visits(node) else 0.0
            _backup(path, value, n_vis, w_sum)
            continue
        # -- expand: the most probable new action, then follow the policy's top action
        context = _messages(tree, path, obs)
        if node not in priors:
            priors[node] = ask(context)
        if not priors[node]:
            _backup(path, tree.mean_return(node), n_vis, w_sum)
            continue
        if chosen is None:  # first expansion: the most probable action that is not a child yet
            existing = {tree.action_key(c) for c in tree.children(node)}
            ranked = sorted(priors[node].items(), key=lambda kv: (-kv[1][0], kv[0]))
            chosen = next((p for k, (_, p) in ranked if k not in existing), ranked[0][1][1])
        new_steps, (info, terminated, truncated) = _rollout(
            episode, chosen, context, ask, cfg, len(path) - 1, over_budget
        )
        steps.extend(new_steps)
        ret, won, end = _outcome(info, terminated, truncated, sum(st.reward for st in steps))
        traj = Trajectory(
            task_id=tree.task_id,
            env_id=tree.env_id or "unknown",
            source=source,
            instruction=tree.instruction,
            initial_observation=first_obs,
            steps=tuple(steps),
            return_=ret,
            success=won,
            end=end,
        )
        leaf = tree.add(traj)
        if episode.can_clone:
            new_path = tree.path(leaf)[-len(new_steps) :]
            for n, state in zip(new_path, episode.pending_states, strict=True):
                if state is not None:
                    episode.states.setdefault(n, state)
        played.append(traj)
        _backup(tree.path(leaf), ret, n_vis, w_sum)

    visits = np.zeros(len(tree), dtype=np.int64)
    values = np.zeros(len(tree), dtype=np.float64)
    for n, v in n_vis.items():
        visits[n] = v
        values[n] = w_sum[n]
    tree.set_search_values(
        visits,
        values,
        algorithm="online-puct",
        iterations=it,
        c_puct=cfg.c_puct,
        seed=cfg.seed,
        model=cfg.model,
    )
    return OnlineResult(it, episode.steps, tokens, len(tree) - start_nodes, tuple(played))


def _ended(tree: TrajectoryTree, node: int) -> bool:
    """A trajectory won or lost at ``node``: the episode cannot go on from it."""
    t = tree.terminal(node)
    return bool(t.get("won") or t.get("lost"))


def _select(
    tree: TrajectoryTree,
    node: int,
    prior: dict[str, tuple[float, Proposal]],
    n_vis: dict[int, int],
    w_sum: dict[int, float],
    cfg: OnlineSearchConfig,
) -> tuple[int | None, Proposal | None]:
    """PUCT over ``node``'s children and the proposed actions that are not children yet.

    Returns ``(child, None)`` to descend, ``(None, proposal)`` to expand ``node`` with a new action, or
    ``(None, None)`` when there is nothing to choose. A child the policy did not propose has prior 0 and is
    chosen for its value; a new action's value is the node's own mean (first-play urgency). Ties go to the
    children in canonical order, then to new actions in key order.
    """
    children = tree.children(node)
    parent_n = max(n_vis.get(node, 0), 1)
    fpu = w_sum[node] / n_vis[node] if n_vis.get(node) else tree.mean_return(node)
    best_child: int | None = None
    best_new: Proposal | None = None
    best_score = -math.inf
    existing = set()
    for c in children:
        key = tree.action_key(c)
        existing.add(key)
        p = prior[key][0] if key in prior else 0.0
        n = n_vis.get(c, 0)
        q = w_sum[c] / n if n else tree.mean_return(c)
        score = puct_score(q, p, parent_n, n, cfg.c_puct)
        if score > best_score:
            best_child, best_new, best_score = c, None, score
    for key in sorted(prior):
        if key in existing:
            continue
        p, proposal = prior[key]
        score = puct_score(fpu, p, parent_n, 0, cfg.c_puct)
        if score > best_score:
            best_child, best_new, best_score = None, proposal, score
    return best_child, best_new


def _backup(path: Sequence[int], value: float, n_vis: dict[int, int], w_sum: dict[int, float]) -> None:
    for n in path:
        n_vis[n] = n_vis.get(n, 0) + 1
        w_sum[n] = w_sum.get(n, 0.0) + value


def _reach(
    tree: TrajectoryTree, episode: _Episode, path: list[int]
) -> tuple[str, list[Step], str, bool] | None:
    """Put the env into the state of ``path[-1]``: restore the deepest cached state on the path (when the env
    clones) and replay the actions after it, or reset and replay them all.

    Returns (first observation, steps so far, current observation, episode ended), or None when a replay
    ends before reaching the node.
    """
    start = 0
    if episode.can_clone:
        start = next((i for i in range(len(path) - 1, -1, -1) if path[i] in episode.states), -1)
    if start >= 0 and episode.can_clone and path[start] in episode.states:
        episode.env.restore_state(episode.states[path[start]])  # type: ignore[attr-defined]
        first = tree.observation(ROOT)
        obs = tree.observation(path[start])
        steps = [
            Step(action=tree.action(n), observation=tree.observation(n), thought=tree.thought(n))
            for n in path[1 : start + 1]
        ]
    else:
        start = 0
        first = obs = episode.reset()
        steps = []
        if episode.can_clone:
            episode.states[ROOT] = episode.env.clone_state()  # type: ignore[attr-defined]
    ended = False
    for i in range(start + 1, len(path)):
        n = path[i]
        obs, reward, terminated, truncated, _ = episode.step(tree.action(n))
        steps.append(
            Step(action=tree.action(n), observation=obs, thought=tree.thought(n), reward=float(reward))
        )
        ended = bool(terminated or truncated)
        if ended and i < len(path) - 1:
            return None
    return first, steps, obs, ended


def _messages(tree: TrajectoryTree, path: list[int], obs: str) -> list[Message]:
    """The conversation up to the current observation ``obs`` at ``path[-1]``."""
    if len(path) == 1:
        return task_messages(tree.instruction, obs)
    msgs = context_messages(tree, path[-1])
    msgs.append(agent_message(tree.action(path[-1]), tree.thought(path[-1])))
    msgs.append({"role": "user", "content": obs})
    return msgs


def _rollout(
    episode: _Episode,
    first: Proposal,
    context: list[Message],
    ask: Callable[[list[Message]], dict[str, tuple[float, Proposal]]],
    cfg: OnlineSearchConfig,
    depth: int,
    over_budget: Callable[[], bool],
) -> tuple[list[Step], tuple[dict, bool, bool]]:
    """Play ``first`` then the policy's most probable action until the episode ends; returns the new steps
    and (last info, terminated, truncated)."""
    steps: list[Step] = []
    states = episode.pending_states = []
    proposal = first
    msgs = list(context)
    while True:
        obs, reward, terminated, truncated, info = episode.step(proposal.action)
        states.append(episode.env.clone_state() if episode.can_clone and not terminated else None)  # type: ignore[attr-defined]
        steps.append(
            Step(action=proposal.action, observation=obs, thought=proposal.thought, reward=float(reward))
        )
        depth += 1
        if terminated or truncated:
            return steps, (info, terminated, truncated)
        if depth >= cfg.max_depth or over_budget():
            return steps, (info, False, True)
        msgs.append(agent_message(proposal.action, proposal.thought))
        msgs.append({"role": "user", "content": obs})
        ranked = ask(msgs)
        if not ranked:
            return steps, (info, False, True)
        proposal = min(ranked.items(), key=lambda kv: (-kv[1][0], kv[0]))[1][1]
