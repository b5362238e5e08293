"""How rollouts run, apart from what they run: the batched engine's settings and the Ray workers'.

Both are plain frozen dataclasses, built from a :class:`~w2s_agents.rollout.RolloutConfig` (``engine()``,
``ray()``) or by hand, and passed to :func:`~w2s_agents.rollout.collect` as they are. This module imports
neither torch nor ray.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EngineOptions", "RayOptions"]


@dataclass(frozen=True)
class EngineOptions:
    """How the batched engine runs a list of episodes (:func:`~w2s_agents.rollout.run_episodes`)."""

    batch_size: int = 16
    """Live episodes per batched agent call (per worker)."""
    shard_size: int = 64
    """Episodes per unit of work: a process runs a shard start to end."""
    episode_retries: int = 2
    """Restarts of an episode whose env raised, before it is stored as an error."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.shard_size < 1 or self.episode_retries < 0:
            raise ValueError(
                "batch_size and shard_size must be >= 1 and episode_retries >= 0, got "
                f"{self.batch_size}, {self.shard_size}, {self.episode_retries}"
            )


@dataclass(frozen=True)
class RayOptions:
    """Where and how the Ray workers run (``workers == 0``: everything in this process)."""

    workers: int = 2
    address: str | None = None
    """Cluster to join; None starts a local instance (unless Ray is already initialised here)."""
    worker_cpus: float = 1.0
    worker_gpus: float = 0.0
    worker_threads: int = 1
    """torch threads per worker."""
    max_worker_restarts: int = 4
    log_to_driver: bool = False
    temp_dir: str | None = None
    """Ray's temporary folder for a local instance; None: a fresh short folder removed at the end."""
    start_timeout_s: float = 600.0
    """How long a worker may take to start (load its model) before the run fails; a cluster without the CPUs or
    GPUs asked for would otherwise wait for ever."""
