"""Collecting episodes into a store: every missing ``(task, sampler, seed)``, resumable, in-process or on Ray.

:func:`collect` runs every episode that the store does not hold yet and writes each trajectory the moment it
ends (one fsynced line; :class:`w2s_agents.store.TrajectoryStore`), so a killed run resumes where it stopped
without losing or duplicating an episode::

    agent = Agent(load_model("models/weak"), AgentConfig(mode="choose"))
    with TrajectoryStore("runs/x/trajectories.jsonl") as store:
        summary = collect(tasks, agent, [Sampler(temperature=0.7, top_p=0.95)], store, seeds=4, max_steps=30)

Work is cut into fixed shards of ``engine.shard_size`` consecutive episodes (tasks, then samplers, then seeds),
each run start to end by one batched engine (:func:`~w2s_agents.rollout.run_episodes`). Since the shards and the
order inside them do not depend on how many processes run them, the same seeds give the same trajectories
in-process and on Ray with any number of workers. (Only a shard re-run after a crash or a resume batches its
remaining episodes differently, which changes model outputs by float rounding, ~1e-6, and so very rarely a
sampled action.)

With ``ray.workers >= 1`` the shards run on Ray (:mod:`w2s_agents.rollout.ray`): each worker holds a model
replica and its envs; the driver is the only writer of the store; a worker that dies has its unfinished
episodes re-run on another (new) worker.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from w2s_agents.agents import Agent, AgentConfig, Sampler
from w2s_agents.errors import W2SError
from w2s_agents.log import progress
from w2s_agents.types import Trajectory

from .engine import AgentSpec, EnvFactory, EnvPool, plan_episodes, run_episodes, shard_episodes
from .options import EngineOptions, RayOptions

if TYPE_CHECKING:
    from w2s_agents.store import TrajectoryStore

__all__ = ["BUILTIN_ENV_IDS", "RolloutSummary", "collect", "env_factory"]

logger = logging.getLogger(__name__)

BUILTIN_ENV_IDS = ("w2s/TextWorld-v0", "w2s/ScienceWorld-v0", "w2s/TextWorldExpress-v0")
"""Envs of this package, whose constructor arguments a rollout sets from the agent's needs."""


@dataclass
class RolloutSummary:
    """What a :func:`collect` call did."""

    planned: int = 0
    """Episodes asked for (tasks x samplers x seeds)."""
    episodes: int = 0
    """Episodes run and stored by this call."""
    skipped: int = 0
    """Episodes already in the store, not run again."""
    steps: int = 0
    successes: int = 0
    return_sum: float = 0.0
    errors: int = 0
    """Episodes stored with ``end: error``."""
    unparseable: int = 0
    """Steps whose generated answer held no action."""
    tokens_in: int = 0
    tokens_out: int = 0
    wall_s: float = 0.0
    workers: int = 0
    """Ray workers used (0: in this process)."""
    worker_failures: int = 0
    """Ray workers that died and had their episodes re-run elsewhere."""
    ends: dict[str, int] = field(default_factory=dict)

    @property
    def success_rate(self) -> float:
        """Share of this call's episodes that were won."""
        return self.successes / self.episodes if self.episodes else 0.0

    @property
    def mean_return(self) -> float:
        """Mean return of this call's episodes."""
        return self.return_sum / self.episodes if self.episodes else 0.0

    @property
    def steps_per_s(self) -> float:
        """Env steps per second of wall time."""
        return self.steps / self.wall_s if self.wall_s > 0 else 0.0

    def add(self, traj: Trajectory) -> None:
        """Count a stored trajectory."""
        self.episodes += 1
        self.steps += traj.num_steps
        self.successes += traj.success
        self.return_sum += traj.return_
        self.errors += traj.end == "error"
        self.ends[traj.end] = self.ends.get(traj.end, 0) + 1
        for s in traj.steps:
            self.tokens_in += s.tokens_in
            self.tokens_out += s.tokens_out
            self.unparseable += "parse_error" in s.extra

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready mapping with the derived rates."""
        return {
            "planned": self.planned,
            "episodes": self.episodes,
            "skipped": self.skipped,
            "steps": self.steps,
            "successes": self.successes,
            "success_rate": self.success_rate,
            "mean_return": self.mean_return,
            "errors": self.errors,
            "unparseable_steps": self.unparseable,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "wall_s": self.wall_s,
            "steps_per_s": self.steps_per_s,
            "workers": self.workers,
            "worker_failures": self.worker_failures,
            "ends": dict(self.ends),
        }


@contextlib.contextmanager
def _stops_held() -> Iterator[None]:
    """SIGTERM and SIGINT held during the body (in the main thread, for signals with a Python-level handler): one
    that arrives meanwhile goes to the handler that was installed as soon as the body ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[tuple[int, Any]] = []

    def hold(signum: int, frame: Any) -> None:
        held.append((signum, frame))

    sigs = [sig for sig in (signal.SIGTERM, signal.SIGINT) if signal.getsignal(sig) is not None]
    before = {sig: signal.signal(sig, hold) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        for signum, frame in held[:1]:
            handler = before[signum]
            if callable(handler):
                handler(signum, frame)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)


def env_factory(
    env: str | EnvFactory,
    env_kwargs: Mapping[str, Any] | None,
    agent_config: AgentConfig,
    max_steps: int,
    tasks: Sequence[str],
) -> EnvFactory:
    """The env factory of a rollout: built-in envs get the step limit, admissible commands when the agent uses
    them and no expert plan (``env_kwargs`` override these); the suites of the tasks travel with it (for Ray
    workers)."""
    if isinstance(env, EnvFactory):
        if env_kwargs:
            raise ValueError("give env_kwargs inside the EnvFactory, not beside it")
        return env
    kwargs: dict[str, Any] = {}
    if env in BUILTIN_ENV_IDS:
        cfg = agent_config
        kwargs = {
            "max_steps": max_steps,
            "admissible_commands": cfg.mode == "choose" or cfg.prompt_admissible,
            "expert_plan": False,
        }
    kwargs.update(env_kwargs or {})
    from w2s_agents.envs.suites import get_suite, suite_names

    known = set(suite_names())
    suites = tuple(get_suite(n) for n in sorted({t.split("/", 1)[0] for t in tasks} & known))
    return EnvFactory(env, kwargs, suites)


def collect(
    tasks: Sequence[str],
    agent: Agent,
    samplers: Sequence[Sampler],
    store: TrajectoryStore,
    *,
    env: str | EnvFactory | Callable[[], Any] = "w2s/TextWorld-v0",
    env_kwargs: Mapping[str, Any] | None = None,
    seeds: int | Sequence[int] = 1,
    max_steps: int = 50,
    engine: EngineOptions | None = None,
    ray: RayOptions | None = None,
    on_episode: Callable[[Trajectory, RolloutSummary], None] | None = None,
    summary: RolloutSummary | None = None,
) -> RolloutSummary:
    """Run every (task, sampler, seed) episode that ``store`` lacks and append each as it ends.

    Args:
        tasks: task ids of the env.
        agent: the acting agent; its name is the ``model`` of the episode keys.
        samplers: sampling settings (distinct names).
        store: the open trajectory store (this process is its only writer).
        env: env id (built-in envs get ``max_steps``, admissible commands as the agent needs them and no expert
            plan, overridable by ``env_kwargs``), an :class:`EnvFactory`, or an env factory (in-process only).
        env_kwargs: env constructor arguments (with an env id).
        seeds: number of seeds (``0 .. seeds - 1``) or the seeds themselves.
        max_steps: step limit of an episode.
        engine: batching, sharding and retries (default :class:`EngineOptions`).
        ray: Ray workers; None (or ``workers == 0``) runs everything in this process.
        on_episode: called after each trajectory is stored, with the running summary.
        summary: a fresh :class:`RolloutSummary` to count into as episodes are stored (and to return), so that a
            caller whose call was interrupted (SIGTERM, Ctrl-C) still has what it did; None: a new one.

    Returns:
        The :class:`RolloutSummary` of this call.

    Raises:
        W2SError: bad arguments, or every Ray worker died and no replacement may be started (the store keeps
            every finished episode; run again to resume).
    """
    start = time.perf_counter()
    engine = engine or EngineOptions()
    workers = ray.workers if ray is not None else 0
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not tasks:
        raise W2SError("collect needs at least one task")
    if not samplers:
        raise W2SError("collect needs at least one sampler")
    if not seed_list:
        raise W2SError("collect needs at least one seed")
    for what, values in (
        ("task", list(tasks)),
        ("sampler name", [s.name for s in samplers]),
        ("seed", seed_list),
    ):
        if len(set(values)) != len(values):
            raise W2SError(f"each {what} must be given once, got {values}")
    planned = plan_episodes(tasks, samplers, seed_list)
    done = store.keys
    shards = [
        [spec for spec in shard if spec.key(agent.name) not in done]
        for shard in shard_episodes(planned, engine.shard_size)
    ]
    shards = [s for s in shards if s]
    todo = sum(len(s) for s in shards)
    summary = summary if summary is not None else RolloutSummary()
    summary.planned, summary.skipped, summary.workers = len(planned), len(planned) - todo, workers
    wanted = {spec.key(agent.name) for shard in shards for spec in shard}
    if summary.skipped:
        logger.info(
            "%d of %d episodes are already in %s; running the other %d",
            summary.skipped,
            len(planned),
            store.path,
            todo,
        )
    if not todo:
        summary.wall_s = time.perf_counter() - start
        return summary

    bar = progress(total=todo, desc="rollout", unit="ep")

    def write(traj: Trajectory) -> None:
        key = traj.key
        if key not in wanted:
            raise W2SError(f"a worker returned an episode that was not asked for: {key}")
        if key in store:
            logger.warning("episode %s arrived twice; the second copy is dropped", key)
            return
        with _stops_held():  # stored and counted together: the summary of a stopped run matches the store
            store.append(traj)
            summary.add(traj)
        bar.update(1)
        elapsed = time.perf_counter() - start
        bar.set_postfix(
            steps_s=f"{summary.steps / elapsed:.1f}", success=f"{summary.success_rate:.2f}", refresh=False
        )
        if on_episode is not None:
            on_episode(traj, summary)

    try:
        if ray is None or workers == 0:
            if isinstance(env, (str, EnvFactory)):
                source: EnvFactory | Callable[[], Any] = env_factory(
                    env, env_kwargs, agent.config, max_steps, tasks
                )
            else:
                source = env
            pool = EnvPool(source.make if isinstance(source, EnvFactory) else source)
            try:
                for shard in shards:
                    for traj in run_episodes(
                        agent,
                        source,
                        shard,
                        batch_size=engine.batch_size,
                        max_steps=max_steps,
                        episode_retries=engine.episode_retries,
                        pool=pool,
                    ):
                        write(traj)
            finally:
                pool.close()
        else:
            if not isinstance(env, (str, EnvFactory)):
                raise W2SError(
                    "Ray workers build their envs from an env id or an EnvFactory, not from a callable"
                )
            from w2s_agents.rollout.ray import run_shards

            factory = env_factory(env, env_kwargs, agent.config, max_steps, tasks)
            agent_spec = AgentSpec(
                model_path=str(agent.model_path),
                config=replace(agent.config, name=agent.name),
                device="cuda" if ray.worker_gpus > 0 else "cpu",
                dtype="auto" if ray.worker_gpus > 0 else "float32",
            )
            summary.worker_failures = run_shards(
                shards, agent_spec, factory, max_steps, engine, ray, write, name=agent.name
            )
    finally:
        bar.close()
        summary.wall_s = time.perf_counter() - start
    logger.info(
        "rollout: %d episodes (%d skipped), %d steps, success %.3f, mean return %.3f, %.1f steps/s",
        summary.episodes,
        summary.skipped,
        summary.steps,
        summary.success_rate,
        summary.mean_return,
        summary.steps_per_s,
    )
    return summary
