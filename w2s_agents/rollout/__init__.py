"""Rollouts: many episodes of an LLM agent in text envs, batched, resumable, optionally on Ray workers."""

from .engine import (
    AgentSpec,
    EnvPool,
    EnvSpec,
    EpisodeSpec,
    RolloutConfig,
    RolloutJobConfig,
    RolloutSummary,
    build_task_model,
    collect,
    episode_seed,
    load_job,
    plan_episodes,
    resolve_tasks,
    run_episodes,
    run_job,
    shard_episodes,
)

__all__ = [
    "AgentSpec",
    "EnvPool",
    "EnvSpec",
    "EpisodeSpec",
    "RolloutConfig",
    "RolloutJobConfig",
    "RolloutSummary",
    "build_task_model",
    "collect",
    "episode_seed",
    "load_job",
    "plan_episodes",
    "resolve_tasks",
    "run_episodes",
    "run_job",
    "shard_episodes",
]
