"""``w2s/TextWorld-v0``: TextWorld games generated locally, with exact state cloning.

Tasks are games of a registered :class:`~w2s_agents.envs.suites.TextWorldSuite` (``"tw-simple/train/3"``) or the
path of a compiled TextWorld ``.z8`` game (with its ``.json`` beside it). Games are generated on first use and
cached (:class:`~w2s_agents.envs.textworld_games.GameCache`).

Only the information asked for is computed (TextWorld ``EnvInfos``): admissible commands and the expert plan
each need TextWorld's state tracking, which costs time at every step; without both a step is a bare
Z-machine step.

The instruction is the game's objective. The expert plan at reset is the game's walkthrough; while the agent
follows it (and each of its commands does what TextWorld expects), the rest of the walkthrough; otherwise
TextWorld's winning policy from the current state. When the expert's own next command fails (the game asks
"Which do you mean, the locker or the type 0 locker?" or does nothing), the plan is repaired: the policy's
next command is tried in a copy of the state, then other phrasings of it (``take X from Y`` -> ``take X``),
and the first that performs TextWorld's intended action leads the plan. An empty plan before the end of the
game means the expert cannot go on (no phrasing works).

Interpreter commands never reach the game: ``restart``, ``restore``, ``save``, ``quit`` / ``q``, ``script`` /
``transcript`` / ``unscript`` / ``noscript``, ``undo``, the display modes ``verbose`` / ``long``, ``brief`` /
``normal``, ``superbrief`` / ``short``, ``notify``, ``version``, ``verify`` (:data:`INTERPRETER_COMMANDS`) and
TextWorld's own control commands (any word starting with ``tw-``). They would restart or quit the story behind
TextWorld's back, write ``*.qzl`` or transcript files into the working folder, or change later text in a way
the state key cannot see. A command is refused if any of the commands it chains (Inform splits a line at
``.``, ``,`` and ``then``) starts with one of them, matched as the interpreter reads words (case-insensitive,
the first 9 letters of long words); the step answers :func:`interpreter_command_refusal`'s text, costs a
move and changes nothing (reward 0, same state key, same admissible commands and plan). ``score``,
``inventory``, ``help`` and ``goal`` are ordinary game commands that only read the game, and pass; so do
``yes`` / ``no`` (with restart and quit refused, no interpreter question is ever pending: the game answers
"That was a rhetorical question.").

The last observation of a won or lost game ends with the game's result ("*** The End ***", the score); the
interpreter's menu after it ("Would you like to RESTART, RESTORE a saved game, QUIT or UNDO the last
command?") is removed, since the episode is over.

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
import re
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

__all__ = ["INTERPRETER_COMMANDS", "TextWorldEnv", "interpreter_command", "interpreter_command_refusal"]

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


INTERPRETER_COMMANDS: tuple[str, ...] = (
    "restart",
    "restore",
    "save",
    "quit",
    "q",
    "script",
    "transcript",
    "unscript",
    "noscript",
    "undo",
    "verbose",
    "long",
    "brief",
    "normal",
    "superbrief",
    "short",
    "notify",
    "version",
    "verify",
)
"""Verbs of the Inform 7 interpreter's out-of-world commands that a TextWorld env refuses (with any word starting
with ``tw-``, TextWorld's control commands); see the module docstring."""

_DICTIONARY_LETTERS = 9
"""Letters of a word the Z-machine (version 4 and later) compares with its dictionary: ``transcripts`` is
``transcript``."""
# Inform runs "look. save", "look, save" and "look then save" as two commands
_CHAIN = re.compile(r"[.,]|\bthen\b")


def interpreter_command(command: str) -> str | None:
    """The interpreter command (one of :data:`INTERPRETER_COMMANDS`, or a ``tw-`` word) that ``command`` would
    run in a TextWorld game, ``None`` for a game command.

    Each command the line chains (split at ``.``, ``,`` and the word ``then``) is checked by its first word,
    lower-cased, with the dictionary's resolution of 9 letters (``SuperBriefly`` is ``superbrief``).
    """
    for part in _CHAIN.split(command.lower()):
        words = part.replace('"', " ").split()
        if not words:
            continue
        verb = words[0]
        if verb.startswith("tw-"):
            return verb
        for meta in INTERPRETER_COMMANDS:
            if verb == meta or (
                len(meta) >= _DICTIONARY_LETTERS and verb[:_DICTIONARY_LETTERS] == meta[:_DICTIONARY_LETTERS]
            ):
                return meta
    return None


def interpreter_command_refusal(verb: str) -> str:
    """The observation answering a refused interpreter command ``verb`` (from :func:`interpreter_command`)."""
    return (
        f'"{verb}" is an interpreter command, not an action in the game: it was not carried out. '
        "Nothing has changed."
    )


_END_MENU = re.compile(r"\s*Would you like to RESTART, RESTORE a saved game\b.*\Z", re.DOTALL)


def _strip_end_menu(text: str) -> str:
    """The last observation of a finished game without the interpreter's menu that follows the result."""
    return _END_MENU.sub("", text)


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


_TAKE_FROM = re.compile(r"^take (.+) from (.+)$")


def _phrasings(command: str) -> list[str]:
    """``command`` and other phrasings of the same TextWorld action, to try when it fails: ``take X from Y``
    is also ``take X`` (the game then asks no question about ``Y``, whose name may be part of another's, as
    "locker" is of "type 0 locker")."""
    out = [command]
    if m := _TAKE_FROM.match(command):
        out.append(f"take {m.group(1)}")
    return out


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
        # the engine's report after its last reset or step (refused commands leave it): the state a refusal
        # repeats, the plan the next step continues; part of the engine's state, so snapshots carry it
        self._last: EngineStatus | None = None

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

    def _report(self, gs: Any, plan: tuple[str, ...] | None) -> EngineStatus:
        """The engine status of TextWorld's game state ``gs``; ``plan``: the expert's remaining commands
        (ignored once the game is over, and when plans are off)."""
        won, lost = bool(gs.get("won")), bool(gs.get("lost"))
        observation = _strip_prompt(gs.get("feedback") or "")
        if won or lost:
            observation = _strip_end_menu(observation)
            plan = ()
        return EngineStatus(
            observation=observation,
            raw_score=float(gs.get("score") or 0),
            max_score=self._max_score,
            won=won,
            lost=lost,
            admissible=tuple(gs["admissible_commands"]) if self.admissible_commands else None,
            expert_plan=plan if self.expert_plan else None,
        )

    def _engine_reset(self) -> EngineStatus:
        gs = self._tw.reset()
        self._command_depth = self._layers()[-1]._jericho.frotz_lib.getFrameCount()
        status = self._report(gs, self._walkthrough)
        if not self.banner:
            status = dataclasses.replace(status, observation=_strip_banner(status.observation))
        self._last = status
        return status

    def _engine_step(self, command: str) -> EngineStatus:
        assert self._last is not None, "_engine_step before _engine_reset"
        verb = interpreter_command(command)
        if verb is not None:
            logger.debug("refused interpreter command %r in %s", command, self._game_path)
            return dataclasses.replace(self._last, observation=interpreter_command_refusal(verb))
        tracking = self._tracking()
        moves = tracking._moves if tracking is not None else 0
        gs, _, _ = self._tw.step(command)
        plan = None
        if self.expert_plan and not (gs.get("won") or gs.get("lost")):
            plan = self._next_plan(command, tracking is not None and tracking._moves > moves, gs)
        self._last = self._report(gs, plan)
        return self._last

    def _next_plan(self, command: str, acted: bool, gs: Any) -> tuple[str, ...]:
        """The expert plan after ``command`` (``acted``: TextWorld saw it change the game) in state ``gs``."""
        previous = self._last.expert_plan or ()
        followed = bool(previous) and command == previous[0]
        on_walkthrough = previous == self._walkthrough[len(self._walkthrough) - len(previous) :]
        if followed and acted and on_walkthrough and len(previous) > 1:
            return previous[1:]
        policy = tuple(gs.get("policy_commands") or ())
        if followed and not acted:
            return self._repaired(policy)
        return policy

    def _repaired(self, policy: tuple[str, ...]) -> tuple[str, ...]:
        """``policy`` (TextWorld's commands from the current state) led by a phrasing of its first command that
        performs TextWorld's intended action, tried in a copy of the state; ``()`` when none does."""
        tracking = self._tracking()
        actions = tracking._current_winning_policy if tracking is not None else None
        if not policy or not actions:
            return ()
        intended = actions[0]
        for candidate in _phrasings(policy[0]):
            if self._performs(candidate, intended):
                if candidate != policy[0]:
                    logger.debug(
                        "expert command %r rephrased %r in %s", policy[0], candidate, self._game_path
                    )
                return (candidate, *policy[1:])
        logger.info("the expert plan of %s stops: no phrasing of %r works", self._game_path, policy[0])
        return ()

    def _performs(self, command: str, action: Any) -> bool:
        """Whether ``command`` makes TextWorld detect ``action``; the game is put back as it was."""
        tracking = self._tracking()
        snapshot = self._engine_snapshot()
        moves = tracking._moves
        try:
            self._tw.step(command)
            return tracking._moves > moves and tracking._last_action == action
        finally:
            self._engine_restore(snapshot)

    def _tracking(self) -> Any:
        """TextWorld's ``StateTracking`` wrapper while it tracks the game (admissible commands or plans on)."""
        from textworld.envs.wrappers.tw_inform7 import StateTracking

        for layer in self._layers():
            if isinstance(layer, StateTracking):
                return layer if layer.tracking else None
        return None

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
        # a refused command leaves the engine as it was: key its last answer, not the refusal
        status = self._last if self._last is not None else status
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
        return self._game_path.name, layers[-1]._jericho.get_state(), saved, self._last

    def _engine_restore(self, snapshot: Any) -> bool:
        game_name, machine, saved, last = snapshot
        if self._game_path is None or game_name != self._game_path.name:
            # the same task id names another game file here (e.g. a user's .z8 path that changed): replay
            logger.debug("state of game %s restored by replay on %s", game_name, self._game_path)
            return False
        layers = self._layers()
        for layer, attrs in zip(layers, saved, strict=True):
            for name, value in attrs.items():
                setattr(layer, name, _copy_value(value))
        layers[-1]._jericho.set_state(machine)
        self._last = last
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
