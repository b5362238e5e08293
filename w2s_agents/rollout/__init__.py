"""Rollouts: many episodes of an LLM agent in text envs, batched, resumable, optionally on Ray workers.

==============  =======================================================================================
``engine``      the batched engine: :func:`run_episodes` (one agent call a step for all live episodes),
                env pools, how to build envs and agents in any process (:class:`EnvFactory`)
``collect``     :func:`collect`: every missing ``(task, sampler, seed)`` episode into a store, resumable
``options``     :class:`EngineOptions` (batching, shards, retries) and :class:`RayOptions` (workers)
``ray``         the Ray workers (the only module that imports ``ray``)
``reaper``      a script that ends a local Ray instance whose driver died (standard library only)
``job``         ``w2s rollout CONFIG``: :class:`RolloutConfig`, :func:`run_job`
==============  =======================================================================================
"""

from .collect import BUILTIN_ENV_IDS, RolloutSummary, collect, env_factory
from .engine import (
    AgentSpec,
    EnvFactory,
    EnvPool,
    EpisodeSpec,
    episode_seed,
    plan_episodes,
    run_episodes,
    shard_episodes,
)
from .job import RolloutConfig, RolloutJobConfig, build_task_model, load_job, resolve_tasks, run_job
from .options import EngineOptions, RayOptions

__all__ = [
    "BUILTIN_ENV_IDS",
    "AgentSpec",
    "EngineOptions",
    "EnvFactory",
    "EnvPool",
    "EpisodeSpec",
    "RayOptions",
    "RolloutConfig",
    "RolloutJobConfig",
    "RolloutSummary",
    "build_task_model",
    "collect",
    "env_factory",
    "episode_seed",
    "load_job",
    "plan_episodes",
    "resolve_tasks",
    "run_episodes",
    "run_job",
    "shard_episodes",
]
