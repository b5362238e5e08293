"""The text-environment contract shared by every w2s-agents env (DESIGN section 7).

:class:`TextEnv` is a ``gymnasium.Env[str, str]``. An engine subclass implements a handful of hooks
(``_load_task``, ``_engine_reset``, ``_engine_step`` and optionally ``_engine_snapshot`` /
``_engine_restore``); the base class turns what the engine reports into the contract:

* ``reset(seed=, options={"task": id})`` returns ``(observation, info)``;
* ``step(action)`` returns ``(observation, reward, terminated, truncated, info)`` where ``reward`` is the change
  of the normalised score (the first step also gets any score the task starts with, so an episode's return is
  exactly its final score, in [0, 1]), ``terminated`` is won or lost and ``truncated`` is the step limit;
* ``info`` always holds ``task_id``, ``won``, ``lost``, ``score`` (normalised, in [0, 1]), ``raw_score`` and
  ``max_score`` (the engine's own units), ``admissible_commands`` (a list, or ``None`` when not computed) and
  ``expert_plan`` (the expert's remaining commands, or ``None`` when unknown); ``reset`` adds ``instruction``;
* any action text is accepted: it is cleaned (:func:`clean_action`) before it reaches the engine, so empty,
  huge, non-ASCII or control-character input gets the game's own answer and costs a step, never an exception;
* ``command_grammar`` describes the command language for an agent's system instruction (empty when unknown);
* ``clone_state()`` / ``restore_state(state)`` save and restore everything the next steps depend on: exactly
  when the engine can snapshot itself, otherwise by resetting and replaying the action prefix;
* ``info["state_key"]`` (after ``reset`` and every ``step``) identifies the game state reached: a short string,
  equal for two visits of the same state (on one path or on different branches), or ``None`` when the env
  cannot tell. Engines provide it through the optional hook ``_engine_state_key(status)`` (the name is
  reserved; the default returns ``None``, so a plugin env without it reports ``None``); the constructor
  option ``state_key=False`` turns the computation off. A key compares states of one task; after
  ``restore_state`` the env is back in the saved state and so is its key (``EnvState.state_key``).
"""

from __future__ import annotations

import hashlib
import logging
import re
import unicodedata
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import gymnasium as gym
from gymnasium import spaces

from w2s_agents.errors import W2SError

__all__ = [
    "ACTION_CHARSET",
    "ACTION_MAX_CHARS",
    "OBSERVATION_CHARSET",
    "OBSERVATION_MAX_CHARS",
    "STATE_KEY_HEX_DIGITS",
    "EngineStatus",
    "EnvState",
    "TextEnv",
    "UnknownTaskError",
    "clean_action",
    "fit_observation",
    "hash_state",
]

logger = logging.getLogger(__name__)

ACTION_MAX_CHARS = 190
"""Longest command sent to an engine; Z-machine interpreters read at most ~198 bytes of input."""

ACTION_CHARSET = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "\\")
"""Characters of a command as the engine receives it: printable ASCII (what text-game parsers read) except the
backslash, on which the Z-machine interpreter under TextWorld crashes or hangs."""

OBSERVATION_MAX_CHARS = 65_536
"""Longest observation returned; engine text beyond it is cut (a room description is a few kB)."""


def _observation_charset() -> str:
    # Z-machine text arrives decoded from cp1252 and ScienceWorld's from Java strings of Latin text; the union
    # of cp1252 and Latin-1 covers both, typographic quotes and dashes included.
    chars = set(bytes(range(256)).decode("latin-1"))
    chars |= set(bytes(range(256)).decode("cp1252", errors="ignore"))
    return "".join(sorted(chars))


OBSERVATION_CHARSET = _observation_charset()
"""Characters an observation may contain; anything else is replaced by ``?`` (see :func:`fit_observation`)."""
_OBSERVATION_CHARS = frozenset(OBSERVATION_CHARSET)

_NOT_SENDABLE = re.compile(r"[^\x20-\x5b\x5d-\x7e]+")  # outside ACTION_CHARSET
_SPACES = re.compile(r" {2,}")


def clean_action(action: Any) -> str:
    """The command an engine receives for ``action``: printable ASCII, one line, at most
    :data:`ACTION_MAX_CHARS` characters.

    Accented letters lose their accents (``"clé"`` -> ``"cle"``), other non-ASCII characters, control
    characters (newlines, NUL, escapes) and backslashes become spaces, runs of spaces collapse, and text beyond
    the limit is cut.
    Never raises: ``bytes`` are decoded leniently and any other object is converted with ``str``.
    """
    if isinstance(action, bytes):
        action = action.decode("utf-8", errors="replace")
    elif not isinstance(action, str):
        action = str(action)
    if len(action) > 4 * ACTION_MAX_CHARS:  # do not normalise megabytes that will be cut anyway
        action = action[: 4 * ACTION_MAX_CHARS]
    if not action.isascii():
        action = unicodedata.normalize("NFKD", action).encode("ascii", "ignore").decode("ascii")
    text = _SPACES.sub(" ", _NOT_SENDABLE.sub(" ", action)).strip()
    return text[:ACTION_MAX_CHARS].rstrip()


STATE_KEY_HEX_DIGITS = 16
"""Length of a state key made by :func:`hash_state` (64 bits: collisions are negligible among the states of
one task)."""


def hash_state(*parts: bytes | str) -> str:
    """A state key: the first :data:`STATE_KEY_HEX_DIGITS` hex digits of the BLAKE2b hash of ``parts``
    (each length-prefixed, so ``("ab", "c")`` and ``("a", "bc")`` differ). Stable across processes."""
    h = hashlib.blake2b(digest_size=STATE_KEY_HEX_DIGITS // 2)
    for part in parts:
        data = part.encode("utf-8") if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def fit_observation(text: str) -> str:
    """``text`` made a member of the observation space: characters outside :data:`OBSERVATION_CHARSET`
    replaced by ``?`` and the length cut to :data:`OBSERVATION_MAX_CHARS`."""
    if len(text) > OBSERVATION_MAX_CHARS:
        text = text[:OBSERVATION_MAX_CHARS]
    if all(c in _OBSERVATION_CHARS for c in text):
        return text
    return "".join(c if c in _OBSERVATION_CHARS else "?" for c in text)


class UnknownTaskError(W2SError, KeyError):
    """A task id that the env does not know; the message lists valid ids (or how they are formed)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class EngineStatus:
    """What an engine reports after a reset or a step, in its own units."""

    observation: str
    """The engine's text answer (the first observation after a reset)."""
    raw_score: float
    """Score in the engine's units (may be negative for ScienceWorld)."""
    max_score: float
    """Score of a won game in the engine's units (positive)."""
    won: bool
    lost: bool
    admissible: tuple[str, ...] | None = None
    """Commands the engine accepts in the new state, ``None`` when not computed."""
    expert_plan: tuple[str, ...] | None = None
    """The expert's remaining commands from the new state, ``None`` when unknown."""
    state_key: str | None = None
    """Identity of the new state (``info["state_key"]``); engines leave it ``None``: :class:`TextEnv` fills it
    in from :meth:`TextEnv._engine_state_key`."""

    @property
    def score(self) -> float:
        """Normalised score in [0, 1]; a negative raw score counts as 0."""
        if self.max_score <= 0:
            return 1.0 if self.won else 0.0
        return min(1.0, max(0.0, self.raw_score / self.max_score))


@dataclass(frozen=True)
class EnvState:
    """A saved env state (from :meth:`TextEnv.clone_state`); restore it on an env of the same class.

    Restoring it any number of times gives the same continuation. ``engine`` is ``None`` where the engine
    has no exact snapshot; the state is then restored by resetting the task and replaying ``actions``, which
    is exact only for an engine whose reset is deterministic and whose state depends on the commands alone
    (not on the queries made between them); an engine that restores by replay must make it so (ScienceWorld
    fixes the JVM's identity hashes and replays its admissible-command listings).
    """

    env_class: str
    task_id: str
    actions: tuple[str, ...]
    """Commands sent since the reset (as sent to the engine, after cleaning)."""
    status: EngineStatus
    """The engine's report after the last action."""
    done: bool
    engine: Any = field(default=None, compare=False, repr=False)
    """Opaque engine snapshot, or ``None`` (restore by replay)."""

    @property
    def state_key(self) -> str | None:
        """The key of the saved state (``info["state_key"]`` when it was reached)."""
        return self.status.state_key


class TextEnv(gym.Env[str, str]):
    """Base class of the w2s text environments (see the module docstring for the contract).

    Args:
        task: task id used by a ``reset()`` without ``options["task"]`` (default: the env's default task).
        max_steps: step limit; the step that reaches it returns ``truncated=True``.
        render_mode: ``None``, ``"ansi"`` (``render()`` returns the last observation) or ``"human"`` (logs it).
        state_key: report ``info["state_key"]`` (computed by the engine's ``_engine_state_key``); with
            ``False`` the hook is never called and the key is ``None``.

    Subclasses set :attr:`env_id` and implement the ``_load_task`` / ``_engine_*`` hooks, ``task_ids`` and
    ``default_task``.
    """

    # render_fps is nominal (text is rendered once per step); gymnasium's checker expects it to be declared
    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["ansi", "human"], "render_fps": 1}
    env_id: ClassVar[str] = ""
    command_grammar: ClassVar[str] = ""
    """The command language in a few lines (verbs and argument patterns) for an agent's instructions; empty
    when the env does not describe it."""

    def __init__(
        self,
        task: str | None = None,
        *,
        max_steps: int = 100,
        render_mode: str | None = None,
        state_key: bool = True,
    ):
        if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1:
            raise W2SError(f"max_steps must be a positive integer, got {max_steps!r}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise W2SError(
                f"unknown render_mode {render_mode!r}; valid: {', '.join(self.metadata['render_modes'])}"
            )
        self.max_steps = max_steps
        self.render_mode = render_mode
        self.state_key = bool(state_key)
        self.observation_space = spaces.Text(
            max_length=OBSERVATION_MAX_CHARS, min_length=0, charset=OBSERVATION_CHARSET
        )
        self.action_space = spaces.Text(max_length=ACTION_MAX_CHARS, min_length=0, charset=ACTION_CHARSET)
        self._default_task = task
        self._task_id: str | None = None
        self._instruction = ""
        self._actions: list[str] = []
        self._status: EngineStatus | None = None
        self._done = False

    # ------------------------------------------------------------------------------ engine hooks

    @abstractmethod
    def _load_task(self, task_id: str) -> str:
        """Prepare the engine for ``task_id`` and return its instruction.

        Raises:
            UnknownTaskError: the id is not a task of this env.
        """

    @abstractmethod
    def _engine_reset(self) -> EngineStatus:
        """Start the loaded task from its beginning."""

    @abstractmethod
    def _engine_step(self, command: str) -> EngineStatus:
        """Send a cleaned command to the engine (``self._actions`` does not hold it yet)."""

    def _engine_snapshot(self) -> Any:
        """An exact snapshot of the engine, or ``None`` to restore by replay (the default)."""
        return None

    def _engine_restore(self, snapshot: Any) -> bool:
        """Put the engine back into ``snapshot`` (from :meth:`_engine_snapshot`, never ``None``); return
        ``False`` when this engine cannot apply it (the state is then restored by replay)."""
        raise NotImplementedError

    def _engine_state_key(self, status: EngineStatus) -> str | None:
        """Identity of the state the engine is in now, which ``status`` reports (optional hook).

        Called after every engine reset and step while :attr:`state_key` is on. Return a short string that is
        equal for two visits of the same game state, whatever the path and the number of moves to it, and
        differs for states whose continuations may differ (score included); :func:`hash_state` makes one.
        The default, ``None``, means the env cannot tell.
        """
        return None

    @abstractmethod
    def task_ids(self, split: str | None = None) -> list[str]:
        """Task ids this env knows without generating anything (``split``: ``train``, ``valid``, ``test``)."""

    @abstractmethod
    def default_task(self) -> str:
        """The task a ``reset()`` without a task option plays when none was given at construction."""

    def prepare(self, task_ids: Sequence[str], workers: int = 1, timeout_s: float | None = None) -> None:
        """Make ``task_ids`` ready to play, ``workers`` processes at a time where that helps (TextWorld
        generates and compiles their games); the default has nothing to prepare.

        ``timeout_s`` is the longest one task may take to prepare (``None``: the env's own default); an env
        that makes its tasks stops one that takes longer with a :class:`~w2s_agents.errors.W2SError`.

        Raises:
            UnknownTaskError: an id is not a task of this env.
        """

    # ------------------------------------------------------------------------------ gymnasium API

    @property
    def task_id(self) -> str | None:
        """The task of the current episode (``None`` before the first reset)."""
        return self._task_id

    @property
    def instruction(self) -> str:
        """The current task's goal as given to the agent."""
        return self._instruction

    @property
    def actions(self) -> tuple[str, ...]:
        """Commands sent since the reset (cleaned)."""
        return tuple(self._actions)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict]:
        """Start an episode of ``options["task"]`` (else the previous task, else the default task).

        Returns:
            ``(observation, info)``; ``info`` has the keys listed in the module docstring plus ``instruction``.

        Raises:
            UnknownTaskError: the task id is not one of this env's tasks.
        """
        super().reset(seed=seed)
        options = dict(options or {})
        task = options.pop("task", None)
        if options:
            raise W2SError(f"unknown reset option(s) {', '.join(map(repr, options))}; valid: 'task'")
        if task is None:
            task = self._task_id or self._default_task or self.default_task()
        if not isinstance(task, str) or not task:
            raise UnknownTaskError(f"task id must be a non-empty string, got {task!r}")
        if task != self._task_id:
            self._instruction = self._load_task(task)
            self._task_id = task
        self._actions = []
        self._done = False
        self._status = self._keyed(self._engine_reset())
        info = self._info(self._status)
        info["instruction"] = self._instruction
        if self.render_mode == "human":
            self.render()
        return fit_observation(self._status.observation), info

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        """Send ``action`` (any text; see :func:`clean_action`) and report what happened.

        After the episode ended, a further step changes nothing: it returns the last observation again with
        reward 0 and the same end flags.

        Raises:
            W2SError: ``step`` before ``reset``.
        """
        if self._status is None:
            raise W2SError(f"{type(self).__name__}.step() called before reset()")
        if self._done:
            logger.debug("step after the end of the episode of %s; call reset()", self._task_id)
            return self._result(self._status, 0.0)
        command = clean_action(action)
        # the first step is also credited with any score the task starts with, so the return is the final score
        previous = self._status.score if self._actions else 0.0
        self._status = self._keyed(self._engine_step(command))
        self._actions.append(command)
        result = self._result(self._status, self._status.score - previous)
        self._done = result[2] or result[3]
        if self.render_mode == "human":
            self.render()
        return result

    def _keyed(self, status: EngineStatus) -> EngineStatus:
        """``status`` with the key of the engine's current state (``None`` while :attr:`state_key` is off)."""
        key = self._engine_state_key(status) if self.state_key else None
        return status if key == status.state_key else replace(status, state_key=key)

    def _result(self, status: EngineStatus, reward: float) -> tuple[str, float, bool, bool, dict]:
        terminated = bool(status.won or status.lost)
        truncated = not terminated and len(self._actions) >= self.max_steps
        return fit_observation(status.observation), float(reward), terminated, truncated, self._info(status)

    def _info(self, status: EngineStatus) -> dict[str, Any]:
        return {
            "task_id": self._task_id,
            "won": bool(status.won),
            "lost": bool(status.lost),
            "score": status.score,
            "raw_score": float(status.raw_score),
            "max_score": float(status.max_score),
            "admissible_commands": list(status.admissible) if status.admissible is not None else None,
            "expert_plan": list(status.expert_plan) if status.expert_plan is not None else None,
            "moves": len(self._actions),
            "state_key": status.state_key,
        }

    def render(self) -> str | None:
        """``ansi``: the last observation; ``human``: log it at INFO level; no render mode: ``None``."""
        if self._status is None or self.render_mode is None:
            return None
        text = fit_observation(self._status.observation)
        if self.render_mode == "ansi":
            return text
        logger.info("%s> %s", self._actions[-1] if self._actions else "", text)
        return None

    # ------------------------------------------------------------------------------ state for search

    def clone_state(self) -> EnvState:
        """Save the current state (see :class:`EnvState`).

        Raises:
            W2SError: called before ``reset``.
        """
        if self._status is None or self._task_id is None:
            raise W2SError(f"{type(self).__name__}.clone_state() called before reset()")
        return EnvState(
            env_class=type(self).__qualname__,
            task_id=self._task_id,
            actions=tuple(self._actions),
            status=self._status,
            done=self._done,
            engine=self._engine_snapshot(),
        )

    def restore_state(self, state: EnvState) -> None:
        """Return to ``state``: the next steps give the same observations, rewards and infos as they did
        after :meth:`clone_state`. Loads the state's task if another one is being played.

        Raises:
            W2SError: ``state`` does not come from an env of this class.
        """
        if not isinstance(state, EnvState) or state.env_class != type(self).__qualname__:
            raise W2SError(f"cannot restore {type(state).__name__} on {type(self).__name__}")
        if state.task_id != self._task_id:
            self._instruction = self._load_task(state.task_id)
            self._task_id = state.task_id
            self._engine_reset()  # a freshly loaded engine must be started before it takes a snapshot
        if state.engine is None or not self._engine_restore(state.engine):
            self.replay(state.actions)
        self._actions = list(state.actions)
        self._status = state.status
        self._done = state.done

    def replay(self, actions: Sequence[str]) -> EngineStatus:
        """Reset the current task's engine and send ``actions`` (already cleaned) without bookkeeping.

        Used to restore a state without an engine snapshot and to rebuild a crashed engine.
        """
        status = self._engine_reset()
        self._actions = []
        for command in actions:
            status = self._engine_step(command)
            self._actions.append(command)
        return status
