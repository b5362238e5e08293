"""``w2s/TextWorld-v0``: TextWorld games generated locally, with exact state cloning.

Tasks are games of a registered :class:`~w2s_agents.envs.suites.TextWorldSuite` (``"tw-simple/train/3"``) or the
path of a compiled TextWorld ``.z8`` game (with its ``.json`` beside it). Games are generated on first use and
cached (:class:`~w2s_agents.envs.textworld_games.GameCache`).

Only the information asked for is computed (TextWorld ``EnvInfos``): admissible commands and the expert plan
each need TextWorld's state tracking, which costs time at every step; without both a step is a bare
Z-machine step.

The instruction is the game's objective. The expert plan at reset is the game's walkthrough; while the agent
follows it, the rest of the walkthrough; after a deviation, TextWorld's winning policy from the current state.

``clone_state`` is exact: it saves the Z-machine state (memory, stack, program counter, random generator) and
TextWorld's tracking of the game (quest progression, last action, tracked infos), so a restore costs a
fraction of a millisecond plus a copy of the quest progression.

The state key (``info["state_key"]``) hashes the world held in the Z-machine's object table (every object's
parent, attributes and property values, less Inform 7's history and scratch bits: see
:mod:`w2s_agents.envs.zmachine`) with the raw score and the won / lost flags. It does not depend on the move
counter, on the order in which things were put somewhere, on which rooms were visited or things handled, nor
on whether admissible commands or the expert plan are computed. A question of the parser awaiting its answer
("What do you want to take?") is part of the state: the key then also hashes the question. The last command
is not, so ``again`` (``g``) and ``oops``, which refer to it, may act differently from two states with one
key. Jericho's ``get_world_state_hash`` is not used: without per-game bindings it hashes an empty object list,
the same for every state of a TextWorld game.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from w2s_agents.envs.base import EngineStatus, TextEnv, UnknownTaskError, hash_state
from w2s_agents.envs.suites import TextWorldSuite, get_suite, parse_textworld_task, suite_names
from w2s_agents.envs.textworld_games import GameCache
from w2s_agents.envs.zmachine import WorldLayout
from w2s_agents.errors import ConfigError

__all__ = ["TextWorldEnv"]

logger = logging.getLogger(__name__)

_ENGINE_SEED = 20_240_917
"""Seed of the Z-machine's random generator (Jericho treats 0 as "unseeded")."""

# Episode-dependent attributes of TextWorld's wrapper stack (TWInform7 -> StateTracking -> Inform7Data ->
# GameData -> JerichoEnv); the rest (game, Inform7 helpers, requested infos) is fixed per game.
_EPISODE_ATTRS = (
    "state",
    "_prev_state",
    "_tracked_infos",
    "_last_action",
    "_previous_winning_policy",
    "_current_winning_policy",
    "_moves",
    "_game_progression",
    "_reset",
)


def _strip_prompt(text: str) -> str:
    """The game's answer without the interpreter's trailing ``>`` prompt and status line
    (``">  -= Kitchen =-0/3"``), which are screen furniture rather than part of the answer."""
    text = text.rstrip()
    head, sep, last = text.rpartition("\n")
    if last.lstrip().startswith(">"):
        text = head.rstrip() if sep else ""
    return text.strip("\n")


_BANNER_CHARS = frozenset(" _|\\/$<>")


def _strip_banner(text: str) -> str:
    """The opening text without TextWorld's title art: the leading lines drawn only with ``_|\\/$<>`` and
    spaces (about 1,300 characters that carry no information and cost an agent hundreds of tokens)."""
    lines = text.split("\n")
    i = 0
    while i < len(lines) and all(c in _BANNER_CHARS for c in lines[i]):
        i += 1
    return "\n".join(lines[i:]) if i else text


def _copy_value(value: Any) -> Any:
    from textworld.core import GameState
    from textworld.generator.game import GameProgression

    if isinstance(value, GameState):
        return GameState(value)  # shallow: every step builds a new GameState, old ones are never mutated
    if isinstance(value, GameProgression):
        return value.copy()
    if isinstance(value, list):
        return list(value)
    return value  # immutable (None, int, tuple, Action)


class TextWorldEnv(TextEnv):
    """TextWorld games as a :class:`~w2s_agents.envs.base.TextEnv`.

    Args:
        task: default task id (default: ``tw-simple/train/0``).
        max_steps: step limit of an episode.
        admissible_commands: compute the admissible commands at every step.
        expert_plan: report the expert's remaining plan at every step.
        banner: keep TextWorld's title art at the top of the first observation (dropped by default).
        cache_dir: where generated games are cached (default: ``$W2S_CACHE/games`` or
            ``~/.cache/w2s-agents/games``).
        render_mode: ``None``, ``"ansi"`` or ``"human"``.
        state_key: report ``info["state_key"]`` (see the module docstring).
    """

    env_id = "w2s/TextWorld-v0"
    command_grammar = (
        "look, inventory, go north|south|east|west, examine X, take X, take X from Y, drop X, put X on Y, "
        "insert X into Y, open X, close X, unlock X with Y, lock X with Y, eat X; cooking games add "
        "prepare meal, cook X with Y, slice|dice|chop X with Y"
    )

    def __init__(
        self,
        task: str | None = None,
        *,
        max_steps: int = 100,
        admissible_commands: bool = True,
        expert_plan: bool = True,
        banner: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
        render_mode: str | None = None,
        state_key: bool = True,
    ) -> None:
        super().__init__(task, max_steps=max_steps, render_mode=render_mode, state_key=state_key)
        self.admissible_commands = bool(admissible_commands)
        self.expert_plan = bool(expert_plan)
        self.banner = bool(banner)
        self.cache = GameCache(cache_dir)
        self._game_path: Path | None = None
        self._tw: Any = None  # textworld Environment (wrapper stack)
        self._walkthrough: tuple[str, ...] = ()
        self._max_score = 1.0
        # where the world state lies in the game's memory: read on the first key, None if unreadable
        self._layout: WorldLayout | None = None
        self._layout_read = False
        self._memory: np.ndarray | None = None  # the game's dynamic memory, copied into it for each key
        self._command_depth = 0  # call depth of the interpreter while it waits for a command (after a reset)

    # ------------------------------------------------------------------------------ tasks

    def default_task(self) -> str:
        """``tw-simple/train/0``."""
        return "tw-simple/train/0"

    def task_ids(self, split: str | None = None) -> list[str]:
        """Task ids of every registered TextWorld suite (of one split when given)."""
        out: list[str] = []
        for name in suite_names():
            suite = get_suite(name)
            if isinstance(suite, TextWorldSuite):
                for s in [split] if split else ["train", "valid", "test"]:
                    out.extend(suite.task_ids(s))
        return out

    def prepare(self, task_ids: Sequence[str], workers: int = 1, timeout_s: float | None = None) -> None:
        """Generate the games of ``task_ids`` that are not cached yet, ``workers`` processes at a time, each
        within ``timeout_s`` seconds (default: the game cache's, 600).

        Raises:
            UnknownTaskError: an id is neither a TextWorld suite task nor a game file.
            W2SError: TextWorld failed to make a game, or one took longer than ``timeout_s``.
        """
        specs = []
        for task_id in task_ids:
            if task_id.endswith(".z8"):
                self.game_path(task_id)  # checks that the file is there
                continue
            try:
                suite, split, index = parse_textworld_task(task_id)
            except ConfigError as exc:
                raise UnknownTaskError(str(exc)) from None
            specs.append(suite.game_spec(split, index))
        self.cache.generate(specs, workers, timeout_s)

    def game_path(self, task_id: str) -> Path:
        """The compiled game of ``task_id``, generated (and cached) if needed.

        Raises:
            UnknownTaskError: the id is neither ``<suite>/<split>/<index>`` of a TextWorld suite nor a game file.
        """
        if task_id.endswith(".z8"):
            path = Path(task_id)
            if not (path.is_file() and path.with_suffix(".json").is_file()):
                raise UnknownTaskError(f"TextWorld game file {path} (with its .json beside it) not found")
            return path
        try:
            suite, split, index = parse_textworld_task(task_id)
        except ConfigError as exc:
            raise UnknownTaskError(str(exc)) from None
        return self.cache.get(suite.game_spec(split, index))

    def _load_task(self, task_id: str) -> str:
        import jericho
        import textworld

        path = self.game_path(task_id)
        if self._tw is not None and path == self._game_path:
            return self._instruction
        self._close_game()
        infos = textworld.EnvInfos(
            objective=True,
            max_score=True,
            score=True,
            won=True,
            lost=True,
            admissible_commands=self.admissible_commands,
            policy_commands=self.expert_plan,
        )
        with warnings.catch_warnings():
            # Jericho warns that it cannot read score and moves of TextWorld games; TextWorld tracks both itself
            warnings.simplefilter("ignore", jericho.UnsupportedGameWarning)
            self._tw = textworld.start(str(path), request_infos=infos)
        # a fixed interpreter seed: TextWorld games are deterministic, and so must be their replays
        self._tw.seed(_ENGINE_SEED)
        self._game_path = path
        self._layout, self._layout_read, self._memory = None, False, None
        game = self._tw._wrapped_env._game
        self._walkthrough = tuple(game.metadata.get("walkthrough") or game.walkthrough or ())
        self._max_score = float(game.max_score or 1)
        return str(game.objective or "")

    # ------------------------------------------------------------------------------ engine

    def _report(self, gs: Any, walkthrough_at: int | None) -> EngineStatus:
        """The engine status of TextWorld's game state ``gs``; ``walkthrough_at``: number of walkthrough
        commands played so far, ``None`` once the agent left the walkthrough."""
        plan: tuple[str, ...] | None = None
        if self.expert_plan:
            if walkthrough_at is not None:
                plan = self._walkthrough[walkthrough_at:]
            else:
                plan = tuple(gs.get("policy_commands") or ())
            if gs.get("won") or gs.get("lost"):
                plan = ()
        admissible = tuple(gs["admissible_commands"]) if self.admissible_commands else None
        return EngineStatus(
            observation=_strip_prompt(gs.get("feedback") or ""),
            raw_score=float(gs.get("score") or 0),
            max_score=self._max_score,
            won=bool(gs.get("won")),
            lost=bool(gs.get("lost")),
            admissible=admissible,
            expert_plan=plan,
        )

    def _engine_reset(self) -> EngineStatus:
        gs = self._tw.reset()
        self._command_depth = self._layers()[-1]._jericho.frotz_lib.getFrameCount()
        status = self._report(gs, 0)
        if not self.banner:
            status = dataclasses.replace(status, observation=_strip_banner(status.observation))
        return status

    def _engine_step(self, command: str) -> EngineStatus:
        gs, _, _ = self._tw.step(command)
        n = len(self._actions)
        on_walkthrough = (
            n < len(self._walkthrough)
            and tuple(self._actions) == self._walkthrough[:n]
            and command == self._walkthrough[n]
        )
        return self._report(gs, n + 1 if on_walkthrough else None)

    def _engine_state_key(self, status: EngineStatus) -> str | None:
        machine = self._layers()[-1]._jericho
        if not self._layout_read:
            self._layout_read = True
            memory = machine._get_ram()  # Jericho's copy of the dynamic memory
            try:
                self._layout = WorldLayout.read(memory)
            except ValueError as exc:
                logger.warning("no state keys for %s: %s", self._game_path, exc)
            self._memory = memory
        if self._layout is None or self._memory is None:
            return None
        memory = self._memory
        machine.frotz_lib.getRAM(memory.ctypes.data)  # what _get_ram() does, without a new array per step
        outcome = f"{status.raw_score!r}|{status.won:d}|{status.lost:d}"
        # The parser asks for a missing noun ("What do you want to take?", "Which do you mean, ...?") and
        # reads the answer deeper in the call stack than the main loop reads a command; the next input then
        # means something else, so a pending question (its text says which) is part of the state. The menu
        # after the end of the game ("Would you like to RESTART, ...", after the number of turns) is not:
        # the episode is over.
        depth = machine.frotz_lib.getFrameCount()
        asking = depth != self._command_depth and not (status.won or status.lost)
        pending = f"{depth}|{status.observation}" if asking else ""
        return hash_state(self._layout.state_bytes(memory), outcome, pending)

    def _layers(self) -> list[Any]:
        layers = []
        layer = self._tw
        while layer is not None:
            layers.append(layer)
            layer = layer.__dict__.get("_wrapped_env")
        return layers

    def _engine_snapshot(self) -> Any:
        layers = self._layers()
        saved = [
            {name: _copy_value(vars(layer)[name]) for name in _EPISODE_ATTRS if name in vars(layer)}
            for layer in layers
        ]
        # the game is named by its file name (the spec hash for generated games), so a state restores on
        # an env whose cache lives elsewhere
        return self._game_path.name, layers[-1]._jericho.get_state(), saved

    def _engine_restore(self, snapshot: Any) -> bool:
        game_name, machine, saved = snapshot
        if self._game_path is None or game_name != self._game_path.name:
            # the same task id names another game file here (e.g. a user's .z8 path that changed): replay
            logger.debug("state of game %s restored by replay on %s", game_name, self._game_path)
            return False
        layers = self._layers()
        for layer, attrs in zip(layers, saved, strict=True):
            for name, value in attrs.items():
                setattr(layer, name, _copy_value(value))
        layers[-1]._jericho.set_state(machine)
        return True

    def copy_engine(self) -> Any:
        """TextWorld's own ``Environment.copy()`` of the running game (for comparison benchmarks)."""
        return self._tw.copy()

    # ------------------------------------------------------------------------------ lifecycle

    def _close_game(self) -> None:
        if self._tw is not None:
            try:
                self._tw.close()
            except Exception:  # pragma: no cover - closing a dead interpreter
                logger.debug("error closing TextWorld game", exc_info=True)
        self._tw = None
        self._game_path = None

    def close(self) -> None:
        """Stop the game interpreter (the env can be reset again afterwards)."""
        self._close_game()
        self._task_id = None
        self._status = None
        super().close()
