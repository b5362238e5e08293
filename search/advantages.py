"""Advantages of the steps of a searched tree, and the policy-gradient rows they make.

Two definitions, chosen by :data:`AdvantageLevel` (equations and sign conventions also in docs/training.md):

* ``step`` (credit inside the tree). Every non-root node ``n`` is one step: the action taken on the observation
  its parent ``p`` reached. With ``Q`` a value array over the nodes (:func:`~.values.node_values`: ``mcts`` is
  the search value W/N, ``mean`` the mean final return of the trajectories through the node),

      V(p, o) = sum_{c in C(p, o)} visits(c) * Q(c) / sum_{c in C(p, o)} visits(c)
      A(n)    = Q(n) - V(parent(n), o(n))

  where ``C(p, o)`` are the children of ``p`` that acted on the same observation ``o`` as ``n`` (in a
  deterministic env all children of ``p``) and ``visits`` the data trajectories through each child, so ``V`` is
  the value of the state under the policies that produced the data. A node with no sibling has ``A = 0``; a node
  whose ``Q`` is unknown (NaN: the search never reached it) gets no advantage and makes no row.
* ``trajectory`` (GRPO, for comparison). The episodes of one task form a group; each episode's advantage is its
  return normalised in the group, ``A_e = (R_e - mean_g R) / (std_g R + eps)`` (population std, ``ddof=0``).
  A tree keeps only the episodes' paths, so an episode is the path from the root to the node where it ended
  (episodes ending at the same node are taken to share their mean return: exact in a deterministic env). A node
  is credited with the mean advantage of the episodes through it, which (the normalisation being linear) is
  ``(mean return through n - mean_g R) / (std_g R + eps)``.

Rows (:class:`PGRow`, one per non-root node with an advantage): the conversation up to the observation the step
acted on followed by the step's action as the last assistant turn, which alone carries the loss::

    {"messages": [system, user(task + first observation), assistant, user, ..., assistant(the step's action)],
     "advantage": 0.25, "level": "step", "task_id": "...", "node": 7, "q": 0.75, "v": 0.5, "visits": 3,
     "sources": ["weak-a"]}

and, when the tree's nodes kept recorded token ids (trees of trajectories recorded with ``agent.record_tokens``),
``"agent_tokens"``: one entry per assistant message as in an SFT row (:mod:`.rows`).

A row is refused with ``file:line`` (or ``rows[i]``) when its messages are malformed, it does not end on an
assistant turn, or its advantage is not a finite number.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from w2s_agents.errors import DataFormatError
from w2s_agents.messages import SYSTEM_PROMPT, Message, agent_message
from w2s_agents.tree import TrajectoryTree

from .extract import context_messages, context_tokens
from .rows import (
    AgentTokens,
    RowsInput,
    _agent_tokens,
    _messages,
    _names,
    _opt_int,
    _opt_num,
    _opt_str,
    _put,
    agent_tokens_or_none,
    describe,
    read_typed,
)
from .values import ValueKind, node_values

__all__ = [
    "AdvantageLevel",
    "PGRow",
    "group_normalise",
    "pg_rows",
    "read_pg_rows",
    "step_advantages",
    "trajectory_advantages",
]

AdvantageLevel = Literal["step", "trajectory"]
"""Step-level advantages from the tree's values, or trajectory-level returns normalised per task (GRPO)."""


def _sibling_groups(tree: TrajectoryTree, node: int) -> dict[Any, list[int]]:
    """The children of ``node`` grouped by the observation they acted on."""
    groups: dict[Any, list[int]] = {}
    for c in tree.children(node):
        groups.setdefault(tree.obs_key_before(c), []).append(c)
    return groups


def step_advantages(tree: TrajectoryTree, q: np.ndarray | Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """``(A, V)``: each node's advantage ``A(n) = Q(n) - V(parent(n))`` and the value ``V(parent(n))`` it is
    measured from (see the module docstring), NaN at the root and where ``Q(n)`` is unknown.

    Args:
        tree: a trajectory tree (statistics up to date).
        q: one value per node (NaN: unknown), e.g. ``node_values(tree, "mcts")``.

    Raises:
        ValueError: ``q`` does not have one entry per node.
    """
    q = np.asarray(q, dtype=np.float64)
    if q.shape != (len(tree),):
        raise ValueError(f"q needs one value per node ({len(tree)}), got shape {q.shape}")
    adv = np.full(len(tree), np.nan)
    base = np.full(len(tree), np.nan)
    for p in range(len(tree)):
        for group in _sibling_groups(tree, p).values():
            known = [c for c in group if math.isfinite(q[c]) and tree.visits(c) > 0]
            weight = sum(tree.visits(c) for c in known)
            if not weight:
                continue
            v = sum(tree.visits(c) * q[c] for c in known) / weight
            for c in known:
                adv[c], base[c] = q[c] - v, v
    return adv, base


def group_normalise(
    returns: Sequence[float], counts: Sequence[int] | None = None, eps: float = 1e-6
) -> np.ndarray:
    """``(R - mean R) / (std R + eps)`` of one group of episode returns (population std), each return standing
    for ``counts[i]`` episodes when ``counts`` is given.

    Raises:
        ValueError: no episodes, or ``counts`` of another length or with a negative count.
    """
    r = np.asarray(returns, dtype=np.float64)
    w = np.ones_like(r) if counts is None else np.asarray(counts, dtype=np.float64)
    if w.shape != r.shape or (w < 0).any() or w.sum() <= 0:
        raise ValueError(
            f"a group needs returns and matching non-negative counts, got {len(r)} and {w.shape}"
        )
    mean, std = _weighted_mean_std(r, w)
    return (r - mean) / (std + eps)


def _weighted_mean_std(r: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """The mean and population std of the values ``r`` weighted by ``w`` (a positive sum)."""
    mean = float((w * r).sum() / w.sum())
    return mean, math.sqrt(float((w * (r - mean) ** 2).sum() / w.sum()))


def trajectory_advantages(tree: TrajectoryTree, eps: float = 1e-6) -> np.ndarray:
    """Each node's mean group-normalised episode advantage (GRPO; the module docstring), NaN at the root and
    at nodes no episode went through. The group is the tree's episodes (one tree per task)."""
    visits, ret_sum, _ = tree.stat_arrays()
    ended = visits.copy()
    ended_ret = ret_sum.copy()
    for n in range(1, len(tree)):  # what went on to a child did not end at its parent
        p = tree.parent(n)
        ended[p] -= visits[n]
        ended_ret[p] -= ret_sum[n]
    ends = np.flatnonzero(ended > 0)
    adv = np.full(len(tree), np.nan)
    if not len(ends):
        return adv
    returns = ended_ret[ends] / ended[ends]
    mean, std = _weighted_mean_std(returns, ended[ends])
    with np.errstate(invalid="ignore", divide="ignore"):
        through = ret_sum / visits  # mean return of the episodes through each node
        adv[1:] = np.where(visits[1:] > 0, (through[1:] - mean) / (std + eps), np.nan)
    return adv


@dataclass(frozen=True)
class PGRow:
    """One policy-gradient row: a conversation ending on the action of one step, and that step's advantage."""

    messages: list[Message]
    """The context up to the observation acted on, then the step's action (the last, assistant turn)."""
    advantage: float
    """A(n): positive makes the action more likely under the trainer, negative less."""
    level: str | None = None
    """How the advantage was computed: step or trajectory."""
    task_id: str | None = None
    node: int | None = None
    """The tree node of the step."""
    q: float | None = None
    """Q(n) (step level)."""
    v: float | None = None
    """V(parent(n)) the advantage is measured from (step level)."""
    visits: int | None = None
    """Data trajectories through the node."""
    sources: tuple[str, ...] = ()
    """The models whose trajectories went through the node."""
    agent_tokens: AgentTokens | None = None
    """Recorded token ids of the assistant messages, one entry each in order (``{"ids", "tokenizer"}`` or
    None), or None when the row has none."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Fields this version does not know, written back as they were."""
    origin: str = field(default="", compare=False)
    """Where the row was read (``file:line``), for messages; not written."""

    _KNOWN = (
        "messages",
        "advantage",
        "level",
        "task_id",
        "node",
        "q",
        "v",
        "visits",
        "sources",
        "agent_tokens",
    )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], origin: str = "row") -> PGRow:
        """Parse and check a row (``origin`` names it in errors).

        Raises:
            DataFormatError: malformed messages, a conversation not ending on an agent turn, a missing or
                non-finite advantage, or a field of the wrong type.
        """
        msgs = _messages(d, "messages", origin)
        if msgs[-1]["role"] != "assistant":
            raise DataFormatError(f"{origin}: 'messages' must end with the step's action (an assistant turn)")
        adv = _opt_num(d, "advantage", origin)
        if adv is None or not math.isfinite(adv):
            raise DataFormatError(
                f"{origin}: a policy-gradient row needs a finite number 'advantage', got {adv!r}"
            )
        return cls(
            messages=msgs,
            advantage=float(adv),
            level=_opt_str(d, "level", origin),
            task_id=_opt_str(d, "task_id", origin),
            node=_opt_int(d, "node", origin),
            q=_opt_num(d, "q", origin),
            v=_opt_num(d, "v", origin),
            visits=_opt_int(d, "visits", origin),
            sources=_names(d, "sources", origin),
            agent_tokens=_agent_tokens(d, msgs, origin),
            extra={k: v for k, v in d.items() if k not in cls._KNOWN},
            origin=origin,
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON row (unset optional fields left out)."""
        out: dict[str, Any] = {"messages": self.messages, "advantage": self.advantage}
        for key in ("level", "task_id", "node", "q", "v", "visits"):
            _put(out, key, getattr(self, key))
        if self.sources:
            out["sources"] = list(self.sources)
        if self.agent_tokens is not None:
            out["agent_tokens"] = [dict(t) if t is not None else None for t in self.agent_tokens]
        out.update(self.extra)
        return out

    def supervision(self) -> tuple[tuple[str, ...], bool]:
        """The sources behind the row and whether they agree (at most one)."""
        sources = tuple(sorted(set(self.sources)))
        return sources, len(sources) <= 1


def pg_rows(
    tree: TrajectoryTree,
    *,
    level: AdvantageLevel = "step",
    value: ValueKind = "mcts",
    eps: float = 1e-6,
    min_abs_advantage: float = 0.0,
    system: str | None = SYSTEM_PROMPT,
) -> list[PGRow]:
    """The policy-gradient rows of a (searched) tree, one per non-root node with an advantage whose size is at
    least ``min_abs_advantage``, in node order.

    Args:
        tree: the tree; ``value="mcts"`` needs its search values (:func:`~.mcts.search_tree`).
        level: ``step`` (A = Q - V(parent) with Q by ``value``) or ``trajectory`` (GRPO, ``eps``).
        value: the value kind of Q at the step level (``mcts`` or ``mean``; any :data:`~.values.ValueKind`).
        min_abs_advantage: rows with a smaller ``|A|`` are left out (0 keeps zero advantages too).
        system: the system prompt of the conversations.

    Raises:
        ValueError: ``value="mcts"`` on a tree without search values, or an unknown level.
    """
    if level == "step":
        q = node_values(tree, value)
        adv, base = step_advantages(tree, q)
    elif level == "trajectory":
        adv, q, base = trajectory_advantages(tree, eps), None, None
    else:
        raise ValueError(f"unknown advantage level {level!r} (expected step or trajectory)")
    rows = []
    for n in range(1, len(tree)):
        a = float(adv[n])
        if not math.isfinite(a) or abs(a) < min_abs_advantage:
            continue
        messages = [*context_messages(tree, n, system=system), agent_message(tree.action(n), tree.thought(n))]
        rows.append(
            PGRow(
                messages=messages,
                advantage=a,
                level=level,
                task_id=tree.task_id,
                node=n,
                q=float(q[n]) if q is not None else None,
                v=float(base[n]) if base is not None else None,
                visits=tree.visits(n),
                sources=tuple(sorted(tree.sources(n))),
                agent_tokens=agent_tokens_or_none((*context_tokens(tree, n), tree.agent_tokens(n))),
            )
        )
    return rows


def read_pg_rows(source: RowsInput | Iterable[PGRow]) -> list[PGRow]:
    """Policy-gradient rows from ``.jsonl`` files or memory, checked.

    Raises:
        DataFormatError: a malformed row, with ``file:line`` (or ``rows[i]``) and what is wrong, or no rows.
    """
    out = read_typed(source, PGRow, "policy-gradient")
    if not out:
        raise DataFormatError(f"no policy-gradient rows in {describe(source)}")  # type: ignore[arg-type]
    return out
