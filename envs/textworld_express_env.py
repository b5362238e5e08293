"""``w2s/TextWorldExpress-v0``: TextWorld-Express (a fast Java reimplementation of CookingWorld, Coin Collector,
Map Reader, Arithmetic, Sorting and more, behind py4j) as a text env.

Task ids are ``"<suite>/<split>/<index>"`` of a registered
:class:`~w2s_agents.envs.suites.TextWorldExpressSuite` (``"twx-coin/train/3"``): the suite's game with the
``index``-th seed of the package's own fold (train seeds 0.., dev 10000.. for ``valid``, test 20000..).

* Score: TextWorld-Express's normalised score (in [0, 1], negative after some failures) with ``max_score`` 1;
  ``won`` is its task success, ``lost`` its task failure.
* Admissible commands are the game's valid actions (free: every step reports them), sorted.
* The expert plan is the game's gold action sequence while the agent follows it, ``None`` after a deviation
  (TextWorld-Express makes the gold path at reset only).
* Cloning replays the action prefix: the engine has no snapshot, and a game is fixed by its seed, so the replay
  is exact. A replay costs about a millisecond a step.
* No state key (``info["state_key"]`` is ``None``): the engine's object tree is empty for most games and the
  observed texts (room description, inventory) do not show the rest of the world, e.g. a door opened in
  another room.
* One JVM per env, started on first use and stopped on :meth:`TextWorldExpressEnv.close`, when the env is
  garbage-collected and at interpreter exit. A JVM that dies (a connection error from py4j) is restarted and
  the episode replayed, and the call is retried once.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

from w2s_agents.envs.base import EngineStatus, TextEnv, UnknownTaskError
from w2s_agents.envs.jvm import stop_jvm
from w2s_agents.envs.suites import SPLITS, TextWorldExpressSuite, get_suite, suite_names
from w2s_agents.errors import ConfigError, W2SError

__all__ = ["TextWorldExpressEnv"]

logger = logging.getLogger(__name__)

_FOLD = {"train": "train", "valid": "dev", "test": "test"}
"""This project's split -> TextWorld-Express's game fold."""


class _Engine:
    """One TextWorld-Express JVM, started lazily; :meth:`stop` ends it."""

    def __init__(self) -> None:
        self._env: Any = None

    @property
    def running(self) -> bool:
        if self._env is None:
            return False
        proc = getattr(self._env._gateway, "java_process", None)
        return proc is None or proc.poll() is None

    def server(self) -> Any:
        """The py4j ``PythonInterface`` of the JVM, starting the JVM if needed.

        Raises:
            W2SError: the package is not installed or the JVM does not start.
        """
        if not self.running:
            self.stop()
            try:
                from textworld_express import TextWorldExpressEnv as _TWXEnv
            except ImportError as exc:
                raise W2SError(
                    f"w2s/TextWorldExpress-v0 needs the textworld-express package ({exc}); "
                    "pip install textworld-express"
                ) from None
            logger.info("starting the TextWorld-Express JVM")
            try:
                self._env = _TWXEnv(envStepLimit=10**9)
            except Exception as exc:
                raise W2SError(
                    f"cannot start the TextWorld-Express JVM (is Java 11+ installed?): {exc}"
                ) from exc
        return self._env.server

    def stop(self) -> None:
        env, self._env = self._env, None
        if env is None:
            return
        env.close = lambda: None  # the package's __del__ calls close(), which would shut down a second time
        stop_jvm(env._gateway, getattr(env._gateway, "java_process", None))
        tmp = getattr(env, "_obj_tree_tempfile", None)
        if tmp is not None:
            tmp.close()
        logger.info("stopped the TextWorld-Express JVM")

    def kill(self) -> None:
        """Kill the JVM abruptly (to test recovery)."""
        proc = getattr(self._env._gateway, "java_process", None) if self._env is not None else None
        if proc is not None:
            proc.kill()
            proc.wait()


def _connection_lost(exc: BaseException) -> bool:
    """Whether ``exc`` says the JVM is gone (rather than that the engine refused a call)."""
    try:
        from py4j.protocol import Py4JNetworkError
    except ImportError:  # pragma: no cover - py4j comes with textworld-express
        return False
    return isinstance(exc, (Py4JNetworkError, ConnectionError, EOFError, BrokenPipeError))


class TextWorldExpressEnv(TextEnv):
    """TextWorld-Express as a :class:`~w2s_agents.envs.base.TextEnv`.

    Args:
        task: default task id (default ``twx-coin/train/0``).
        max_steps: step limit of an episode.
        admissible_commands: report the valid actions (free; ``False`` reports ``None``).
        expert_plan: make the gold path at every reset and report its rest while the agent follows it.
        render_mode: ``None``, ``"ansi"`` or ``"human"``.
        state_key: accepted for the common constructor; this env reports no state key (module docstring).
    """

    env_id = "w2s/TextWorldExpress-v0"
    command_grammar = (
        "look around, inventory, task, move DIRECTION, open OBJ, close OBJ, open door to DIRECTION, take OBJ, "
        "take OBJ from OBJ, put OBJ in OBJ, read OBJ, examine OBJ, eat OBJ, cook OBJ in OBJ, slice OBJ, "
        "dice OBJ, chop OBJ, prepare meal"
    )

    def __init__(
        self,
        task: str | None = None,
        *,
        max_steps: int = 100,
        admissible_commands: bool = True,
        expert_plan: bool = True,
        render_mode: str | None = None,
        state_key: bool = True,
    ) -> None:
        super().__init__(task, max_steps=max_steps, render_mode=render_mode, state_key=state_key)
        self.admissible_commands = bool(admissible_commands)
        self.expert_plan = bool(expert_plan)
        self._engine = _Engine()
        self._game: tuple[str, str, str, int] | None = None  # game, params, fold, seed of the loaded task
        self._engine_game: tuple[str, str] | None = None  # game and params the JVM has loaded
        self._gold: tuple[str, ...] = ()
        self._on_gold = True
        self._finalizer = weakref.finalize(self, _Engine.stop, self._engine)

    # ------------------------------------------------------------------------------ tasks

    def default_task(self) -> str:
        """``twx-coin/train/0``."""
        return "twx-coin/train/0"

    def task_ids(self, split: str | None = None) -> list[str]:
        """Task ids of the registered TextWorld-Express suites (of one split when given)."""
        out: list[str] = []
        for name in suite_names():
            suite = get_suite(name)
            if isinstance(suite, TextWorldExpressSuite):
                for s in [split] if split else list(SPLITS):
                    out.extend(suite.task_ids(s))
        return out

    def _parse(self, task_id: str) -> tuple[str, str, str, int]:
        parts = task_id.split("/")
        if len(parts) != 3 or not parts[2].isdigit():
            names = [n for n in suite_names() if isinstance(get_suite(n), TextWorldExpressSuite)]
            raise UnknownTaskError(
                f"bad TextWorld-Express task id {task_id!r}: expected <suite>/<split>/<index> "
                f"(e.g. twx-coin/train/0) with suite one of {', '.join(names)}"
            )
        try:
            suite = get_suite(parts[0])
            if not isinstance(suite, TextWorldExpressSuite):
                raise UnknownTaskError(
                    f"task {task_id!r}: suite {parts[0]!r} is not a TextWorld-Express suite"
                )
            seed = suite.seed(parts[1], int(parts[2]))
        except ConfigError as exc:
            raise UnknownTaskError(f"task {task_id!r}: {exc}") from None
        return suite.game, suite.game_params, _FOLD[parts[1]], seed

    def _load_task(self, task_id: str) -> str:
        self._game = self._parse(task_id)
        self._engine_reset()
        return str(self._call(lambda server: server.getTaskDescription(), replay=False))

    # ------------------------------------------------------------------------------ engine

    def _call(self, fn: Any, replay: bool = True) -> Any:
        """``fn(server)`` on the JVM. A JVM found dead, before the call or by a connection error during it, is
        restarted, the game started again and (with ``replay``) the episode's actions replayed; ``fn`` is then
        retried once.

        Raises:
            W2SError: the engine refused the call, or the JVM died again.
        """
        for attempt in (0, 1):
            try:
                if self._engine_game is not None and not self._engine.running:
                    self._recover("found dead", replay)
                return fn(self._engine.server())
            except W2SError:
                raise
            except Exception as exc:
                msg = f"{type(exc).__name__}: {exc}".splitlines()[0]
                if attempt == 0 and (_connection_lost(exc) or not self._engine.running):
                    self._recover(f"died: {msg}", replay)
                    continue
                raise W2SError(f"TextWorld-Express failed on {self._task_id}: {msg}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _start_game(self, server: Any) -> dict[str, Any]:
        """Load (when needed) and start the current task's game on ``server``; returns the engine's report."""
        import orjson

        if self._game is None:
            raise W2SError("no TextWorld-Express task loaded")
        game, params, fold, seed = self._game
        if self._engine_game != (game, params) or not self._engine.running:
            msg = server.load(game, params)
            if msg:
                raise W2SError(f"TextWorld-Express refuses game {game} with parameters {params!r}: {msg}")
            self._engine_game = (game, params)
        report = orjson.loads(server.generateNewGameJSON(seed, fold, self.expert_plan))
        self._gold = tuple(str(a) for a in server.getGoldActionSequence()) if self.expert_plan else ()
        return report

    def _report(self, report: dict[str, Any], taken: int) -> EngineStatus:
        score = float(report["score"])
        won, lost = bool(report["tasksuccess"]), bool(report["taskfailure"])
        plan = None
        if self.expert_plan and self._on_gold:
            plan = () if (won or lost) else self._gold[taken:]
        admissible = (
            tuple(sorted(str(a) for a in report["validActions"])) if self.admissible_commands else None
        )
        return EngineStatus(
            observation=str(report["observation"]),
            raw_score=score,
            max_score=1.0,
            won=won,
            lost=lost and not won,
            admissible=admissible,
            expert_plan=plan,
        )

    def _engine_reset(self) -> EngineStatus:
        self._on_gold = True
        return self._report(self._call(self._start_game, replay=False), 0)

    def _step(self, server: Any, command: str) -> dict[str, Any]:
        import orjson

        return orjson.loads(server.stepJSON(command))

    def _engine_step(self, command: str) -> EngineStatus:
        n = len(self._actions)
        self._on_gold = self._on_gold and n < len(self._gold) and self._gold[n] == command
        return self._report(self._call(lambda server: self._step(server, command)), n + 1)

    def _recover(self, why: str, replay: bool) -> None:
        """Restart the JVM and start the game again; with ``replay``, send the episode's actions again."""
        actions = self._actions if replay else []
        logger.warning(
            "the TextWorld-Express JVM %s; restarting it and replaying %d actions of %s",
            why,
            len(actions),
            self._task_id,
        )
        self._engine.stop()
        self._engine_game = None
        if self._game is None:
            return
        server = self._engine.server()
        self._start_game(server)
        for command in actions:
            self._step(server, command)

    # ------------------------------------------------------------------------------ lifecycle

    def kill_engine(self) -> None:
        """Kill the JVM abruptly (to test recovery); the next engine call restarts it."""
        self._engine.kill()

    def close(self) -> None:
        """Stop the JVM (a later reset starts a new one)."""
        self._engine.stop()
        self._engine_game = None
        self._task_id = None
        self._status = None
        super().close()
