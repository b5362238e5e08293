"""How rollouts run, apart from what they run: the batched engine's settings and the Ray workers'.

Both are plain frozen dataclasses, built from a :class:`~w2s_agents.rollout.RolloutConfig` (``engine()``,
``ray()``) or by hand, and passed to :func:`~w2s_agents.rollout.collect` as they are. This module imports
neither torch nor ray.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EngineOptions", "RayOptions", "gpu_share_ok"]


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
    """Cluster to join (``"auto"``, ``"host:port"`` or ``"ray://host:port"``); None: the ``RAY_ADDRESS``
    environment variable if set (the option wins over the variable), else a local instance (unless Ray is already
    initialised here)."""
    address_key: str = "address"
    """The config key that set ``address``, named in errors (e.g. ``rollout.ray_address``)."""
    worker_cpus: float = 1.0
    worker_gpus: float = 0.0
    """GPUs per worker: a fraction below 1 shares a GPU between workers (0.5: two per GPU), whole numbers above."""
    workers_per_node: int = 0
    """At most this many workers on each node of the cluster, each pinned to its node (0: Ray places them)."""
    worker_threads: int = 1
    """torch threads per worker."""
    max_worker_restarts: int = 4
    log_to_driver: bool = False
    temp_dir: str | None = None
    """Ray's temporary folder for a local instance; None: a fresh short folder removed at the end."""
    start_timeout_s: float = 600.0
    """How long a worker may take to start (load its model) before the run fails; a cluster without the CPUs or
    GPUs asked for would otherwise wait for ever."""

    def __post_init__(self) -> None:
        if self.workers < 0 or self.workers_per_node < 0 or self.worker_cpus <= 0 or self.worker_gpus < 0:
            raise ValueError(
                "workers and workers_per_node must be >= 0, worker_cpus > 0 and worker_gpus >= 0, got "
                f"{self.workers}, {self.workers_per_node}, {self.worker_cpus}, {self.worker_gpus}"
            )
        if not gpu_share_ok(self.worker_gpus):
            raise ValueError(
                f"worker_gpus must be a fraction below 1 or a whole number, got {self.worker_gpus}"
            )


def gpu_share_ok(gpus: float) -> bool:
    """Whether Ray accepts ``gpus`` as an actor's GPU request: a fraction below 1 or a whole number."""
    return gpus < 1 or float(gpus).is_integer()
