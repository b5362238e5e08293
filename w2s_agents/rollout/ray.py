"""Rollouts on Ray: the only module of w2s-agents that imports ``ray``.

:func:`run_shards` runs shards of episodes (see :mod:`w2s_agents.rollout.collect`) on ``W`` Ray actors. Each actor
(:class:`RolloutWorker`) loads a replica of the agent's model and keeps its envs between shards; it runs one
shard at a time with the batched engine :func:`w2s_agents.rollout.run_episodes` and streams every trajectory
back the moment it ends (a Ray generator). The driver, the process that called
:func:`w2s_agents.rollout.collect`, is the single writer of the store: it writes each trajectory once, as it
arrives.

Failures: when an actor dies (killed, out of memory, a crashed interpreter), the episodes of its shard that
had not arrived go back to the front of the queue and a new actor is started in its place (at most
``max_worker_restarts`` times in a run); an exception raised by the rollout code itself is not retried but
raised, since running it again would fail again.

Ray runs locally by default: ``ray.init`` with ``num_cpus`` for the workers, no dashboard, a short private
temporary folder (removed at the end; Ray's socket paths must stay short) and ``RAY_AUTH_MODE=disabled`` unless
set. With an address (``"auto"`` or ``"ray://host:port"``) it joins that cluster; a Ray instance already
initialised in the process is used as it is and left running.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import ray

from w2s_agents.errors import W2SError

from .engine import AgentSpec, EnvFactory, EnvPool, EpisodeSpec, run_episodes
from .options import EngineOptions, RayOptions

if TYPE_CHECKING:
    from w2s_agents.types import Trajectory

__all__ = ["RayOptions", "RolloutWorker", "ray_session", "run_shards"]  # RayOptions: from .options

logger = logging.getLogger(__name__)


def _short_tmp_root() -> str:
    """A temporary root short enough for Ray's socket paths (which are limited to ~107 bytes)."""
    root = tempfile.gettempdir()
    return root if len(root) <= 40 else "/tmp"


@contextlib.contextmanager
def ray_session(options: RayOptions) -> Iterator[None]:
    """Ray initialised for the body: joined, started locally, or the instance already running.

    A local instance gets ``num_cpus = ceil(workers * worker_cpus)``, GPUs when workers ask for them, no
    dashboard and a private temporary folder; it is shut down and its folder removed afterwards.
    """
    if ray.is_initialized():
        yield
        return
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": options.log_to_driver,
        "configure_logging": False,
    }
    tmp: str | None = None
    if options.address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if options.temp_dir is None:
            tmp = tempfile.mkdtemp(prefix="w2sray-", dir=_short_tmp_root())
        kwargs["_temp_dir"] = options.temp_dir or tmp
        kwargs["num_cpus"] = max(1, math.ceil(options.workers * options.worker_cpus))
        if options.worker_gpus > 0:
            kwargs["num_gpus"] = max(1, math.ceil(options.workers * options.worker_gpus))
    else:
        kwargs["address"] = options.address
        kwargs.pop("include_dashboard")
    logger.info("starting Ray (%s)", options.address or f"local, {kwargs.get('num_cpus')} CPUs")
    try:
        ray.init(**kwargs)
    except Exception as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise W2SError(f"cannot start Ray ({options.address or 'local instance'}): {exc}") from exc
    try:
        yield
    finally:
        ray.shutdown()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


class RolloutWorker:
    """A Ray actor running shards of episodes with its own model replica and envs.

    Args:
        agent: how to load the agent (model folder, agent config, device, dtype).
        env: how to make envs.
        max_steps: step limit of an episode.
        engine: batching and retries of :func:`~w2s_agents.rollout.run_episodes`.
        threads: torch threads of this process.
    """

    def __init__(
        self, agent: AgentSpec, env: EnvFactory, max_steps: int, engine: EngineOptions, threads: int = 1
    ) -> None:
        import torch

        from w2s_agents.log import setup_logging

        setup_logging(os.environ.get("W2S_WORKER_LOG_LEVEL", "WARNING"))
        torch.set_num_threads(threads)
        self.agent = agent.load()
        self.env = env
        self.pool = EnvPool(env.make)  # envs live as long as the worker, across shards
        self.max_steps = max_steps
        self.engine = engine

    def pid(self) -> int:
        """The worker's process id."""
        return os.getpid()

    def run(self, shard: Sequence[EpisodeSpec]) -> Iterator[Trajectory]:
        """Run a shard, yielding each trajectory as it ends."""
        yield from run_episodes(
            self.agent,
            self.env,
            shard,
            batch_size=self.engine.batch_size,
            max_steps=self.max_steps,
            episode_retries=self.engine.episode_retries,
            pool=self.pool,
        )


_DEATH = (
    ray.exceptions.RayActorError,
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.NodeDiedError,
    ray.exceptions.ObjectLostError,
    ray.exceptions.OwnerDiedError,
)

# newer Ray raises this for an actor that is restarting or unreachable
_UNAVAILABLE = tuple(c for c in [getattr(ray.exceptions, "ActorUnavailableError", None)] if c is not None)


def _is_death(exc: BaseException) -> bool:
    return isinstance(exc, (*_DEATH, *_UNAVAILABLE))


class _Slot:
    """A worker actor and the shard it is running."""

    def __init__(self, actor: Any, pid: int | None) -> None:
        self.actor = actor
        self.pid = pid
        self.shard: list[EpisodeSpec] = []
        self.arrived: set[tuple[str, str, int]] = set()


def run_shards(
    shards: Sequence[Sequence[EpisodeSpec]],
    agent: AgentSpec,
    env: EnvFactory,
    max_steps: int,
    engine: EngineOptions,
    options: RayOptions,
    write: Callable[[Trajectory], None],
    *,
    name: str,
) -> int:
    """Run ``shards`` on Ray workers, calling ``write`` (in this process) for every trajectory as it arrives.

    Args:
        shards: the episodes, in shards (each runs start to end on one worker).
        agent: how workers load the agent.
        env: how workers make envs.
        max_steps: step limit of an episode.
        engine: batching and retries of :func:`~w2s_agents.rollout.run_episodes` in each worker.
        options: workers, resources, cluster.
        write: stores one trajectory (the driver is the only writer).
        name: the agent's name (the ``model`` of episode keys).

    Returns:
        The number of workers that died (their episodes were re-run).

    Raises:
        W2SError: a worker could not start, the rollout code raised in a worker, or workers kept dying beyond
            ``max_worker_restarts``.
    """
    queue: deque[list[EpisodeSpec]] = deque(list(s) for s in shards if s)
    if not queue:
        return 0
    with ray_session(options):
        remote_cls = ray.remote(RolloutWorker).options(
            num_cpus=options.worker_cpus, num_gpus=options.worker_gpus, max_restarts=0, max_concurrency=1
        )
        threads = options.worker_threads
        restarts_left = options.max_worker_restarts
        failures = 0

        def start_workers(n: int) -> list[_Slot]:
            actors = [remote_cls.remote(agent, env, max_steps, engine, threads) for _ in range(n)]
            slots = []
            for actor in actors:
                try:
                    pid = ray.get(actor.pid.remote(), timeout=options.start_timeout_s)
                except ray.exceptions.GetTimeoutError as exc:
                    for a in actors:
                        ray.kill(a)
                    raise W2SError(
                        f"a rollout worker did not start within {options.start_timeout_s:.0f} s (does the Ray "
                        f"cluster have {options.worker_cpus} CPUs and {options.worker_gpus} GPUs free for it?)"
                    ) from exc
                except ray.exceptions.RayError as exc:
                    for a in actors:
                        ray.kill(a)
                    raise W2SError(f"a rollout worker failed to start: {_cause(exc)}") from exc
                slots.append(_Slot(actor, pid))
            logger.info("%d rollout workers ready (pids %s)", len(slots), [s.pid for s in slots])
            return slots

        idle = start_workers(min(options.workers, len(queue)))
        running: dict[Any, _Slot] = {}

        def assign() -> None:
            while idle and queue:
                slot = idle.pop()
                slot.shard = queue.popleft()
                slot.arrived = set()
                gen = slot.actor.run.options(num_returns="streaming").remote(slot.shard)
                running[gen] = slot

        assign()
        try:
            while running:
                ready, _ = ray.wait(list(running), num_returns=1)
                gen = ready[0]
                slot = running[gen]
                try:
                    ref = next(gen)
                    traj = ray.get(ref)
                except StopIteration:
                    del running[gen]
                    missing = [
                        s for s in slot.shard if (s.task_id, s.sampler.name, s.seed) not in slot.arrived
                    ]
                    if missing:  # cannot happen unless a worker skips episodes: run them again
                        logger.error(
                            "a worker finished a shard without %d of its episodes; re-queued", len(missing)
                        )
                        queue.appendleft(missing)
                    idle.append(slot)
                    assign()
                    continue
                except ray.exceptions.RayError as exc:
                    if not _is_death(exc):
                        raise W2SError(f"rollout worker (pid {slot.pid}) failed: {_cause(exc)}") from exc
                    del running[gen]
                    failures += 1
                    missing = [
                        s for s in slot.shard if (s.task_id, s.sampler.name, s.seed) not in slot.arrived
                    ]
                    logger.warning(
                        "rollout worker pid %s died (%s); %d unfinished episodes of its shard go to another worker",
                        slot.pid,
                        type(exc).__name__,
                        len(missing),
                    )
                    with contextlib.suppress(Exception):
                        ray.kill(slot.actor)
                    if missing:
                        queue.appendleft(missing)
                    if restarts_left > 0 and queue:
                        restarts_left -= 1
                        idle.extend(start_workers(1))
                    elif not running and not idle and queue:
                        left = sum(len(s) for s in queue)
                        raise W2SError(
                            f"every rollout worker died and max_worker_restarts is used up; {left} episodes "
                            "were not run (the store holds all finished ones: run again to resume)"
                        ) from exc
                    assign()
                    continue
                slot.arrived.add((traj.task_id, traj.source.sampler, traj.source.seed))
                if traj.source.model != name:
                    raise W2SError(f"a worker's agent is named {traj.source.model!r}, expected {name!r}")
                write(traj)
        finally:
            for slot in [*running.values(), *idle]:
                with contextlib.suppress(Exception):
                    ray.kill(slot.actor)
    return failures


def _cause(exc: BaseException) -> str:
    """The message of the exception a Ray error wraps (the worker's own error), on one line."""
    cause = getattr(exc, "cause", None)
    inner = cause if isinstance(cause, BaseException) else exc
    text = f"{type(inner).__name__}: {inner}"
    return " ".join(text.split())[:500]
