"""Training rows: the typed SFT rows and preference pairs that searches write and trainers read.

One writer (:func:`write_rows`) and one reader per kind (:func:`read_sft_rows`, :func:`read_pairs`) for the
JSON-lines files of DESIGN section 4, which Hugging Face ``datasets.load_dataset("json", ...)`` also reads:

* :class:`SftRow` (MCTS-SFT, SFT on demos): ``{"messages": [...], "task_id", "node", "value", "return",
  "sources", "steps", "agent_tokens"}``, a conversation ending on the agent's last action; ``agent_tokens``
  (rows of trajectories recorded with ``agent.record_tokens``, and best paths of trees built from them) holds,
  for each assistant message in order,
  ``{"ids": [...], "tokenizer": fingerprint}`` (the answer's token ids as the model produced them) or null;
* :class:`PairRow` (TreeDPO, expert-vs-failed): ``{"prompt": [...], "chosen": [...], "rejected": [...],
  "level", "task_id", "node", "chosen_node", "rejected_node", "chosen_value", "rejected_value", "value_gap",
  "chosen_sources", "rejected_sources", "agent_tokens"}``; the prompt ends on the observation acted on (a user
  turn), chosen and rejected start and end with an agent turn; ``agent_tokens`` (pairs of trees and
  trajectories with recorded ids) maps ``prompt``, ``chosen`` and ``rejected`` (each only when it has ids) to a
  list as an SFT row's, one entry per assistant message of that part.

Optional fields that are unset are not written; fields this version does not know (such as cached reference
log-probs, ``ref_chosen_logp``) are kept in ``extra`` and written back as they were. A malformed row is refused
with a :class:`~w2s_agents.errors.DataFormatError` naming ``file:line`` (or ``rows[i]``) and the field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from w2s_agents.atomic import atomic_write
from w2s_agents.errors import DataFormatError
from w2s_agents.messages import SYSTEM_PROMPT, Message, episode_messages
from w2s_agents.tokens import recorded_token_ids
from w2s_agents.types import Step, Trajectory

__all__ = [
    "PAIR_LEVELS",
    "PAIR_PARTS",
    "AgentTokens",
    "PairRow",
    "RowsInput",
    "SftRow",
    "agent_tokens_or_none",
    "describe",
    "iter_jsonl",
    "pair_agent_tokens",
    "read_pairs",
    "read_sft_rows",
    "read_typed",
    "step_agent_tokens",
    "unique_rows",
    "write_rows",
]

RowsInput = str | os.PathLike | Sequence[str | os.PathLike] | Sequence[Mapping[str, Any]]
"""A data argument: a ``.jsonl`` path, several paths, or rows already in memory (dicts or typed rows)."""

PAIR_LEVELS = ("step", "continuation", "trajectory")
"""What a pair's chosen and rejected sides hold: one action, an action and its best continuation, or a whole
episode (expert-vs-failed pairs)."""

PAIR_PARTS = ("prompt", "chosen", "rejected")
"""The parts of a preference pair, the keys of its ``agent_tokens``."""

_ROLES = ("system", "user", "assistant")
_T = TypeVar("_T")


# ------------------------------------------------------------------------------------------- field checks


def _messages(d: Mapping[str, Any], key: str, origin: str) -> list[Message]:
    value = d.get(key)
    if not isinstance(value, list) or not value:
        raise DataFormatError(f"{origin}: '{key}' must be a non-empty list of messages")
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in _ROLES:
            raise DataFormatError(
                f"{origin}: '{key}[{j}]' must be {{'role': system|user|assistant, 'content': text}}, got {m!r:.80}"
            )
    return value


def _opt_int(d: Mapping[str, Any], key: str, origin: str) -> int | None:
    v = d.get(key)
    if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
        raise DataFormatError(f"{origin}: field '{key}' must be an integer, got {v!r}")
    return v


def _opt_num(d: Mapping[str, Any], key: str, origin: str) -> float | None:
    v = d.get(key)
    if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)):
        raise DataFormatError(f"{origin}: field '{key}' must be a number, got {v!r}")
    return v


def _opt_str(d: Mapping[str, Any], key: str, origin: str) -> str | None:
    v = d.get(key)
    if v is not None and (not isinstance(v, str) or not v):
        raise DataFormatError(f"{origin}: field '{key}' must be a non-empty string, got {v!r}")
    return v


def _names(d: Mapping[str, Any], key: str, origin: str) -> tuple[str, ...]:
    v = d.get(key)
    if v is None:
        return ()
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise DataFormatError(f"{origin}: '{key}' must be a list of source names")
    return tuple(v)


AgentTokens = tuple[dict[str, Any] | None, ...]
"""Recorded token ids of a conversation's assistant messages, one entry each in order: ``{"ids": [...],
"tokenizer": fingerprint}`` or None."""


def _agent_tokens(d: Mapping[str, Any], messages: list[Message], origin: str) -> AgentTokens | None:
    """The checked ``agent_tokens`` field: one entry (``{"ids": [ints], "tokenizer": str}`` or null) per
    assistant message."""
    return _token_list(d.get("agent_tokens"), messages, origin, "agent_tokens")


def _token_list(v: Any, messages: list[Message], origin: str, name: str) -> AgentTokens | None:
    if v is None:
        return None
    turns = sum(1 for m in messages if m["role"] == "assistant")
    if not isinstance(v, list) or len(v) != turns:
        raise DataFormatError(
            f"{origin}: '{name}' must be a list with one entry per assistant message ({turns}), got "
            f"{len(v) if isinstance(v, list) else type(v).__name__}"
        )
    out: list[dict[str, Any] | None] = []
    for j, t in enumerate(v):
        if t is None:
            out.append(None)
            continue
        record = recorded_token_ids(t)
        if record is None:
            raise DataFormatError(
                f"{origin}: '{name}[{j}]' must be null or {{'ids': [token ids], 'tokenizer': fingerprint}}"
            )
        out.append({"ids": list(record[0]), "tokenizer": record[1]})
    return tuple(out)


def _pair_agent_tokens(
    d: Mapping[str, Any], parts: Mapping[str, list[Message]], origin: str
) -> dict[str, AgentTokens] | None:
    """The checked ``agent_tokens`` field of a pair: ``{part: list}`` for parts of :data:`PAIR_PARTS`."""
    v = d.get("agent_tokens")
    if v is None:
        return None
    if not isinstance(v, dict) or not set(v) <= set(PAIR_PARTS):
        raise DataFormatError(
            f"{origin}: a pair's 'agent_tokens' must map {', '.join(PAIR_PARTS)} to lists of recorded token ids, "
            f"got {sorted(v) if isinstance(v, dict) else type(v).__name__}"
        )
    out = {}
    for key in PAIR_PARTS:
        got = _token_list(v.get(key), parts[key], origin, f"agent_tokens.{key}")
        if got is not None and any(t is not None for t in got):
            out[key] = got
    return out or None


def agent_tokens_or_none(entries: Iterable[dict[str, Any] | None]) -> AgentTokens | None:
    """``entries`` (one per assistant message) as a row's ``agent_tokens``, or None when none holds ids: rows
    without recorded ids carry no such field."""
    out = tuple(entries)
    return out if any(t is not None for t in out) else None


def step_agent_tokens(step: Step) -> dict[str, Any] | None:
    """A trajectory step's recorded token ids as an ``agent_tokens`` entry, or None when it recorded none."""
    return {"ids": list(step.token_ids), "tokenizer": step.tokenizer} if step.token_ids is not None else None


def pair_agent_tokens(
    prompt: Iterable[dict[str, Any] | None],
    chosen: Iterable[dict[str, Any] | None],
    rejected: Iterable[dict[str, Any] | None],
) -> dict[str, AgentTokens] | None:
    """A pair's ``agent_tokens`` from the entries of each part's assistant messages: the parts with ids, or
    None when no part has any."""
    parts = {k: agent_tokens_or_none(v) for k, v in zip(PAIR_PARTS, (prompt, chosen, rejected), strict=True)}
    out = {k: v for k, v in parts.items() if v is not None}
    return out or None


def _put(out: dict[str, Any], key: str, value: Any) -> None:
    if value is not None:
        out[key] = value


# ------------------------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class SftRow:
    """One SFT row: a conversation whose assistant turns are the agent's, ending on its last action."""

    messages: list[Message]
    task_id: str | None = None
    node: int | None = None
    """The tree node the conversation ends at (a best path's leaf)."""
    value: float | None = None
    """The value of that node under the search's value kind."""
    return_: float | None = None
    """Mean final return at that node, or the episode's return (field ``return``)."""
    sources: tuple[str, ...] = ()
    """The models (weak supervisors) behind the row."""
    steps: int | None = None
    """Agent actions in the conversation."""
    agent_tokens: tuple[dict[str, Any] | None, ...] | None = None
    """Recorded token ids of the assistant messages, one entry each in order (``{"ids", "tokenizer"}`` or
    None), or None when the row has none."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Fields this version does not know, written back as they were."""
    origin: str = field(default="", compare=False)
    """Where the row was read (``file:line``), for messages; not written."""

    _KNOWN = ("messages", "task_id", "node", "value", "return", "sources", "steps", "agent_tokens")

    @classmethod
    def from_trajectory(cls, traj: Trajectory, *, system: str | None = SYSTEM_PROMPT) -> SftRow:
        """The SFT row of a whole episode: its conversation ending on the agent's last action.

        Raises:
            ValueError: the trajectory has no step.
        """
        if not traj.steps:
            raise ValueError(f"a trajectory of {traj.task_id} without steps gives no SFT row")
        last = len(traj.steps) - 1
        turns = [(s.thought, s.action, s.observation if i < last else None) for i, s in enumerate(traj.steps)]
        tokens = tuple(step_agent_tokens(s) for s in traj.steps) if traj.has_token_ids else None
        return cls(
            messages=episode_messages(traj.instruction, traj.initial_observation, turns, system=system),
            task_id=traj.task_id,
            return_=traj.return_,
            sources=(traj.source.model,),
            steps=len(traj.steps),
            agent_tokens=tokens,
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], origin: str = "row") -> SftRow:
        """Parse and check a row (``origin`` names it in errors).

        Raises:
            DataFormatError: no messages, a malformed message, a conversation not ending on an agent turn, or a
                field of the wrong type.
        """
        if "messages" not in d:
            raise DataFormatError(
                f"{origin}: an SFT row needs 'messages' (got keys {sorted(d)[:8]}); preference pairs train with dpo"
            )
        msgs = _messages(d, "messages", origin)
        if msgs[-1]["role"] != "assistant":
            raise DataFormatError(f"{origin}: 'messages' must end with an assistant (agent) turn")
        return cls(
            messages=msgs,
            task_id=_opt_str(d, "task_id", origin),
            node=_opt_int(d, "node", origin),
            value=_opt_num(d, "value", origin),
            return_=_opt_num(d, "return", origin),
            sources=_names(d, "sources", origin),
            steps=_opt_int(d, "steps", origin),
            agent_tokens=_agent_tokens(d, msgs, origin),
            extra={k: v for k, v in d.items() if k not in cls._KNOWN},
            origin=origin,
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON row (unset optional fields left out)."""
        out: dict[str, Any] = {"messages": self.messages}
        _put(out, "task_id", self.task_id)
        _put(out, "node", self.node)
        _put(out, "value", self.value)
        _put(out, "return", self.return_)
        if self.sources:
            out["sources"] = list(self.sources)
        _put(out, "steps", self.steps)
        if self.agent_tokens is not None:
            out["agent_tokens"] = [dict(t) if t is not None else None for t in self.agent_tokens]
        out.update(self.extra)
        return out

    def supervision(self) -> tuple[tuple[str, ...], bool]:
        """The sources behind the row and whether they agree (at most one; an explicit ``easy`` field wins)."""
        sources = tuple(sorted(set(self.sources)))
        easy = self.extra.get("easy")
        return sources, easy if isinstance(easy, bool) else len(sources) <= 1


@dataclass(frozen=True)
class PairRow:
    """One preference pair taken where branches diverge (or an expert episode against a failed one)."""

    prompt: list[Message]
    """The conversation up to the observation acted on (ends with a user turn)."""
    chosen: list[Message]
    rejected: list[Message]
    level: str = "step"
    """One of :data:`PAIR_LEVELS`."""
    task_id: str | None = None
    node: int | None = None
    """The divergence point (the node whose children differ)."""
    chosen_node: int | None = None
    rejected_node: int | None = None
    chosen_value: float | None = None
    rejected_value: float | None = None
    value_gap: float | None = None
    chosen_sources: tuple[str, ...] = ()
    rejected_sources: tuple[str, ...] = ()
    agent_tokens: Mapping[str, AgentTokens] | None = None
    """Recorded token ids of the assistant messages of each part (:data:`PAIR_PARTS`) that has any, as an SFT
    row's ``agent_tokens``; None when the pair has none."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Fields this version does not know (e.g. cached reference log-probs), written back as they were."""
    origin: str = field(default="", compare=False)
    """Where the row was read (``file:line``), for messages; not written."""

    _KNOWN = (
        "prompt",
        "chosen",
        "rejected",
        "level",
        "task_id",
        "node",
        "chosen_node",
        "rejected_node",
        "chosen_value",
        "rejected_value",
        "value_gap",
        "chosen_sources",
        "rejected_sources",
        "agent_tokens",
    )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], origin: str = "row") -> PairRow:
        """Parse and check a pair (``origin`` names it in errors).

        Raises:
            DataFormatError: a missing side, a prompt not ending on an observation, a side not starting and
                ending with an agent turn, or a field of the wrong type.
        """
        if any(k not in d for k in ("prompt", "chosen", "rejected")):
            raise DataFormatError(f"{origin}: a preference pair needs 'prompt', 'chosen' and 'rejected'")
        prompt = _messages(d, "prompt", origin)
        if prompt[-1]["role"] != "user":
            raise DataFormatError(f"{origin}: 'prompt' must end with a user turn (the observation acted on)")
        sides = {}
        for key in ("chosen", "rejected"):
            msgs = sides[key] = _messages(d, key, origin)
            if msgs[0]["role"] != "assistant" or msgs[-1]["role"] != "assistant":
                raise DataFormatError(f"{origin}: '{key}' must start and end with an assistant (agent) turn")
        level = d.get("level", "step")
        if level not in PAIR_LEVELS:
            raise DataFormatError(
                f"{origin}: field 'level' must be one of {', '.join(PAIR_LEVELS)}, got {level!r}"
            )
        for key in ("ref_chosen_logp", "ref_rejected_logp"):
            if key in d and (not isinstance(d[key], (int, float)) or isinstance(d[key], bool)):
                raise DataFormatError(f"{origin}: '{key}' must be a number")
        return cls(
            prompt=prompt,
            chosen=sides["chosen"],
            rejected=sides["rejected"],
            level=level,
            task_id=_opt_str(d, "task_id", origin),
            node=_opt_int(d, "node", origin),
            chosen_node=_opt_int(d, "chosen_node", origin),
            rejected_node=_opt_int(d, "rejected_node", origin),
            chosen_value=_opt_num(d, "chosen_value", origin),
            rejected_value=_opt_num(d, "rejected_value", origin),
            value_gap=_opt_num(d, "value_gap", origin),
            chosen_sources=_names(d, "chosen_sources", origin),
            rejected_sources=_names(d, "rejected_sources", origin),
            agent_tokens=_pair_agent_tokens(d, {"prompt": prompt, **sides}, origin),
            extra={k: v for k, v in d.items() if k not in cls._KNOWN},
            origin=origin,
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON row (unset optional fields left out)."""
        out: dict[str, Any] = {
            "prompt": self.prompt,
            "chosen": self.chosen,
            "rejected": self.rejected,
            "level": self.level,
        }
        for key in ("task_id", "node", "chosen_node", "rejected_node", "chosen_value", "rejected_value"):
            _put(out, key, getattr(self, key))
        _put(out, "value_gap", self.value_gap)
        out["chosen_sources"] = list(self.chosen_sources)
        out["rejected_sources"] = list(self.rejected_sources)
        if self.agent_tokens is not None:
            out["agent_tokens"] = {
                k: [dict(t) if t is not None else None for t in v] for k, v in self.agent_tokens.items()
            }
        out.update(self.extra)
        return out

    def supervision(self) -> tuple[tuple[str, ...], bool]:
        """The sources behind the pair (both sides) and whether they agree: every source explored both
        branches, so the preference does not hinge on which model took which (an explicit ``easy`` wins)."""
        sources = tuple(sorted(set(self.chosen_sources) | set(self.rejected_sources)))
        easy = self.extra.get("easy")
        if isinstance(easy, bool):
            return sources, easy
        return sources, set(self.chosen_sources) == set(self.rejected_sources)


Row = SftRow | PairRow


# ------------------------------------------------------------------------------------------- files


def iter_jsonl(path: str | os.PathLike[str], what: str = "data") -> Iterator[tuple[dict[str, Any], str]]:
    """The JSON objects of a JSON-lines file with their ``file:line`` (blank lines skipped).

    Raises:
        DataFormatError: the file is missing or unreadable, not UTF-8, a line is not JSON or not an object.
    """
    p = Path(path)
    try:
        fh = p.open(encoding="utf-8")
    except FileNotFoundError:
        raise DataFormatError(f"{what} file not found: {p}") from None
    except OSError as exc:
        raise DataFormatError(f"{p}: cannot read {what} file: {exc}") from None
    with fh:
        try:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataFormatError(f"{p}:{lineno}: invalid JSON: {exc.msg}") from None
                if not isinstance(obj, dict):
                    raise DataFormatError(
                        f"{p}:{lineno}: a {what} row must be a JSON object, got {type(obj).__name__}"
                    )
                yield obj, f"{p}:{lineno}"
        except UnicodeDecodeError as exc:
            raise DataFormatError(f"{p}: not UTF-8 text: {exc}") from None


def _is_paths(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, (str, os.PathLike)) for v in value)


def _raw(source: RowsInput, what: str) -> Iterator[tuple[Any, str]]:
    if isinstance(source, (str, os.PathLike)):
        yield from iter_jsonl(source, what)
    elif _is_paths(source):
        for p in source:
            yield from iter_jsonl(p, what)
    else:
        for i, row in enumerate(source):
            yield row, f"rows[{i}]"


def describe(source: RowsInput) -> str:
    """A data argument in words, for messages."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if _is_paths(source):
        return ", ".join(str(p) for p in source) or "no files"
    return "the rows given"


def read_sft_rows(source: RowsInput, *, success_only: bool = True) -> tuple[list[SftRow], int]:
    """SFT rows from ``.jsonl`` files or memory, checked.

    A row is an SFT row (dict or :class:`SftRow`) or a trajectory record (``schema: w2s.trajectory/1``, e.g.
    expert demos), which becomes the episode's conversation (:meth:`SftRow.from_trajectory`); only won
    episodes when ``success_only``, and never episodes without steps.

    Returns:
        The rows, and how many trajectories were left out.

    Raises:
        DataFormatError: a malformed row, with ``file:line`` (or ``rows[i]``) and what is wrong.
    """
    out: list[SftRow] = []
    skipped = 0
    for data, origin in _raw(source, "SFT"):
        if isinstance(data, SftRow):
            out.append(data)
            continue
        if not isinstance(data, Mapping):
            raise DataFormatError(f"{origin}: a row must be a dict, got {type(data).__name__}")
        schema = data.get("schema")
        if isinstance(schema, str) and schema.startswith("w2s.trajectory/"):
            try:
                traj = Trajectory.from_dict(data)
            except ValueError as exc:
                raise DataFormatError(f"{origin}: invalid trajectory ({schema}): {exc}") from None
            if not traj.steps or (success_only and not traj.success):
                skipped += 1
                continue
            out.append(replace(SftRow.from_trajectory(traj), origin=origin))
            continue
        out.append(SftRow.from_dict(data, origin))
    return out, skipped


def read_pairs(source: RowsInput) -> list[PairRow]:
    """Preference pairs from ``.jsonl`` files or memory, checked.

    Raises:
        DataFormatError: a malformed pair, with ``file:line`` (or ``rows[i]``) and what is wrong.
    """
    return read_typed(source, PairRow, "pairs")


def read_typed(source: RowsInput | Iterable[Any], row_type: type[_T], what: str) -> list[_T]:
    """Rows of one typed kind from ``.jsonl`` files or memory: rows already of ``row_type`` as they are, dicts
    parsed and checked by ``row_type.from_dict(d, origin)``; ``what`` names the kind in errors.

    Raises:
        DataFormatError: a row that is not a dict, or a malformed one, with ``file:line`` (or ``rows[i]``).
    """
    out: list[_T] = []
    for data, origin in _raw(source, what):  # type: ignore[arg-type]
        if isinstance(data, row_type):
            out.append(data)
        elif isinstance(data, Mapping):
            out.append(row_type.from_dict(data, origin))  # type: ignore[attr-defined]
        else:
            raise DataFormatError(f"{origin}: a row must be a dict, got {type(data).__name__}")
    return out


def _plain(row: Row | Mapping[str, Any]) -> Mapping[str, Any]:
    return row.to_dict() if isinstance(row, (SftRow, PairRow)) else row


def write_rows(rows: Iterable[Row | Mapping[str, Any]], path: str | os.PathLike[str]) -> int:
    """Write rows as JSON lines atomically (temporary file, then rename); returns the number written.

    Raises:
        ValueError: a row holds a NaN or infinite number (strict JSON readers reject them).
    """
    n = 0
    with atomic_write(path) as fh:
        for row in rows:
            fh.write(json.dumps(_plain(row), ensure_ascii=False, allow_nan=False) + "\n")
            n += 1
    return n


def _conversation_key(row: Row | Mapping[str, Any]) -> str:
    d = _plain(row)
    if "messages" in d:
        return json.dumps(d["messages"], ensure_ascii=False)
    return json.dumps([d["prompt"], d["chosen"], d["rejected"]], ensure_ascii=False)


def unique_rows(rows: Iterable[Row]) -> Iterator[Row]:
    """``rows`` without repeats of the same conversation (prompt/chosen/rejected, or messages), first kept."""
    seen: set[str] = set()
    for row in rows:
        key = _conversation_key(row)
        if key not in seen:
            seen.add(key)
            yield row
