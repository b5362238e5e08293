"""What the stages of a run share: the files they write and read back, and the agents they play.

Files: JSON and JSONL writing (atomic), trajectory stores read back, and what earlier stages recorded (the task ids
of ``tasks``, the model folders of ``models`` and of the training stages). Agents: an agent loaded from a model
folder, episodes played into a resumable store (:func:`play_episodes`, the pipeline's one call of
:func:`w2s_agents.rollout.collect`), and the validation-success function the training stages hand to the
trainers. Also the system instruction of every training row, which the stage keys depend on.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from w2s_agents.atomic import atomic_write
from w2s_agents.messages import system_prompt
from w2s_agents.pipeline.cache import StageContext
from w2s_agents.pipeline.experiment import ExperimentConfig
from w2s_agents.types import Trajectory

if TYPE_CHECKING:
    from w2s_agents.agents import Agent, Sampler
    from w2s_agents.rollout import RayOptions, RolloutSummary
    from w2s_agents.trainers import TrainResult

__all__ = [
    "ValidFn",
    "env_id",
    "exploration_stats",
    "explore_ray",
    "load_agent",
    "model_path",
    "play_episodes",
    "plays_valid",
    "read_json",
    "read_trajectories",
    "save_model_info",
    "task_ids",
    "train_summary",
    "training_system",
    "validation_fn",
    "write_json",
]

logger = logging.getLogger(__name__)

ValidFn = Callable[[Any, Any], float]
"""Validation metric a trainer calls with ``(model, tokenizer)`` at the end of each epoch (higher is better)."""


# ------------------------------------------------------------------------------------------- files


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically (non-JSON values such as paths as their ``str``)."""
    with atomic_write(path) as fh:
        json.dump(data, fh, indent=1, default=str)
        fh.write("\n")


def read_json(path: Path) -> Any:
    """The JSON value stored in ``path``."""
    return json.loads(path.read_text(encoding="utf-8"))


def read_trajectories(path: Path) -> list[Trajectory]:
    """Every trajectory of the store at ``path`` (none when the file does not exist yet)."""
    from w2s_agents.store import read_trajectories as read_store

    return list(read_store(path)) if path.is_file() else []


def exploration_stats(trajs: Sequence[Trajectory]) -> dict[str, Any]:
    """What an exploration stage records of its episodes: counts, env steps, model tokens, mean return, and the
    sorted ids of the tasks some episode won (``solved_tasks``)."""
    solved = sorted({x.task_id for x in trajs if x.success})
    return {
        "episodes": len(trajs),
        "successes": sum(x.success for x in trajs),
        "tasks_solved": len(solved),
        "env_steps": sum(len(x.steps) for x in trajs),
        "tokens": sum((s.tokens_in or 0) + (s.tokens_out or 0) for x in trajs for s in x.steps),
        "mean_return": sum(x.return_ for x in trajs) / max(1, len(trajs)),
        "solved_tasks": solved,
    }


def task_ids(ctx: StageContext, split: str) -> list[str]:
    """The task ids of ``split`` (train / valid / test) that the ``tasks`` stage (train) or the ``held-out``
    stage (valid, test) chose."""
    stage = "tasks" if split == "train" else "held-out"
    return list(read_json(ctx.output(stage) / "tasks.json")[split])


def model_path(ctx: StageContext, name: str, *, models: str = "models") -> Path | None:
    """The model folder an earlier stage produced: ``weak`` / ``strong`` (recorded by the stage ``models``, or
    by an extra weak model's ``models-<name>``), or the stage name of a training stage (``weak-sft``,
    ``w2s-mcts``, ...). None when that training stage was skipped."""
    if name in ("weak", "strong"):
        return Path(read_json(ctx.output(models) / "models.json")[name])
    info = ctx.output(name) / "model.json"
    if not info.is_file():
        return None
    path = read_json(info).get("model_dir")
    return Path(path) if path else None


def train_summary(result: TrainResult) -> dict[str, Any]:
    """What a training stage records about its run (``model.json`` and the stage summary)."""
    return {
        "model_dir": str(result.model_dir),
        "method": result.method,
        "steps": result.steps,
        "rows": result.rows,
        "best_value": result.best_value,
        "valid_metric": result.valid_metric,
        "tokens_per_second": round(result.tokens_per_second, 1),
        "final_loss": result.loss_curve[-1][1] if result.loss_curve else None,
        # learned per-source weights (several weak supervisors); absent when the run did not learn them
        **({"source_weights": result.source_weights} if result.source_weights is not None else {}),
    }


def save_model_info(ctx: StageContext, result: TrainResult) -> dict[str, Any]:
    """Write the training summary to ``<stage>/model.json`` (where :func:`model_path` finds it) and return it."""
    info = train_summary(result)
    write_json(ctx.directory / "model.json", info)
    return info


# ------------------------------------------------------------------------------------------- prompts


def _env_class(suite: str) -> Any:
    from w2s_agents.envs.registration import env_class
    from w2s_agents.envs.suites import get_suite

    return env_class(get_suite(suite).env_id)


def training_system(cfg: ExperimentConfig) -> str:
    """The system instruction of every training row: what the agent's prompt holds apart from the per-step
    admissible list (which a multi-turn training row cannot carry; see ``agent.prompt_admissible``)."""
    grammar = _env_class(cfg.tasks.suite).command_grammar if cfg.agent.prompt_grammar else None
    return system_prompt(None, grammar or None)


# ------------------------------------------------------------------------------------------- agents


def env_id(cfg: ExperimentConfig) -> str:
    """The registered env id of the run's task suite."""
    from w2s_agents.envs.suites import get_suite

    return get_suite(cfg.tasks.suite).env_id


def load_agent(cfg: ExperimentConfig, model_dir: Path, name: str, role: str) -> Agent:
    """The run's agent (``cfg.agent``) on the model in ``model_dir``, named ``name`` in its episodes' sources."""
    from w2s_agents.agents import load_agent as load

    return load(
        model_dir, replace(cfg.agent, name=name, role=role), device=cfg.agent_device, dtype=cfg.agent_dtype
    )


def play_episodes(
    cfg: ExperimentConfig,
    agent: Agent,
    tasks: Sequence[str],
    samplers: Sequence[Sampler],
    seeds: int,
    store_path: Path,
    *,
    first_seed: int = 0,
    workers: int = 0,
    max_steps: int | None = None,
) -> tuple[list[Trajectory], RolloutSummary]:
    """Run (resumably) every (task, sampler, seed) episode of ``agent`` into the store at ``store_path``.

    Episode seeds are ``first_seed .. first_seed + seeds - 1``; episodes already in the store are not played
    again. ``workers > 0`` plays them on Ray workers (``explore.ray_address``). ``max_steps`` is the step limit
    of an episode (explorations pass ``cfg.explore_max_steps``); None: ``tasks.max_steps``.

    Returns:
        Every trajectory of the store, and the rollout's summary.
    """
    from w2s_agents.rollout import EngineOptions, collect
    from w2s_agents.store import TrajectoryStore

    limit = cfg.tasks.max_steps if max_steps is None else max_steps
    env_kwargs = cfg.tasks.env_settings(limit)
    with TrajectoryStore(store_path) as store:
        summary = collect(
            list(tasks),
            agent,
            list(samplers),
            store,
            env=env_id(cfg),
            env_kwargs=env_kwargs,
            seeds=list(range(first_seed, first_seed + seeds)),
            max_steps=limit,
            engine=EngineOptions(batch_size=cfg.explore.batch_size),
            ray=explore_ray(cfg, workers) if workers else None,
        )
    return read_trajectories(store_path), summary


def explore_ray(cfg: ExperimentConfig, workers: int) -> RayOptions:
    """The Ray workers of the run's rollouts (``explore.ray_address``, ``worker_*``, ``workers_per_node``)."""
    from w2s_agents.rollout import RayOptions

    e = cfg.explore
    return RayOptions(
        workers=workers,
        address=e.ray_address,
        address_key="explore.ray_address",
        worker_cpus=e.worker_cpus,
        worker_gpus=e.worker_gpus,
        workers_per_node=e.workers_per_node,
    )


def plays_valid(cfg: ExperimentConfig) -> bool:
    """Whether the training stages play the valid tasks each epoch (``train.valid_success`` with valid tasks):
    then they read the ``held-out`` stage and their keys hash the agent's settings."""
    return bool(cfg.train.valid_success and cfg.tasks.valid)


def validation_fn(cfg: ExperimentConfig, ctx: StageContext) -> ValidFn | None:
    """Validation success on the valid tasks (one greedy episode each) of the model being trained, for the
    trainers' ``valid_fn``, with the stage's folder as the work folder; None unless :func:`plays_valid`."""
    if not plays_valid(cfg):
        return None
    tasks = task_ids(ctx, "valid")
    work = ctx.directory
    from w2s_agents.agents import Agent, LoadedModel, Sampler
    from w2s_agents.rollout import EnvFactory, plan_episodes, run_episodes

    calls = [0]

    def valid(model: Any, tokenizer: Any) -> float:
        calls[0] += 1
        was_training = model.training
        model.eval()
        try:
            device = next(model.parameters()).device
            dtype = next(model.parameters()).dtype
            lm = LoadedModel(model, tokenizer, work, device, dtype)
            agent = Agent(lm, replace(cfg.agent, name="valid", role="strong"))
            env = EnvFactory(env_id(cfg), cfg.tasks.env_settings(cfg.tasks.max_steps))
            eps = plan_episodes(list(tasks), [Sampler(temperature=0.0)], [0])
            trajs = list(
                run_episodes(
                    agent, env, eps, batch_size=cfg.explore.batch_size, max_steps=cfg.tasks.max_steps
                )
            )
        finally:
            model.train(was_training)
        value = sum(t.success for t in trajs) / max(1, len(trajs))
        logger.info("validation %d: success %.3f on %d valid tasks", calls[0], value, len(trajs))
        return value

    return valid
