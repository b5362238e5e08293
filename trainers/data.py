"""Training rows: reading, validating and splitting SFT rows and preference pairs.

Rows are the Hugging Face conversational rows that :mod:`w2s_agents.search` writes (DESIGN section 4):

* SFT / MCTS-SFT: ``{"messages": [...], ...}``, a conversation whose assistant turns are the agent's;
* TreeDPO: ``{"prompt": [...], "chosen": [...], "rejected": [...], "chosen_sources", "rejected_sources", ...}``;
  the prompt ends on an observation (a user turn), chosen and rejected start with an agent turn.

Trajectory files (``w2s.trajectory/1``, e.g. expert demos) are accepted for SFT too: each episode becomes one
conversation rendered by :mod:`w2s_agents.messages`. A malformed row is refused with ``file:line``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from w2s_agents.errors import DataFormatError
from w2s_agents.messages import Message, episode_messages
from w2s_agents.seeding import derive_seed
from w2s_agents.types import Trajectory

__all__ = [
    "Row",
    "RowsInput",
    "data_fingerprint",
    "load_pairs",
    "load_sft_rows",
    "row_sources",
    "sft_row_from_trajectory",
    "split_by_task",
]

logger = logging.getLogger(__name__)

RowsInput = str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | Sequence[dict[str, Any]]
"""A data argument: a ``.jsonl`` path, several paths, or rows already in memory."""

_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Row:
    """One training row with where it came from (``file:line`` or ``rows[i]``) for error messages."""

    data: dict[str, Any]
    origin: str
    sources: tuple[str, ...] = field(default=())  # weak models behind the row (RAVEN weights)
    easy: bool = True  # the sources agree (see row_sources)


def _is_path_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, (str, os.PathLike)) for v in value)


def _read_jsonl(path: Path) -> Iterable[tuple[dict[str, Any], str]]:
    if not path.is_file():
        raise DataFormatError(f"data file not found: {path}")
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from None
            if not isinstance(obj, dict):
                raise DataFormatError(
                    f"{path}:{lineno}: a row must be a JSON object, got {type(obj).__name__}"
                )
            yield obj, f"{path}:{lineno}"


def _raw_rows(rows_or_path: RowsInput) -> list[tuple[dict[str, Any], str]]:
    if isinstance(rows_or_path, (str, os.PathLike)):
        return list(_read_jsonl(Path(rows_or_path)))
    if _is_path_list(rows_or_path):
        out: list[tuple[dict[str, Any], str]] = []
        for p in rows_or_path:
            out.extend(_read_jsonl(Path(p)))
        return out
    out = []
    for i, row in enumerate(rows_or_path):
        if not isinstance(row, dict):
            raise DataFormatError(f"rows[{i}]: a row must be a dict, got {type(row).__name__}")
        out.append((row, f"rows[{i}]"))
    return out


def _check_messages(value: Any, key: str, origin: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise DataFormatError(f"{origin}: '{key}' must be a non-empty list of messages")
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in _ROLES:
            raise DataFormatError(
                f"{origin}: '{key}[{j}]' must be {{'role': system|user|assistant, 'content': text}}, got {m!r:.80}"
            )
    return value


def _str_list(value: Any, key: str, origin: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataFormatError(f"{origin}: '{key}' must be a list of source names")
    return tuple(value)


def row_sources(data: dict[str, Any], origin: str = "row") -> tuple[tuple[str, ...], bool]:
    """The sources (weak models) behind a row and whether they agree.

    Pairs: the union of ``chosen_sources`` and ``rejected_sources``; the pair is easy when both branches
    have the same sources (every supervisor explored both, so the preference does not hinge on which
    model took which branch). SFT rows: ``sources``; easy when there is at most one. An explicit boolean
    ``easy`` field on the row takes precedence.
    """
    if "prompt" in data:
        chosen = _str_list(data.get("chosen_sources"), "chosen_sources", origin)
        rejected = _str_list(data.get("rejected_sources"), "rejected_sources", origin)
        sources = tuple(sorted(set(chosen) | set(rejected)))
        easy = set(chosen) == set(rejected)
    else:
        sources = tuple(sorted(set(_str_list(data.get("sources"), "sources", origin))))
        easy = len(sources) <= 1
    if isinstance(data.get("easy"), bool):
        easy = data["easy"]
    return sources, easy


def sft_row_from_trajectory(traj: Trajectory) -> dict[str, Any]:
    """An SFT row of a whole episode: the conversation ending on the agent's last action."""
    turns = [
        (s.thought, s.action, s.observation if i < len(traj.steps) - 1 else None)
        for i, s in enumerate(traj.steps)
    ]
    return {
        "messages": episode_messages(traj.instruction, traj.initial_observation, turns),
        "task_id": traj.task_id,
        "sources": [traj.source.model],
        "return": traj.return_,
    }


def load_sft_rows(rows_or_path: RowsInput, *, success_only: bool = True) -> list[Row]:
    """SFT rows from ``.jsonl`` files or memory, validated.

    A row is ``{"messages": [...]}`` with at least one assistant message and ending on one, or a trajectory
    record (``schema: w2s.trajectory/1``), which becomes the episode's conversation (only won episodes when
    ``success_only``; episodes without steps are left out).

    Raises:
        DataFormatError: a malformed row, with ``file:line`` (or ``rows[i]``) and what is wrong.
    """
    out: list[Row] = []
    skipped = 0
    for data, origin in _raw_rows(rows_or_path):
        if isinstance(data.get("schema"), str) and data["schema"].startswith("w2s.trajectory/"):
            try:
                traj = Trajectory.from_dict(data)
            except Exception as exc:
                raise DataFormatError(f"{origin}: invalid trajectory: {exc}") from None
            if not traj.steps or (success_only and not traj.success):
                skipped += 1
                continue
            data = sft_row_from_trajectory(traj)
        if "messages" not in data:
            raise DataFormatError(
                f"{origin}: an SFT row needs 'messages' (got keys {sorted(data)[:8]}); preference pairs "
                "train with dpo"
            )
        msgs = _check_messages(data["messages"], "messages", origin)
        if msgs[-1]["role"] != "assistant":
            raise DataFormatError(f"{origin}: 'messages' must end with an assistant (agent) turn")
        sources, easy = row_sources(data, origin)
        out.append(Row(data, origin, sources, easy))
    if skipped:
        logger.info("left out %d trajectories (not won or without steps)", skipped)
    if not out:
        raise DataFormatError("no SFT rows in the training data")
    return out


def load_pairs(pairs_or_path: RowsInput) -> list[Row]:
    """Preference pairs from ``.jsonl`` files or memory, validated.

    Raises:
        DataFormatError: a malformed pair, with ``file:line`` (or ``rows[i]``) and what is wrong.
    """
    out: list[Row] = []
    for data, origin in _raw_rows(pairs_or_path):
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in data]
        if missing:
            raise DataFormatError(f"{origin}: a preference pair needs 'prompt', 'chosen' and 'rejected'")
        prompt = _check_messages(data["prompt"], "prompt", origin)
        if prompt[-1]["role"] != "user":
            raise DataFormatError(f"{origin}: 'prompt' must end with a user turn (the observation acted on)")
        for key in ("chosen", "rejected"):
            msgs = _check_messages(data[key], key, origin)
            if msgs[0]["role"] != "assistant" or msgs[-1]["role"] != "assistant":
                raise DataFormatError(f"{origin}: '{key}' must start and end with an assistant (agent) turn")
        for key in ("ref_chosen_logp", "ref_rejected_logp"):
            if key in data and not isinstance(data[key], (int, float)):
                raise DataFormatError(f"{origin}: '{key}' must be a number")
        sources, easy = row_sources(data, origin)
        out.append(Row(data, origin, sources, easy))
    if not out:
        raise DataFormatError("no preference pairs in the training data")
    return out


def split_by_task(rows: Sequence[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Hold out about ``fraction`` of the tasks (``task_id``; rows without one count as their own task).

    The choice is a seeded hash of the task id, so it does not depend on the order of the rows. Returns
    ``(train, valid)``; ``valid`` is empty when ``fraction`` is 0, when fewer than two tasks exist, or when
    the hash holds out every task or none.
    """
    if fraction <= 0:
        return list(rows), []
    tasks = sorted({str(r.data.get("task_id", r.origin)) for r in rows})
    if len(tasks) < 2:
        return list(rows), []
    ranked = sorted(tasks, key=lambda t: derive_seed(seed, "valid-split", t))
    n_valid = min(len(tasks) - 1, max(1, round(fraction * len(tasks))))
    held = set(ranked[:n_valid])
    train = [r for r in rows if str(r.data.get("task_id", r.origin)) not in held]
    valid = [r for r in rows if str(r.data.get("task_id", r.origin)) in held]
    return train, valid


def data_fingerprint(rows: Sequence[Row]) -> str:
    """A hash of the rows' content (order included): a run resumes only on the data it started with."""
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps(r.data, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()[:16]
