"""Expert demonstrations: the walkthrough (TextWorld) or gold path (ScienceWorld) of each task, played in the
env and written as trajectories (role ``expert``) in the JSONL format of :mod:`w2s_agents.types`."""

from __future__ import annotations

import inspect
import logging
import os
import time
from pathlib import Path
from typing import Any

from w2s_agents.envs.base import TextEnv
from w2s_agents.envs.suites import (
    EnvSuite,
    ScienceWorldSuite,
    TextWorldExpressSuite,
    TextWorldSuite,
    get_suite,
)
from w2s_agents.episode import EpisodeRecorder
from w2s_agents.errors import W2SError
from w2s_agents.log import progress
from w2s_agents.store import TrajectoryStore
from w2s_agents.types import Source, Trajectory

__all__ = [
    "EXPERT_SOURCE",
    "PLAN_EXHAUSTED",
    "expert_trajectory",
    "export_demos",
    "suite_env",
    "suite_task_ids",
]

logger = logging.getLogger(__name__)

EXPERT_SOURCE = Source(model="expert", role="expert", sampler="walkthrough")
"""Source of every expert demonstration."""


PLAN_EXHAUSTED = "plan-exhausted"
"""``extra["expert_end"]`` of an expert trajectory whose plan ran out before the game ended (it ends
``error``)."""


def expert_trajectory(env: TextEnv, task_id: str) -> Trajectory:
    """Play the expert plan of ``task_id`` from the reset and return the episode.

    Each step plays the first command of the plan the env reports now (``info["expert_plan"]``), so an env
    that replans or repairs its plan after a step is followed; where an env stops reporting a plan, the rest
    of its last one is played. Ends when the game ends (won or lost), at the env's step limit (``truncated``)
    or when the plan runs out first: that episode ends ``error`` with ``extra["expert_end"]`` set to
    :data:`PLAN_EXHAUSTED` and ``extra["error"]`` saying so. A plan that fails to win is kept and logged.

    Raises:
        W2SError: the env reports no expert plan for the task.
    """
    recorder, info = EpisodeRecorder.reset(env, task_id, EXPERT_SOURCE)
    reported = info.get("expert_plan")
    if reported is None:
        raise W2SError(f"{env.env_id} has no expert plan for task {task_id} (was expert_plan turned off?)")
    plan = list(reported)
    terminated = truncated = False
    while plan:
        action = plan[0]
        obs, reward, terminated, truncated, info = env.step(action)
        recorder.step(action, obs, reward, info)
        if terminated or truncated:
            break
        reported = info.get("expert_plan")
        plan = list(reported) if reported is not None else plan[1:]
    if terminated or truncated:
        traj = recorder.finish(info, bool(terminated))
    else:
        traj = recorder.finish(
            info,
            error=(
                f"{PLAN_EXHAUSTED}: the expert plan ran out after {recorder.num_steps} steps before the game "
                f"ended (score {float(info.get('score') or 0.0):.3f})"
            ),
            extra={"expert_end": PLAN_EXHAUSTED},
        )
    if not traj.success:
        logger.warning(
            "the expert plan of %s ends %s with score %.3f",
            task_id,
            PLAN_EXHAUSTED if traj.extra.get("expert_end") else traj.end,
            traj.return_,
        )
    return traj


_OPTIONAL_FEATURES = ("admissible_commands", "expert_plan")
"""Constructor options of the built-in envs that a plugin env may lack: dropped when its constructor does."""


def suite_env(suite_name: str, **env_kwargs: Any) -> TextEnv:
    """A new env of the kind the suite ``suite_name`` needs (``env_kwargs`` go to its constructor; for a plugin
    env, the options of :data:`_OPTIONAL_FEATURES` that its constructor does not take are left out).

    Raises:
        W2SError: the suite's env is unknown or cannot be made with ``env_kwargs``.
    """
    suite = get_suite(suite_name)
    if isinstance(suite, TextWorldSuite):
        from w2s_agents.envs.textworld_env import TextWorldEnv

        return TextWorldEnv(**env_kwargs)
    if isinstance(suite, ScienceWorldSuite):
        from w2s_agents.envs.scienceworld_env import ScienceWorldEnv

        return ScienceWorldEnv(simplifications=suite.simplifications, **env_kwargs)
    from w2s_agents.envs.registration import env_class, make_env

    params = inspect.signature(env_class(suite.env_id)).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        env_kwargs = {k: v for k, v in env_kwargs.items() if k in params or k not in _OPTIONAL_FEATURES}
    return make_env(suite.env_id, **env_kwargs).unwrapped


def suite_task_ids(suite_name: str, split: str, env: TextEnv | None = None) -> list[str]:
    """Task ids of ``split`` of a suite (ScienceWorld suites need ``env`` or start a JVM; a plugin suite without
    its own ids for the split asks ``env``, or a new env of its own)."""
    suite = get_suite(suite_name)
    if isinstance(suite, (TextWorldSuite, TextWorldExpressSuite)):
        return suite.task_ids(split)
    if isinstance(suite, EnvSuite):
        if split in suite.tasks:
            return suite.task_ids(split)
        own = env if env is not None else suite_env(suite_name)
        try:
            return suite.task_ids(split, own)
        finally:
            if env is None:
                own.close()
    assert isinstance(suite, ScienceWorldSuite)
    from w2s_agents.envs.scienceworld_env import ScienceWorldEnv

    if isinstance(env, ScienceWorldEnv):
        return env.suite_task_ids(suite, split)
    sw = ScienceWorldEnv(simplifications=suite.simplifications, admissible_commands=False)
    try:
        return sw.suite_task_ids(suite, split)
    finally:
        sw.close()


def export_demos(
    suite_name: str,
    split: str,
    path: str | os.PathLike[str],
    *,
    limit: int | None = None,
    max_steps: int = 200,
    admissible_commands: bool = True,
    **env_kwargs: Any,
) -> tuple[int, int]:
    """Write the expert trajectory of every task of a suite split to the JSONL file ``path``.

    Tasks already in the file are skipped, so an interrupted export resumes where it stopped.

    Args:
        suite_name: a registered suite.
        split: ``train``, ``valid`` or ``test``.
        path: trajectory file (appended to).
        limit: only the first ``limit`` tasks of the split.
        max_steps: step limit of the expert episodes.
        admissible_commands: record the admissible commands of each step.
        env_kwargs: further env constructor arguments (e.g. ``cache_dir``).

    Returns:
        ``(written, won)``: trajectories written by this call and how many of them won.
    """
    env = suite_env(suite_name, max_steps=max_steps, admissible_commands=admissible_commands, **env_kwargs)
    written = won = 0
    start = time.perf_counter()
    try:
        task_ids = suite_task_ids(suite_name, split, env)
        if limit is not None:
            task_ids = task_ids[:limit]
        with TrajectoryStore(Path(path)) as store:
            done = {key.task_id for key in store.keys if key.model == EXPERT_SOURCE.model}
            for task_id in progress(task_ids, desc=f"demos {suite_name}/{split}", unit="task"):
                if task_id in done:
                    continue
                traj = expert_trajectory(env, task_id)
                store.append(traj)
                written += 1
                won += traj.success
    finally:
        env.close()
    logger.info(
        "wrote %d expert trajectories of %s/%s to %s (%d won) in %.1fs",
        written,
        suite_name,
        split,
        path,
        won,
        time.perf_counter() - start,
    )
    return written, won
