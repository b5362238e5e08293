"""Training data from searched trees ("tree -> pairs"): best-path SFT rows and preference pairs.

The rows are the typed rows of :mod:`w2s_agents.search.rows` (written and read there, DESIGN section 4):

* :class:`~w2s_agents.search.rows.SftRow` (MCTS-SFT): the whole best path e* as one conversation ending on the
  agent's last action.
* :class:`~w2s_agents.search.rows.PairRow` (TreeDPO). At a divergence point (a node whose children acted on the same observation), two
  children whose values differ by at least the margin give a pair; the prompt is the conversation up to that
  observation, chosen/rejected are the better/worse child's action (``level="step"``) or that action followed
  by its greedy best continuation (``level="continuation"``; observations appear as user turns inside it).
* Expert-vs-failed pairs (the ETO scheme, for baselines and the ceiling): per task, an expert trajectory is
  chosen and a failed trajectory of the same task rejected, both whole (``level="trajectory"``).

Messages are built by :mod:`w2s_agents.messages`, the single renderer shared with trainers and the agent.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np

from w2s_agents.messages import SYSTEM_PROMPT, Message, agent_message, task_messages
from w2s_agents.tree import ROOT, TrajectoryTree, normalize_text
from w2s_agents.types import Trajectory

from .mcts import SearchConfig
from .paths import PathChoice, PathReplayer, choose_path
from .rows import PairRow, SftRow, agent_tokens_or_none, pair_agent_tokens, step_agent_tokens
from .values import best_path

__all__ = [
    "best_path_row",
    "context_messages",
    "context_tokens",
    "continuation_messages",
    "expert_failure_pairs",
    "path_row",
    "tree_pairs",
    "tree_rows",
]


def context_messages(tree: TrajectoryTree, node: int, *, system: str | None = SYSTEM_PROMPT) -> list[Message]:
    """The conversation up to the observation ``node``'s action was chosen on (that action excluded).

    User turns are the observations each action on the path acted on; assistant turns the path's actions.
    """
    if node == ROOT:
        raise ValueError("the root has no action; ask for the context of one of its children")
    path = tree.path(node)[1:]
    out = task_messages(tree.instruction, tree.observation_before(path[0]), system=system)
    for prev, cur in pairwise(path):
        out.append(agent_message(tree.action(prev), tree.thought(prev)))
        out.append({"role": "user", "content": tree.observation_before(cur)})
    return out


def context_tokens(tree: TrajectoryTree, node: int) -> tuple[dict[str, Any] | None, ...]:
    """The recorded token ids (``{"ids", "tokenizer"}`` or None) of the assistant turns of
    :func:`context_messages` ``(tree, node)``: the nodes on the path above ``node``."""
    if node == ROOT:
        raise ValueError("the root has no action; ask for the context of one of its children")
    return tuple(tree.agent_tokens(n) for n in tree.path(node)[1:-1])


def continuation_messages(tree: TrajectoryTree, nodes: Sequence[int]) -> list[Message]:
    """Assistant turns of ``nodes`` (a downward path) with the observations between them as user turns."""
    out: list[Message] = []
    for i, n in enumerate(nodes):
        if i:
            out.append({"role": "user", "content": tree.observation_before(n)})
        out.append(agent_message(tree.action(n), tree.thought(n)))
    return out


def _sources(tree: TrajectoryTree, node: int) -> tuple[str, ...]:
    return tuple(sorted(tree.sources(node)))


def best_path_row(
    tree: TrajectoryTree,
    values: np.ndarray,
    *,
    min_return: float = 0.0,
    system: str | None = SYSTEM_PROMPT,
    path: Sequence[int] | None = None,
) -> SftRow | None:
    """The SFT row of the tree's best path (greedy by ``values``, or ``path``: tree nodes from the root down),
    or None when the path has no step or the mean return at its leaf is below ``min_return``."""
    path = list(path) if path is not None else best_path(tree, values)
    if len(path) < 2:
        return None
    leaf = path[-1]
    ret = tree.mean_return(leaf)
    if ret < min_return:
        return None
    messages = context_messages(tree, path[1], system=system) + continuation_messages(tree, path[1:])
    tokens = agent_tokens_or_none(tree.agent_tokens(n) for n in path[1:])
    return SftRow(
        messages=messages,
        task_id=tree.task_id,
        node=leaf,
        value=float(values[leaf]),
        return_=ret,
        sources=_sources(tree, leaf),
        steps=len(path) - 1,
        agent_tokens=tokens,
    )


def path_row(
    tree: TrajectoryTree,
    choice: PathChoice,
    values: np.ndarray,
    *,
    min_return: float = 0.0,
    system: str | None = SYSTEM_PROMPT,
) -> SftRow | None:
    """The SFT row of a chosen path (:func:`~w2s_agents.search.paths.choose_path`): a tree path's row as
    :func:`best_path_row` makes it, or the replayed episode of a shortened path (its texts are the env's; the
    row also holds ``path``, how it was found, and ``path_nodes``, its tree nodes); None when the path has no
    step or its return is below ``min_return``."""
    if choice.trajectory is None:
        return best_path_row(tree, values, min_return=min_return, system=system, path=choice.nodes)
    traj = choice.trajectory
    if not traj.steps or traj.return_ < min_return:
        return None
    leaf = choice.nodes[-1]
    value = float(values[leaf])
    row = SftRow.from_trajectory(traj, system=system)
    return SftRow(
        messages=row.messages,
        task_id=tree.task_id,
        node=leaf,
        value=value if value == value else None,
        return_=traj.return_,
        sources=_sources(tree, leaf),
        steps=len(traj.steps),
        extra={"path": choice.kind, "path_nodes": list(choice.nodes)},
    )


def tree_pairs(
    tree: TrajectoryTree,
    values: np.ndarray | Sequence[float],
    *,
    margin: float = 0.1,
    per_node: int = 4,
    step: bool = True,
    continuation: bool = True,
    system: str | None = SYSTEM_PROMPT,
) -> list[PairRow]:
    """TreeDPO pairs at every divergence point of ``tree``.

    Children of a node are compared only when they acted on the same observation (same observation key).
    Where the nodes kept recorded token ids (:meth:`~w2s_agents.tree.TrajectoryTree.agent_tokens`), the rows
    carry them (``agent_tokens``: prompt, chosen and rejected).
    Among those with known values, every (better, worse) pair with ``value gap >= margin`` is a candidate;
    the ``per_node`` candidates of largest gap are kept (ties: the better child first in canonical order,
    then the worse). Each kept pair gives a step-level row and/or a continuation-level row. Rows come in
    canonical node order and never repeat: distinct (node, observation, chosen, rejected) give distinct
    conversations, and a continuation row that would equal its step row (both children end the path) is
    left out.
    """
    vals = values.tolist() if isinstance(values, np.ndarray) else list(values)
    off = tree.child_arrays()[0].tolist()
    rows: list[PairRow] = []
    for node in tree.canonical_order():
        if off[node + 1] - off[node] < 2:
            continue
        groups: dict[object, list[int]] = {}
        for c in tree.children(node):
            if vals[c] == vals[c]:  # not NaN
                groups.setdefault(tree.obs_key_before(c), []).append(c)
        for group in groups.values():
            if len(group) < 2:
                continue
            candidates = []
            for i, a in enumerate(group):
                for j, b in enumerate(group):
                    gap = vals[a] - vals[b]
                    if gap >= margin and gap > 0:
                        candidates.append((-gap, i, j, a, b))
            candidates.sort()
            prompt: list[Message] | None = None
            prompt_tokens: tuple[dict[str, Any] | None, ...] = ()
            for neg_gap, _, _, good, bad in candidates[:per_node]:
                if prompt is None:
                    prompt = context_messages(tree, good, system=system)
                    prompt_tokens = context_tokens(tree, good)
                meta = {
                    "task_id": tree.task_id,
                    "node": node,
                    "chosen_node": good,
                    "rejected_node": bad,
                    "chosen_value": float(vals[good]),
                    "rejected_value": float(vals[bad]),
                    "value_gap": -neg_gap,
                    "chosen_sources": _sources(tree, good),
                    "rejected_sources": _sources(tree, bad),
                }
                if step:
                    chosen = [agent_message(tree.action(good), tree.thought(good))]
                    rejected = [agent_message(tree.action(bad), tree.thought(bad))]
                    tokens = pair_agent_tokens(
                        prompt_tokens, [tree.agent_tokens(good)], [tree.agent_tokens(bad)]
                    )
                    rows.append(PairRow(prompt, chosen, rejected, "step", **meta, agent_tokens=tokens))
                if continuation:
                    good_path, bad_path = best_path(tree, vals, good), best_path(tree, vals, bad)
                    if step and len(good_path) == 1 and len(bad_path) == 1:
                        continue  # the same conversation as the step row
                    tokens = pair_agent_tokens(
                        prompt_tokens,
                        [tree.agent_tokens(n) for n in good_path],
                        [tree.agent_tokens(n) for n in bad_path],
                    )
                    rows.append(
                        PairRow(
                            prompt,
                            continuation_messages(tree, good_path),
                            continuation_messages(tree, bad_path),
                            "continuation",
                            **meta,
                            agent_tokens=tokens,
                        )
                    )
    return rows


def _trajectory_turns(traj: Trajectory) -> list[Message]:
    out: list[Message] = []
    for i, step in enumerate(traj.steps):
        if i:
            out.append({"role": "user", "content": traj.steps[i - 1].observation})
        out.append(agent_message(step.action, step.thought))
    return out


def expert_failure_pairs(
    trajectories: Iterable[Trajectory],
    *,
    chosen_roles: Sequence[str] = ("expert",),
    margin: float = 0.1,
    per_task: int = 4,
    system: str | None = SYSTEM_PROMPT,
) -> list[PairRow]:
    """Trajectory-level pairs in the ETO scheme: an expert trajectory chosen, a failed one rejected.

    Per task the chosen trajectory is the highest-return one whose role is in ``chosen_roles`` (ties: the
    smallest episode key); rejected are the task's failed trajectories (not won) of any other role whose
    return is at least ``margin`` lower and whose first observation is the same (normalised), lowest return
    first, at most ``per_task`` (ties: smallest episode key). Tasks without such trajectories give no pair.
    """
    by_task: dict[str, list[Trajectory]] = {}
    for t in trajectories:
        by_task.setdefault(t.task_id, []).append(t)
    rows: list[PairRow] = []
    seen: set[str] = set()
    for task_id in sorted(by_task):
        trajs = by_task[task_id]
        experts = [t for t in trajs if t.source.role in chosen_roles and t.steps]
        if not experts:
            continue
        best = min(experts, key=lambda t: (-t.return_, t.key))
        first = normalize_text(best.initial_observation)
        failed = [
            t
            for t in trajs
            if t.source.role not in chosen_roles
            and not t.success
            and t.steps
            and best.return_ - t.return_ >= margin
            and normalize_text(t.initial_observation) == first
        ]
        failed.sort(key=lambda t: (t.return_, t.key))
        prompt = task_messages(best.instruction, best.initial_observation, system=system)
        chosen = _trajectory_turns(best)
        for bad in failed[:per_task]:
            rejected = _trajectory_turns(bad)
            key = json.dumps([prompt, chosen, rejected], ensure_ascii=False)
            if key in seen:
                continue
            seen.add(key)
            rows.append(
                PairRow(
                    prompt,
                    chosen,
                    rejected,
                    "trajectory",
                    task_id=task_id,
                    node=ROOT,
                    chosen_node=-1,
                    rejected_node=-1,
                    chosen_value=best.return_,
                    rejected_value=bad.return_,
                    value_gap=best.return_ - bad.return_,
                    chosen_sources=(best.source.model,),
                    rejected_sources=(bad.source.model,),
                    agent_tokens=pair_agent_tokens(
                        [], map(step_agent_tokens, best.steps), map(step_agent_tokens, bad.steps)
                    ),
                )
            )
    return rows


@dataclass(frozen=True)
class TreeRows:
    """The training data of one searched tree."""

    choice: PathChoice
    """Its best path and how it was found."""
    row: SftRow | None
    """The best path's SFT row (None: no step, or below ``sft_min_value``)."""
    pairs: list[PairRow]
    """The TreeDPO pairs at its divergence points."""


def tree_rows(
    tree: TrajectoryTree,
    values: np.ndarray,
    config: SearchConfig,
    *,
    replay: PathReplayer | None,
    system: str | None = SYSTEM_PROMPT,
) -> TreeRows:
    """The best-path SFT row and the TreeDPO pairs of a searched ``tree`` valued by ``values``, as ``config``
    says (``paths``, ``sft_min_value``, ``margin``, ``pairs_per_node``, pair levels). Shortened best paths are
    taken only with a ``replay`` (:func:`~w2s_agents.search.paths.env_replayer`); without one the best path is
    the greedy tree path."""
    mode = config.paths if replay is not None else "tree"
    choice = choose_path(tree, best_path(tree, values), mode=mode, replay=replay)
    row = path_row(tree, choice, values, min_return=config.sft_min_value, system=system)
    pairs = tree_pairs(
        tree,
        values,
        margin=config.margin,
        per_node=config.pairs_per_node,
        step=config.step_pairs,
        continuation=config.continuation_pairs,
        system=system,
    )
    return TreeRows(choice, row, pairs)
