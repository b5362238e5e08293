"""The stages that fix a run's tasks and their expert data: ``tasks``, ``held-out`` and ``demos``."""

from __future__ import annotations

import os
from typing import Any

from w2s_agents.errors import W2SError
from w2s_agents.pipeline.cache import StageContext
from w2s_agents.pipeline.experiment import ExperimentConfig
from w2s_agents.pipeline.stage_io import read_trajectories, task_ids, training_system, write_json

__all__ = ["demo_task_ids", "run_demos", "run_held_out", "run_tasks"]


def run_tasks(ctx: StageContext, cfg: ExperimentConfig) -> dict[str, Any]:
    """Stage ``tasks``: the first ``tasks.train`` task ids of the suite's train split, every game prepared
    (generated into the game cache), ``tasks.workers`` processes at once, each within
    ``tasks.generation_timeout_s`` seconds.

    The valid and test tasks are the stage ``held-out``'s: changing how many of them a run evaluates on reruns
    no training stage.

    Reads: the suite. Writes: ``tasks.json`` (``{"train": [...]}``). Returns the number of train tasks.

    Raises:
        W2SError: the suite has fewer train tasks than the config asks for.
    """
    return _prepare_splits(ctx, cfg, {"train": cfg.tasks.train}, required=("train",))


def run_held_out(ctx: StageContext, cfg: ExperimentConfig) -> dict[str, Any]:
    """Stage ``held-out``: the first ``tasks.valid`` / ``tasks.test`` task ids of the suite's valid and test
    splits, every game prepared as in ``tasks``. Evaluation reads them (the valid tasks with ``eval.split:
    valid``), and the training stages when ``train.valid_success`` plays the valid tasks each epoch.

    Reads: the suite. Writes: ``tasks.json`` (``{"valid": [...], "test": [...]}``). Returns the number of
    tasks per split.

    Raises:
        W2SError: the suite has fewer test tasks than the config asks for.
    """
    return _prepare_splits(ctx, cfg, {"valid": cfg.tasks.valid, "test": cfg.tasks.test}, required=("test",))


def _prepare_splits(
    ctx: StageContext, cfg: ExperimentConfig, counts: dict[str, int], *, required: tuple[str, ...]
) -> dict[str, Any]:
    """The first ``counts[split]`` task ids of each split, their games prepared, written to ``tasks.json``."""
    from w2s_agents.envs.demos import suite_env, suite_task_ids

    env = suite_env(cfg.tasks.suite, **cfg.tasks.env_settings(cfg.tasks.max_steps))
    try:
        ids = {split: suite_task_ids(cfg.tasks.suite, split, env)[:n] for split, n in counts.items()}
        for split in required:
            if len(ids[split]) < counts[split]:
                raise W2SError(
                    f"tasks.{split}: suite {cfg.tasks.suite} has {len(ids[split])} {split} tasks, "
                    f"{counts[split]} asked"
                )
        env.prepare(  # makes the games
            [i for split in counts for i in ids[split]],
            workers=cfg.tasks.workers or os.cpu_count() or 1,
            timeout_s=cfg.tasks.generation_timeout_s,
        )
    finally:
        env.close()
    write_json(ctx.directory / "tasks.json", ids)
    return {split: len(v) for split, v in ids.items()}


def run_demos(ctx: StageContext, cfg: ExperimentConfig) -> dict[str, Any]:
    """Stage ``demos``: the expert trajectory of every train task, and the SFT rows of the won ones.

    ``sft.jsonl`` holds the rows of the train tasks that have demos for weak and strong SFT (the first
    ``tasks.demos`` train tasks; all of them when it is 0), ``sft-all.jsonl`` the rows of every train task (the
    ceiling's data). The other stages' expert data comes from these files only.

    Reads: ``tasks/tasks.json``. Writes: ``demos.jsonl`` (a trajectory store: a stopped run carries on with the
    tasks it lacks), ``sft.jsonl``, ``sft-all.jsonl`` and ``demos.json`` (the task ids with SFT demos). Returns
    the counts of demos, won demos and rows.
    """
    from w2s_agents.envs.demos import expert_trajectory, suite_env
    from w2s_agents.search import SftRow, write_rows
    from w2s_agents.store import TrajectoryStore

    train = task_ids(ctx, "train")
    # the expert's plan may be longer than the agents' step limit
    env = suite_env(cfg.tasks.suite, **cfg.tasks.env_settings(200))
    try:
        with TrajectoryStore(ctx.directory / "demos.jsonl") as store:
            done = {k.task_id for k in store.keys}
            for task_id in train:
                if task_id in done:
                    continue
                store.append(expert_trajectory(env, task_id))
    finally:
        env.close()
    demos = read_trajectories(ctx.directory / "demos.jsonl")
    with_demos = set(demo_task_ids(train, cfg.tasks.demos))
    system = training_system(cfg)
    rows = {d.task_id: SftRow.from_trajectory(d, system=system) for d in demos if d.success and d.steps}
    sft = [r for t, r in rows.items() if t in with_demos]
    write_rows(sft, ctx.directory / "sft.jsonl")
    write_rows(list(rows.values()), ctx.directory / "sft-all.jsonl")
    write_json(ctx.directory / "demos.json", {"sft_tasks": [t for t in train if t in with_demos]})
    return {
        "demos": len(demos),
        "won": sum(d.success for d in demos),
        "rows": len(sft),
        "rows_all": len(rows),
    }


def demo_task_ids(train: list[str], demos: int) -> list[str]:
    """The train tasks whose expert demos weak and strong SFT see: the first ``demos`` (every one when 0 or when
    ``demos`` is not below their number)."""
    return list(train[:demos] if demos else train)
