"""The paper's strong-SFT baselines: ``strong-explore`` (the strong SFT agent's own episodes on the train tasks),
``eto`` (strong SFT + ETO) and ``best-of-n`` (strong SFT + Best-of-N).

Both baselines improve the strong SFT agent from its own samples, without the weak agent. ETO (Song et al. 2024)
pairs each demo task's expert trajectory (chosen) with the strong SFT agent's failed trajectories of that task
(rejected), the pairs the ceiling's data is built with (``expert_failure_pairs``), and trains DPO from the strong
SFT agent against itself as the reference. Best-of-N uses only the env's reward, like the weak agent's
exploration: per train task the best of the agent's first N samples that succeeded (highest return, then fewest
steps) becomes an SFT row, and the strong SFT agent is fine-tuned on those rows.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from w2s_agents.pipeline.cache import StageContext
from w2s_agents.pipeline.experiment import ExperimentConfig
from w2s_agents.pipeline.stage_io import (
    exploration_stats,
    load_agent,
    model_path,
    play_episodes,
    read_json,
    read_trajectories,
    save_model_info,
    task_ids,
    training_system,
    validation_fn,
    write_json,
)
from w2s_agents.pipeline.tracking import rollout_scalars, stage_tracking, track_stage
from w2s_agents.seeding import derive_seed
from w2s_agents.trainers import TrainConfig
from w2s_agents.types import Trajectory

__all__ = ["best_of_n", "run_best_of_n", "run_eto", "run_strong_explore"]

logger = logging.getLogger(__name__)


def _skipped(ctx: StageContext, why: str) -> dict[str, Any]:
    """Record that the stage trained nothing, and why (the stages after it treat the model as absent)."""
    logger.warning("%s: skipped (%s)", ctx.name, why)
    write_json(ctx.directory / "model.json", {"skipped": why})
    return {"skipped": why}


def run_strong_explore(ctx: StageContext, cfg: ExperimentConfig, seed: int) -> dict[str, Any]:
    """Stage ``strong-explore``: the strong SFT agent on every train task under every sampler of
    ``explore.samplers``, ``explore.seeds`` episodes each (the weak agent's exploration settings), in this
    process or on ``explore.workers`` Ray workers. Its episodes carry the model name ``strong-sft`` and the role
    ``strong``; ETO takes its failures, Best-of-N its successes.

    Reads: ``strong-sft/model.json``, the train task ids. Writes: ``trajectories.jsonl`` (resumable) and
    ``explore.json``. Returns episodes, successes, tasks solved, env steps and mean return.
    """
    path = model_path(ctx, "strong-sft")
    assert path is not None, "the strong-sft stage always records a model"
    agent = load_agent(cfg, path, "strong-sft", "strong")
    trajs, _ = play_episodes(
        cfg,
        agent,
        task_ids(ctx, "train"),
        cfg.explore.samplers,
        cfg.explore.seeds,
        ctx.directory / "trajectories.jsonl",
        first_seed=derive_seed(seed, "strong-explore") % 1_000_000,
        workers=cfg.explore.workers,
        max_steps=cfg.explore_max_steps,
    )
    stats = exploration_stats(trajs)
    solved = stats.pop("solved_tasks")
    write_json(ctx.directory / "explore.json", {**stats, "solved_tasks": solved})
    track_stage(ctx, cfg, seed, rollout_scalars(stats))
    return stats


def run_eto(ctx: StageContext, cfg: ExperimentConfig, seed: int, *, train: TrainConfig) -> dict[str, Any]:
    """Stage ``eto`` (strong SFT + ETO): trajectory-level pairs on the demo tasks, chosen = the expert demo,
    rejected = a failed episode of the strong SFT agent on that task (at most ``search.pairs_per_node`` per task,
    at least ``search.margin`` lower in return, as the ceiling's pairs), then DPO (``train``, the experiment's
    ``train.eto``) from the strong SFT agent with the strong SFT agent as the reference. Skipped without pairs.

    Reads: ``demos/demos.jsonl``, ``demos/demos.json`` (the demo tasks), ``strong-explore/trajectories.jsonl``,
    ``strong-sft/model.json``, the valid task ids. Writes: ``pairs.jsonl``, ``train/`` and ``model.json``.
    Returns the pair count and the training summary.
    """
    from w2s_agents.search import expert_failure_pairs, write_rows
    from w2s_agents.trainers import train_dpo

    demo_tasks = set(read_json(ctx.output("demos") / "demos.json")["sft_tasks"])
    expert = [t for t in read_trajectories(ctx.output("demos") / "demos.jsonl") if t.task_id in demo_tasks]
    own = read_trajectories(ctx.output("strong-explore") / "trajectories.jsonl")
    pairs = expert_failure_pairs(
        expert + own,
        margin=cfg.search.margin,
        per_task=cfg.search.pairs_per_node,
        system=training_system(cfg),
    )
    data = ctx.directory / "pairs.jsonl"
    n = write_rows(pairs, data)
    start = model_path(ctx, "strong-sft")
    if n == 0 or start is None:
        return {"pairs": n, **_skipped(ctx, "no preference pairs" if n == 0 else "no strong-sft model")}
    result = train_dpo(
        start,
        data,
        ctx.directory / "train",
        replace(train, method="dpo", seed=derive_seed(seed, ctx.name)),
        reference_path=start,
        valid_fn=validation_fn(cfg, ctx),
        tracking=stage_tracking(ctx, cfg, seed, train.report_to),
    )
    return {"pairs": n, **save_model_info(ctx, result)}


def best_of_n(
    trajectories: Sequence[Trajectory], samplers: Sequence[str], n: int = 0
) -> dict[str, Trajectory]:
    """The Best-of-N choice: per task, the best successful episode among its first ``n`` (0: all).

    A task's episodes are ordered seed by seed, each seed under every sampler in the order of ``samplers`` (the
    sampler names of ``explore.samplers``); the first ``n`` are the candidates. Of those that succeeded the best
    has the highest return, then the fewest steps, then the smallest episode key. Tasks without a successful
    candidate are left out.

    Returns:
        Task id -> the chosen trajectory, in task order.
    """
    rank = {name: i for i, name in enumerate(samplers)}
    by_task: dict[str, list[Trajectory]] = {}
    for t in trajectories:
        by_task.setdefault(t.task_id, []).append(t)
    chosen: dict[str, Trajectory] = {}
    for task_id in sorted(by_task):
        episodes = sorted(
            by_task[task_id],
            key=lambda t: (t.source.seed or 0, rank.get(t.source.sampler, len(rank)), str(t.key)),
        )
        won = [t for t in (episodes[:n] if n else episodes) if t.success and t.steps]
        if won:
            chosen[task_id] = min(won, key=lambda t: (-t.return_, len(t.steps), str(t.key)))
    return chosen


def run_best_of_n(
    ctx: StageContext, cfg: ExperimentConfig, seed: int, *, train: TrainConfig
) -> dict[str, Any]:
    """Stage ``best-of-n`` (strong SFT + Best-of-N): per train task the best successful episode of the strong SFT
    agent among its first ``train.best_of_n_samples`` (:func:`best_of_n`) as an SFT row, then SFT (``train``,
    the experiment's ``train.best_of_n``) from the strong SFT agent. Skipped when no episode succeeded.

    Reads: ``strong-explore/trajectories.jsonl``, ``strong-sft/model.json``, the valid task ids. Writes:
    ``sft.jsonl``, ``best_of_n.json`` (per task: the chosen episode, its return and steps), ``train/`` and
    ``model.json``. Returns the row count and the training summary.
    """
    from w2s_agents.search import SftRow, write_rows
    from w2s_agents.trainers import train_sft

    trajs = read_trajectories(ctx.output("strong-explore") / "trajectories.jsonl")
    chosen = best_of_n(trajs, [s.name for s in cfg.explore.samplers], cfg.train.best_of_n_samples)
    system = training_system(cfg)
    data = ctx.directory / "sft.jsonl"
    n = write_rows([SftRow.from_trajectory(t, system=system) for t in chosen.values()], data)
    write_json(
        ctx.directory / "best_of_n.json",
        [
            {"task_id": task, "episode": str(t.key), "return": t.return_, "steps": len(t.steps)}
            for task, t in chosen.items()
        ],
    )
    start = model_path(ctx, "strong-sft")
    if n == 0 or start is None:
        return {"rows": n, **_skipped(ctx, "no successful sample" if n == 0 else "no strong-sft model")}
    result = train_sft(
        start,
        data,
        ctx.directory / "train",
        replace(train, method="sft", seed=derive_seed(seed, ctx.name)),
        valid_fn=validation_fn(cfg, ctx),
        tracking=stage_tracking(ctx, cfg, seed, train.report_to),
    )
    return {"rows": n, **save_model_info(ctx, result)}
