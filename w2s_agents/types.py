"""The trajectory data model: what an episode of an agent in a text environment leaves behind.

A :class:`Trajectory` is one episode: the task, who acted (:class:`Source`), the instruction and first
observation, the :class:`Step` sequence and the outcome. It is persisted as one JSON object per line
(``w2s_agents.store``) in the versioned format ``w2s.trajectory/1`` described in DESIGN section 4::

    {"schema": "w2s.trajectory/1", "task_id": "tw-simple/train/0", "env_id": "w2s/TextWorld-v0",
     "source": {"model": "weak-sft", "role": "weak", "sampler": "t0.7-p0.95", "temperature": 0.7,
                "top_p": 0.95, "seed": 3},
     "instruction": "...", "initial_observation": "...", "initial_state_key": "02d06bce150280b8",
     "steps": [{"observation": "...", "thought": "...", "action": "open door", "reward": 0.0, "score": 0.0,
                "admissible": ["open door", "go north"], "tokens_in": 312, "tokens_out": 9,
                "latency_s": 0.021, "state_key": "586f182833e8469e"}],
     "return": 0.0, "success": false, "end": "truncated"}

``initial_state_key`` and a step's ``state_key`` identify the game state reached (the env's
``info["state_key"]``, DESIGN section 7): equal keys within one task mean the same state, whatever the path to
it. Both are optional: written only when the env reported a key, absent in older files and for envs that
cannot tell.

A step may also carry the tokens of the agent's answer as its model produced them (``token_ids``, the
model's ``logprobs`` of them, and ``tokenizer``, the fingerprint of the tokenizer the ids belong to; see
:func:`w2s_agents.tokens.tokenizer_fingerprint`), recorded with ``agent.record_tokens``. A record with such
steps is written as ``w2s.trajectory/2`` (:data:`TOKENS_SCHEMA`), every other as ``w2s.trajectory/1``, so
files without token ids stay readable by readers that know only version 1; this version reads both.

:class:`EpisodeState` is what an agent sees of a live episode: the task, the turns so far and the commands
admissible now.

``Step.observation`` is the observation *after* the step's action; the observation an action was chosen on is
the previous step's observation (or ``initial_observation`` for the first step).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

__all__ = [
    "END_REASONS",
    "ROLES",
    "TOKENS_SCHEMA",
    "TRAJECTORY_SCHEMA",
    "TRAJECTORY_SCHEMAS",
    "EndReason",
    "EpisodeKey",
    "EpisodeState",
    "Role",
    "Source",
    "Step",
    "Trajectory",
]

TRAJECTORY_SCHEMA = "w2s.trajectory/1"
"""Schema tag of a trajectory record whose steps carry no token ids."""

TOKENS_SCHEMA = "w2s.trajectory/2"
"""Schema tag of a record whose steps carry token ids (version 1 plus the optional step fields ``token_ids``,
``logprobs`` and ``tokenizer``)."""

TRAJECTORY_SCHEMAS: tuple[str, ...] = (TRAJECTORY_SCHEMA, TOKENS_SCHEMA)
"""The schema tags this version reads; readers reject any other value."""

_TOKEN_FIELDS = ("token_ids", "logprobs", "tokenizer")

Role = Literal["weak", "strong", "expert", "search"]
ROLES: tuple[str, ...] = get_args(Role)

EndReason = Literal["won", "lost", "truncated", "error"]
END_REASONS: tuple[str, ...] = get_args(EndReason)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_key(x: Any) -> bool:
    return x is None or (isinstance(x, str) and x != "")


@dataclass(frozen=True)
class Source:
    """Who produced a trajectory and how."""

    model: str
    """Model name or local path of the acting agent (``"expert"`` for an env's walkthrough)."""
    role: Role
    """Part the agent plays: ``weak`` explorer, ``strong`` learner, ``expert`` demonstrator, ``search`` expansion."""
    sampler: str = "default"
    """Name of the sampling setting (one branch-width slot of exploration), e.g. ``"t0.7-p0.95"``."""
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    """Seed of the episode; together with task and sampler it identifies the episode (:class:`EpisodeKey`)."""

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("source.model must be a non-empty string")
        if self.role not in ROLES:
            raise ValueError(f"source.role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if not isinstance(self.sampler, str) or not self.sampler:
            raise ValueError("source.sampler must be a non-empty string")
        for name in ("temperature", "top_p"):
            v = getattr(self, name)
            if v is not None and not (_is_number(v) and v >= 0):
                raise ValueError(f"source.{name} must be a non-negative number or null, got {v!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"source.seed must be an integer or null, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready mapping; optional fields that are unset are left out."""
        d: dict[str, Any] = {"model": self.model, "role": self.role, "sampler": self.sampler}
        for name in ("temperature", "top_p", "seed"):
            v = getattr(self, name)
            if v is not None:
                d[name] = v
        return d


@dataclass(frozen=True)
class Step:
    """One action of the agent and what the environment answered."""

    action: str
    """The command sent to the environment (as sent; tree merging normalises it)."""
    observation: str
    """The environment's text after the action."""
    reward: float = 0.0
    """Change of normalised score caused by the action."""
    score: float = 0.0
    """Normalised score after the action, in [0, 1] for well-behaved envs."""
    thought: str = ""
    """The agent's reasoning before the action (ReAct ``Thought:``), empty when none."""
    admissible: tuple[str, ...] | None = None
    """Commands the env accepted in the state the action was chosen in, when the env knows them."""
    tokens_in: int = 0
    """Prompt tokens of the model call that chose the action (0 for experts and replays)."""
    tokens_out: int = 0
    """Generated (or scored) tokens of that call."""
    latency_s: float = 0.0
    """Wall time of choosing the action, in seconds."""
    state_key: str | None = None
    """Identity of the state the action led to (the env's ``info["state_key"]``), None when unknown."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Free-form JSON metadata (e.g. a raw model output that could not be parsed)."""
    token_ids: tuple[int, ...] | None = None
    """The agent's answer as its model produced it (generate mode: the sampled ids; choose mode: the ids of the
    chosen command as the model scored it), after the chat template's generation prompt, through the
    end-of-turn token when one ended it; None when not recorded."""
    logprobs: tuple[float, ...] | None = None
    """The model's log-probability of each of ``token_ids`` (not the sampler's), None when not recorded."""
    tokenizer: str | None = None
    """Fingerprint of the tokenizer ``token_ids`` belong to (set exactly when ``token_ids`` is)."""

    def __post_init__(self) -> None:
        for name in ("action", "observation", "thought"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"step.{name} must be a string, got {type(getattr(self, name)).__name__}")
        for name in ("reward", "score", "latency_s"):
            if not _is_number(getattr(self, name)):
                raise ValueError(f"step.{name} must be a finite number, got {getattr(self, name)!r}")
        for name in ("tokens_in", "tokens_out"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"step.{name} must be a non-negative integer, got {v!r}")
        if self.admissible is not None:
            if isinstance(self.admissible, str) or not isinstance(self.admissible, Sequence):
                raise ValueError("step.admissible must be a list of strings or null")
            if not isinstance(self.admissible, tuple):
                object.__setattr__(self, "admissible", tuple(self.admissible))
            if not all(isinstance(a, str) for a in self.admissible):
                raise ValueError("step.admissible must be a list of strings or null")
        if not _is_key(self.state_key):
            raise ValueError(f"step.state_key must be a non-empty string or null, got {self.state_key!r}")
        if not isinstance(self.extra, Mapping):
            raise ValueError("step.extra must be a mapping")
        self._check_tokens()

    def _check_tokens(self) -> None:
        ids, logprobs = self.token_ids, self.logprobs
        if ids is not None:
            if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) or not ids:
                raise ValueError("step.token_ids must be a non-empty list of token ids or null")
            if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
                raise ValueError("step.token_ids must hold non-negative integers")
            object.__setattr__(self, "token_ids", tuple(ids))
            if not isinstance(self.tokenizer, str) or not self.tokenizer:
                raise ValueError("step.tokenizer must name the tokenizer of token_ids (a non-empty string)")
        elif self.tokenizer is not None or logprobs is not None:
            raise ValueError("step.tokenizer and step.logprobs need step.token_ids")
        if logprobs is not None:
            if isinstance(logprobs, (str, bytes)) or not isinstance(logprobs, Sequence):
                raise ValueError("step.logprobs must be a list of numbers or null")
            if not all(_is_number(x) for x in logprobs):
                raise ValueError("step.logprobs must hold finite numbers")
            if len(logprobs) != len(self.token_ids or ()):
                raise ValueError(
                    f"step.logprobs has {len(logprobs)} numbers for {len(self.token_ids or ())} token ids"
                )
            object.__setattr__(self, "logprobs", tuple(float(x) for x in logprobs))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready mapping in the field order of the file format."""
        d: dict[str, Any] = {
            "observation": self.observation,
            "thought": self.thought,
            "action": self.action,
            "reward": self.reward,
            "score": self.score,
            "admissible": list(self.admissible) if self.admissible is not None else None,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "latency_s": self.latency_s,
        }
        if self.state_key is not None:
            d["state_key"] = self.state_key
        if self.extra:
            d["extra"] = dict(self.extra)
        if self.token_ids is not None:
            d["token_ids"] = list(self.token_ids)
            if self.logprobs is not None:
                d["logprobs"] = list(self.logprobs)
            d["tokenizer"] = self.tokenizer
        return d


@dataclass(frozen=True, order=True)
class EpisodeKey:
    """Identity of an episode: running the same key again must give the same trajectory.

    A store holds each key at most once; a resumed rollout runs only the keys its store lacks.
    """

    task_id: str
    model: str
    sampler: str
    seed: int | None

    def __str__(self) -> str:
        return f"{self.task_id}|{self.model}|{self.sampler}|{self.seed}"


@dataclass(frozen=True)
class Trajectory:
    """One episode of an agent on a task, successes and failures alike."""

    task_id: str
    """Identifier of the task (game, variation) within its env."""
    env_id: str
    """Registered env id, e.g. ``w2s/TextWorld-v0``."""
    source: Source
    instruction: str
    """The task's goal as given to the agent."""
    initial_observation: str
    """The env's first observation, before any action."""
    steps: tuple[Step, ...]
    return_: float
    """Final normalised score in [0, 1] (field ``return`` in files)."""
    success: bool
    """Whether the episode was won."""
    end: EndReason
    """How it ended: ``won``, ``lost``, ``truncated`` (step limit) or ``error`` (env or agent failure)."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Free-form JSON metadata."""
    initial_state_key: str | None = None
    """Identity of the first state (the reset's ``info["state_key"]``), None when unknown."""
    schema: str = TRAJECTORY_SCHEMA
    """The schema the record was read with; :meth:`to_dict` writes the one its steps need."""

    def __post_init__(self) -> None:
        if self.schema not in TRAJECTORY_SCHEMAS:
            raise ValueError(
                f"unsupported trajectory schema {self.schema!r} (this version reads "
                f"{' and '.join(map(repr, TRAJECTORY_SCHEMAS))})"
            )
        for name in ("task_id", "env_id"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v:
                raise ValueError(f"{name} must be a non-empty string, got {v!r}")
        for name in ("instruction", "initial_observation"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string")
        if not isinstance(self.source, Source):
            raise ValueError("source must be a Source")
        if not isinstance(self.steps, tuple):
            object.__setattr__(self, "steps", tuple(self.steps))
        if not all(isinstance(s, Step) for s in self.steps):
            raise ValueError("steps must be Step objects")
        if not _is_number(self.return_) or not 0.0 <= self.return_ <= 1.0:
            raise ValueError(f"return must be a number in [0, 1], got {self.return_!r}")
        if not isinstance(self.success, bool):
            raise ValueError(f"success must be true or false, got {self.success!r}")
        if self.end not in END_REASONS:
            raise ValueError(f"end must be one of {', '.join(END_REASONS)}, got {self.end!r}")
        if self.success and self.end != "won":
            raise ValueError(f"a successful trajectory must end 'won', not {self.end!r}")
        if not isinstance(self.extra, Mapping):
            raise ValueError("extra must be a mapping")
        if not _is_key(self.initial_state_key):
            raise ValueError(
                f"initial_state_key must be a non-empty string or null, got {self.initial_state_key!r}"
            )

    @property
    def key(self) -> EpisodeKey:
        """The episode's identity (task, model, sampler, seed)."""
        return EpisodeKey(self.task_id, self.source.model, self.source.sampler, self.source.seed)

    @property
    def num_steps(self) -> int:
        """Number of actions taken."""
        return len(self.steps)

    @property
    def has_token_ids(self) -> bool:
        """Whether a step carries the token ids of its answer (the record is then ``w2s.trajectory/2``)."""
        return any(s.token_ids is not None for s in self.steps)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready mapping in the file format (``return_`` written as ``return``)."""
        d: dict[str, Any] = {
            "schema": TOKENS_SCHEMA if self.has_token_ids else TRAJECTORY_SCHEMA,
            "task_id": self.task_id,
            "env_id": self.env_id,
            "source": self.source.to_dict(),
            "instruction": self.instruction,
            "initial_observation": self.initial_observation,
        }
        if self.initial_state_key is not None:
            d["initial_state_key"] = self.initial_state_key
        d |= {
            "steps": [s.to_dict() for s in self.steps],
            "return": self.return_,
            "success": self.success,
            "end": self.end,
        }
        if self.extra:
            d["extra"] = dict(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Trajectory:
        """Parse and validate a record of the file format.

        Raises:
            ValueError: the record lacks a required field, has an unknown one, an unsupported schema, or a
                value of the wrong type; the message names the field (``steps[3].reward``).
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"a trajectory record must be a JSON object, got {type(d).__name__}")
        schema = d.get("schema")
        if schema is None:
            raise ValueError("missing field 'schema'")
        if schema not in TRAJECTORY_SCHEMAS:
            raise ValueError(
                f"unsupported trajectory schema {schema!r} (this version reads "
                f"{' and '.join(map(repr, TRAJECTORY_SCHEMAS))})"
            )
        _check_fields(d, _TRAJ_REQUIRED, _TRAJ_OPTIONAL, "")
        src = d["source"]
        if not isinstance(src, Mapping):
            raise ValueError("source must be an object")
        _check_fields(src, ("model", "role"), ("sampler", "temperature", "top_p", "seed"), "source.")
        try:
            source = Source(**src)
        except (TypeError, ValueError) as exc:
            raise ValueError(str(exc)) from None
        raw_steps = d["steps"]
        if not isinstance(raw_steps, list):
            raise ValueError("steps must be a list")
        steps = []
        for i, s in enumerate(raw_steps):
            if not isinstance(s, Mapping):
                raise ValueError(f"steps[{i}] must be an object")
            if schema != TOKENS_SCHEMA and (name := next((n for n in _TOKEN_FIELDS if n in s), None)):
                raise ValueError(f"field 'steps[{i}].{name}' needs schema {TOKENS_SCHEMA!r}, not {schema!r}")
            optional = _STEP_OPTIONAL + (_TOKEN_FIELDS if schema == TOKENS_SCHEMA else ())
            _check_fields(s, _STEP_REQUIRED, optional, f"steps[{i}].")
            try:
                steps.append(Step(**s))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"steps[{i}]: {str(exc).removeprefix('step.')}") from None
        return cls(
            task_id=d["task_id"],
            env_id=d["env_id"],
            source=source,
            instruction=d["instruction"],
            initial_observation=d["initial_observation"],
            steps=tuple(steps),
            return_=d["return"],
            success=d["success"],
            end=d["end"],
            extra=d.get("extra", {}),
            initial_state_key=d.get("initial_state_key"),
            schema=schema,
        )


@dataclass(frozen=True)
class EpisodeState:
    """What the agent sees of a live episode: the task, the history so far and the current options."""

    instruction: str
    initial_observation: str
    turns: tuple[tuple[str, str, str], ...] = ()
    """``(thought, action, observation after the action)`` of every step so far, oldest first."""
    admissible: tuple[str, ...] | None = None
    """Commands the env accepts now, None when the env does not report them."""
    grammar: str | None = None
    """The env's command language (``TextEnv.command_grammar``), None when unknown."""

    @property
    def observation(self) -> str:
        """The current observation (what the next action acts on)."""
        return self.turns[-1][2] if self.turns else self.initial_observation

    @classmethod
    def from_trajectory(cls, traj: Trajectory, step: int, *, grammar: str | None = None) -> EpisodeState:
        """The state in which ``traj`` chose its action number ``step`` (0-based).

        Raises:
            IndexError: ``step`` is not an index of ``traj.steps``.
        """
        if not 0 <= step < len(traj.steps):
            raise IndexError(f"step {step} of a {len(traj.steps)}-step trajectory")
        turns = tuple((s.thought, s.action, s.observation) for s in traj.steps[:step])
        return cls(traj.instruction, traj.initial_observation, turns, traj.steps[step].admissible, grammar)


_TRAJ_REQUIRED = (
    "schema",
    "task_id",
    "env_id",
    "source",
    "instruction",
    "initial_observation",
    "steps",
    "return",
    "success",
    "end",
)
_TRAJ_OPTIONAL = ("extra", "initial_state_key")
_STEP_REQUIRED = ("observation", "action")
_STEP_OPTIONAL = (
    "thought",
    "reward",
    "score",
    "admissible",
    "tokens_in",
    "tokens_out",
    "latency_s",
    "state_key",
    "extra",
)


def _check_fields(
    d: Mapping[str, Any], required: Sequence[str], optional: Sequence[str], prefix: str
) -> None:
    for name in required:
        if name not in d:
            raise ValueError(f"missing field '{prefix}{name}'")
    allowed = set(required) | set(optional)
    for name in d:
        if name not in allowed:
            raise ValueError(f"unknown field '{prefix}{name}'")
