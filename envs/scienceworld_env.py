"""``w2s/ScienceWorld-v0``: the ScienceWorld simulator (a JVM behind py4j) as a text env.

Task ids are ``"<task>/<variation>"`` (``"boil/3"``); :class:`~w2s_agents.envs.suites.ScienceWorldSuite` lists
them per split using the package's own train / dev / test variation splits (dev is this project's ``valid``).

* Score: ScienceWorld reports a score in [0, 1], negative when the task was failed; the normalised score is
  clipped to [0, 1], a negative score or a completion without full score is ``lost``, full score is ``won``.
* Admissible commands are ScienceWorld's valid action-object combinations (about 0.1 s per step, so they are
  optional); the expert plan is the gold action sequence while the agent follows it, ``None`` after a deviation.
* The JVM starts on first use, stops on :meth:`ScienceWorldEnv.close`, when the env is garbage-collected and at interpreter exit, and is restarted
  when it dies: the episode is rebuilt by replaying its actions and the step is retried once.
* Cloning replays the action prefix (the simulator has no state snapshot).
* The state key (``info["state_key"]``) hashes what the simulator's free look-around and inventory (actions
  that take no time) report, with the score and the won / lost flags; runs of listed items are sorted, so the
  order in which things were put somewhere does not count. The room, the objects in it and their visible
  states (open, on, the state of matter of a substance, a thermometer's reading) are in those texts; what they
  do not show (a temperature nobody reads, a process that has not yet changed anything visible, what the agent
  focused on when that did not change the score) is not in the key, so time-dependent processes are only as
  visible as those texts. A pending "Ambiguous request" (the simulator waits for an option's number) is part
  of the state: the key then also hashes the question. It costs two simulator calls (about 1.5 ms) per step.
"""

from __future__ import annotations

import json
import logging
import weakref
from typing import Any

from w2s_agents.envs.base import EngineStatus, TextEnv, UnknownTaskError, hash_state
from w2s_agents.envs.suites import SPLITS, ScienceWorldSuite, get_suite, suite_names
from w2s_agents.errors import W2SError

__all__ = ["ScienceWorldEnv", "scienceworld_task_names"]

logger = logging.getLogger(__name__)

_SPLIT_METHOD = {"train": "getVariationsTrain", "valid": "getVariationsDev", "test": "getVariationsTest"}
_AMBIGUOUS = "Ambiguous request:"
"""How the simulator starts the question it asks when a command matches several actions."""


def scienceworld_task_names() -> list[str]:
    """The 30 ScienceWorld task names, read from the package's task list (no JVM needed)."""
    from importlib import resources

    text = resources.files("scienceworld").joinpath("tasks.json").read_text(encoding="utf-8")
    return [t["task_name"] for t in json.loads(text)]


def _canonical_listing(text: str) -> str:
    """ScienceWorld's look-around or inventory text with every run of listed (tab-indented) items sorted."""
    out: list[str] = []
    items: list[str] = []
    for line in text.strip().splitlines():
        if line.startswith(("\t", " ")):
            items.append(line.strip())
            continue
        out.extend(sorted(items))
        items = []
        out.append(line.strip())
    out.extend(sorted(items))
    return "\n".join(out)


class _Simulator:
    """One ScienceWorld JVM, started lazily and stopped on :meth:`stop` or at exit."""

    def __init__(self) -> None:
        self._env: Any = None

    @property
    def running(self) -> bool:
        if self._env is None:
            return False
        proc = getattr(self._env._gateway, "java_process", None)
        return proc is None or proc.poll() is None

    def get(self) -> Any:
        """The ``scienceworld.ScienceWorldEnv`` (py4j wrapper), starting the JVM if needed."""
        if not self.running:
            self.stop()
            from scienceworld import ScienceWorldEnv as _SWEnv

            logger.info("starting the ScienceWorld JVM")
            try:
                self._env = _SWEnv("", envStepLimit=10**9)
            except Exception as exc:
                raise W2SError(f"cannot start the ScienceWorld JVM (is Java 11+ installed?): {exc}") from exc
        return self._env

    def stop(self) -> None:
        env, self._env = self._env, None
        if env is None:
            return
        proc = getattr(env._gateway, "java_process", None)
        try:
            env._gateway.shutdown()
        except Exception:  # the JVM may already be gone
            logger.debug("py4j shutdown failed", exc_info=True)
        env.close = lambda: None  # the package's __del__ calls close(), which would shut down a second time
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except Exception:  # pragma: no cover - a JVM that ignores SIGTERM
                    proc.kill()
                    proc.wait()
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
        tempdir = getattr(env, "_obj_tree_tempdir", None)
        if tempdir is not None:
            tempdir.cleanup()
        logger.info("stopped the ScienceWorld JVM")


class ScienceWorldEnv(TextEnv):
    """ScienceWorld as a :class:`~w2s_agents.envs.base.TextEnv`.

    Args:
        task: default task id (default ``boil/0``).
        max_steps: step limit of an episode.
        admissible_commands: compute the valid actions at every step (slow: ~0.1 s).
        expert_plan: generate the gold path when a task is loaded.
        simplifications: ScienceWorld simplification string (``"easy"``, a comma list, or ``""``).
        render_mode: ``None``, ``"ansi"`` or ``"human"``.
        state_key: report ``info["state_key"]`` (see the module docstring).
    """

    env_id = "w2s/ScienceWorld-v0"
    command_grammar = (
        "look around, look at OBJ, look in OBJ, inventory, task, go to LOC, teleport to LOC (with the 'easy' "
        "simplifications), open OBJ, close OBJ, activate OBJ, deactivate OBJ, pick up OBJ, put down OBJ, "
        "move OBJ to OBJ, pour OBJ in OBJ, dunk OBJ in OBJ, mix OBJ, use OBJ on OBJ, read OBJ, eat OBJ, "
        "flush OBJ, focus on OBJ, wait, wait1"
    )

    def __init__(
        self,
        task: str | None = None,
        *,
        max_steps: int = 100,
        admissible_commands: bool = True,
        expert_plan: bool = True,
        simplifications: str = "easy",
        render_mode: str | None = None,
        state_key: bool = True,
    ) -> None:
        super().__init__(task, max_steps=max_steps, render_mode=render_mode, state_key=state_key)
        self.admissible_commands = bool(admissible_commands)
        self.expert_plan = bool(expert_plan)
        self.simplifications = simplifications
        self._sim = _Simulator()
        self._loaded: tuple[str, int] | None = None
        self._gold: tuple[str, ...] = ()
        self._on_gold = True
        self._variations: dict[tuple[str, str], list[int]] = {}
        self._finalizer = weakref.finalize(self, _Simulator.stop, self._sim)

    # ------------------------------------------------------------------------------ tasks

    def default_task(self) -> str:
        """``boil/0``."""
        return "boil/0"

    def variations(self, task: str, split: str) -> list[int]:
        """The package's variation indices of ``task`` in ``split`` (``valid`` is ScienceWorld's dev split).

        Raises:
            UnknownTaskError: unknown task or split.
        """
        if task not in scienceworld_task_names():
            raise UnknownTaskError(
                f"unknown ScienceWorld task {task!r}; valid: {', '.join(scienceworld_task_names())}"
            )
        if split not in SPLITS:
            raise UnknownTaskError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        key = (task, split)
        if key not in self._variations:
            server = self._sim.get().server
            server.load(task, 0, self.simplifications, False)
            self._loaded = None  # the simulator now holds variation 0 without gold path
            self._variations[key] = [int(v) for v in getattr(server, _SPLIT_METHOD[split])()]
        return list(self._variations[key])

    def suite_task_ids(self, suite: ScienceWorldSuite, split: str) -> list[str]:
        """Task ids of ``split`` of a ScienceWorld suite (starts the JVM to read the variation splits)."""
        out: list[str] = []
        limit = suite.sizes.get(split, 0) if split in suite.sizes else 0
        for task in suite.tasks or tuple(scienceworld_task_names()):
            found = self.variations(task, split)
            out.extend(f"{task}/{v}" for v in (found if limit is None else found[:limit]))
        return out

    def task_ids(self, split: str | None = None) -> list[str]:
        """Task ids of the registered ScienceWorld suites (of one split when given); starts the JVM."""
        out: dict[str, None] = {}
        for name in suite_names():
            suite = get_suite(name)
            if isinstance(suite, ScienceWorldSuite):
                for s in [split] if split else list(SPLITS):
                    out.update(dict.fromkeys(self.suite_task_ids(suite, s)))
        return list(out)

    def _parse(self, task_id: str) -> tuple[str, int]:
        task, _, var = task_id.rpartition("/")
        names = scienceworld_task_names()
        if not task or not var.isdigit():
            raise UnknownTaskError(
                f"bad ScienceWorld task id {task_id!r}: expected <task>/<variation> (e.g. boil/0) "
                f"with task one of {', '.join(names)}"
            )
        if task not in names:
            raise UnknownTaskError(
                f"unknown ScienceWorld task {task!r} in {task_id!r}; valid: {', '.join(names)}"
            )
        return task, int(var)

    def _load_task(self, task_id: str) -> str:
        task, variation = self._parse(task_id)
        env = self._sim.get()
        n = int(env.server.getTaskMaxVariations(task))
        if variation >= n:
            raise UnknownTaskError(f"ScienceWorld task {task} has variations 0..{n - 1}, not {variation}")
        self._load(task, variation)
        return str(env.server.getTaskDescription())

    def _load(self, task: str, variation: int) -> None:
        server = self._sim.get().server
        server.load(task, variation, self.simplifications, self.expert_plan)
        self._gold = tuple(str(a) for a in server.getGoldActionSequence()) if self.expert_plan else ()
        self._loaded = (task, variation)

    # ------------------------------------------------------------------------------ engine

    def _ensure_loaded(self) -> Any:
        """The simulator's server with the current task loaded (restarting a dead JVM)."""
        if self._task_id is None:
            raise W2SError("no ScienceWorld task loaded")
        restarted = not self._sim.running
        server = self._sim.get().server
        if restarted or self._loaded != self._parse(self._task_id):
            self._load(*self._parse(self._task_id))
        return server

    def _report(self, observation: str, server: Any, taken: int) -> EngineStatus:
        """The engine status after ``taken`` actions of the episode."""
        score = float(server.getScore())
        completed = bool(server.getCompleted())
        won = score >= 1.0 - 1e-9
        lost = score < 0 or (completed and not won)
        admissible = None
        if self.admissible_commands:
            admissible = tuple(str(a) for a in server.getValidActionObjectCombinations())
        plan = None
        if self.expert_plan and self._on_gold:
            plan = () if (won or lost) else self._gold[taken:]
        return EngineStatus(
            observation=str(observation),
            raw_score=score,
            max_score=1.0,
            won=won,
            lost=lost,
            admissible=admissible,
            expert_plan=plan,
        )

    def _engine_reset(self) -> EngineStatus:
        server = self._ensure_loaded()
        server.reset()
        self._on_gold = True
        # the simulator reports score and completion only after a first step: "look around", as the package does
        return self._report(server.step("look around"), server, 0)

    def _engine_step(self, command: str) -> EngineStatus:
        n = len(self._actions)
        self._on_gold = self._on_gold and n < len(self._gold) and self._gold[n] == command
        if self._loaded is not None and not self._sim.running:
            self._recover("found dead")
        try:
            server = self._ensure_loaded()
            observation = server.step(command)
        except Exception as exc:
            if self._sim.running:
                raise
            self._recover(f"died: {exc}")
            server = self._ensure_loaded()
            observation = server.step(command)
        return self._report(observation, server, n + 1)

    def _engine_state_key(self, status: EngineStatus) -> str | None:
        if not self._sim.running:  # died after the step: the next step recovers, this state has no key
            return None
        server = self._sim.get().server
        try:
            look, inventory = str(server.freeActionLook()), str(server.freeActionInventory())
        except Exception:  # the JVM died meanwhile
            logger.debug("no state key: the simulator did not answer", exc_info=True)
            return None
        outcome = f"{status.raw_score!r}|{status.won:d}|{status.lost:d}"
        # after an ambiguous command the simulator waits for the number of an option: the next input means
        # something else, so the pending question (options in the order shown) is part of the state
        pending = status.observation if status.observation.startswith(_AMBIGUOUS) else ""
        return hash_state(_canonical_listing(look), _canonical_listing(inventory), outcome, pending)

    def _recover(self, why: str) -> None:
        """Restart the JVM and rebuild the episode by replaying its actions."""
        logger.warning(
            "the ScienceWorld JVM %s; restarting it and replaying %d actions of %s",
            why,
            len(self._actions),
            self._task_id,
        )
        # the episode keeps its gold path: a reload may generate a different (equally valid) one
        actions, on_gold, gold = list(self._actions), self._on_gold, self._gold
        self._sim.stop()
        self.replay(actions)
        self._actions, self._on_gold, self._gold = actions, on_gold, gold

    # ------------------------------------------------------------------------------ lifecycle

    def kill_simulator(self) -> None:
        """Kill the JVM abruptly (to test recovery); the next step restarts it."""
        env = self._sim._env
        if env is not None and env._gateway.java_process is not None:
            env._gateway.java_process.kill()
            env._gateway.java_process.wait()

    def close(self) -> None:
        """Stop the JVM (a later reset starts a new one)."""
        self._sim.stop()
        self._loaded = None
        self._task_id = None
        self._status = None
        super().close()
