"""The rollout engine: many episodes of an LLM agent in text envs, batched, resumable, optionally on Ray.

:func:`collect` runs every episode ``(task, sampler, seed)`` that the store does not hold yet and writes each
trajectory the moment it ends (one fsynced line; :class:`w2s_agents.store.TrajectoryStore`), so a killed run
resumes where it stopped without losing or duplicating an episode::

    agent = Agent(load_model("models/weak"), AgentConfig(mode="choose"))
    with TrajectoryStore("runs/x/trajectories.jsonl") as store:
        summary = collect(tasks, agent, [Sampler(temperature=0.7, top_p=0.95)], store, seeds=4, max_steps=30)

How episodes run (:func:`run_episodes`): up to ``batch_size`` episodes are live at once, each in its own env;
every step, one batched agent call decides the next action of all of them; an episode that ends frees its slot
for the next one. Each episode samples from its own random stream seeded with
``derive_seed(seed, task_id, sampler.name)``.

Work is cut into fixed shards of ``shard_size`` consecutive episodes (tasks, then samplers, then seeds), each run
start to end by one batched engine. Since the shards and the order inside them do not depend on how many
processes run them, the same seeds give the same trajectories in-process and on Ray with any number of workers.
(Only a shard re-run after a crash or a resume batches its remaining episodes differently, which changes model
outputs by float rounding, ~1e-6, and so very rarely a sampled action.)

With ``workers >= 1`` the shards run on Ray (:mod:`w2s_agents.rollout.ray`): each worker holds a model replica
and its envs; the driver is the only writer of the store; a worker that dies has its unfinished episodes re-run
on another (new) worker.

An env that raises in ``reset`` or ``step`` is replaced and its episode restarted from scratch
(``episode_retries`` times); an episode that keeps failing is stored with ``end: error`` and the error message in
``extra.error``. An env that cannot be made, or a :class:`~w2s_agents.errors.W2SError` from ``reset`` (an unknown
task id), stops the run instead: it would fail every episode the same way.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from w2s_agents.agents.agent import Agent, AgentConfig, Decision, EpisodeState, Sampler
from w2s_agents.atomic import atomic_write
from w2s_agents.config import check, config_to_dict, load_yaml, option, save_config
from w2s_agents.errors import ConfigError, W2SError
from w2s_agents.pipeline.experiment import RunConfig
from w2s_agents.log import progress
from w2s_agents.agents.models import ModelConfig
from w2s_agents.seeding import derive_seed
from w2s_agents.types import EpisodeKey, Source, Step, Trajectory

if TYPE_CHECKING:
    from w2s_agents.store import TrajectoryStore

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

logger = logging.getLogger(__name__)

BUILTIN_ENV_IDS = ("w2s/TextWorld-v0", "w2s/ScienceWorld-v0")


# ------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class RolloutConfig:
    """Which episodes to run and how (a section of a bigger experiment config)."""

    suite: str = option("tw-simple", "task suite (`w2s envs suites`)")
    split: Literal["train", "valid", "test"] = option("train", "split of the suite")
    tasks: int | None = option(None, "run the first N tasks of the split; null: all of them")
    task_ids: list[str] = option(
        default_factory=list,
        help="explicit task ids (overrides suite tasks and 'tasks'; 'suite' picks the env)",
    )
    samplers: list[Sampler] = option(
        default_factory=lambda: [Sampler(temperature=0.0)],
        help="sampling settings (tree width = their number); each {name, temperature, top_p}",
    )
    seeds: int = option(1, "episodes per task and sampler, with seeds first_seed .. first_seed + seeds - 1")
    first_seed: int = option(0, "first episode seed")
    max_steps: int = option(50, "step limit of an episode")
    batch_size: int = option(16, "live episodes per batched agent call (per worker)")
    shard_size: int = option(64, "episodes per unit of work (a worker runs a shard start to end)")
    episode_retries: int = option(
        2, "restarts of an episode whose env raised before it is stored as an error"
    )
    env_kwargs: dict[str, Any] = option(
        default_factory=dict,
        help="env constructor arguments; built-in envs default to max_steps, admissible_commands and no expert plan",
    )
    output: Path | None = option(None, "trajectory file; null: <run dir>/trajectories.jsonl")
    threads: int = option(
        1, "torch threads of this process (0: torch's default); scale a CPU rollout with workers instead"
    )
    workers: int = option(0, "Ray workers (each with a model replica and envs); 0 runs in this process")
    ray_address: str | None = option(
        None, "address of a running Ray cluster ('auto' finds a local one); null starts a local instance"
    )
    worker_cpus: float = option(1.0, "CPUs reserved per Ray worker")
    worker_gpus: float = option(0.0, "GPUs per Ray worker (> 0 loads the worker's model on CUDA)")
    worker_threads: int = option(1, "torch threads of each Ray worker")
    max_worker_restarts: int = option(4, "workers started to replace dead ones before the run gives up")
    ray_log_to_driver: bool = option(False, "show Ray workers' output in this process")

    def __post_init__(self) -> None:
        check(self.tasks is None or self.tasks >= 1, "tasks", f"must be >= 1 or null, got {self.tasks}")
        check(len(self.samplers) >= 1, "samplers", "must list at least one sampler")
        names = [s.name for s in self.samplers]
        check(len(set(names)) == len(names), "samplers", f"names must be unique, got {names}")
        check(self.seeds >= 1, "seeds", f"must be >= 1, got {self.seeds}")
        check(self.first_seed >= 0, "first_seed", f"must be >= 0, got {self.first_seed}")
        check(self.max_steps >= 1, "max_steps", f"must be >= 1, got {self.max_steps}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.shard_size >= 1, "shard_size", f"must be >= 1, got {self.shard_size}")
        check(self.episode_retries >= 0, "episode_retries", f"must be >= 0, got {self.episode_retries}")
        check(self.threads >= 0, "threads", f"must be >= 0, got {self.threads}")
        check(self.workers >= 0, "workers", f"must be >= 0, got {self.workers}")
        check(self.worker_cpus > 0, "worker_cpus", f"must be > 0, got {self.worker_cpus}")
        check(self.worker_gpus >= 0, "worker_gpus", f"must be >= 0, got {self.worker_gpus}")
        check(self.worker_threads >= 1, "worker_threads", f"must be >= 1, got {self.worker_threads}")
        check(
            self.max_worker_restarts >= 0,
            "max_worker_restarts",
            f"must be >= 0, got {self.max_worker_restarts}",
        )
        check(len(set(self.task_ids)) == len(self.task_ids), "task_ids", "must not repeat a task")

    @property
    def seed_list(self) -> list[int]:
        """The episode seeds of every (task, sampler)."""
        return list(range(self.first_seed, self.first_seed + self.seeds))


# ------------------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class EnvSpec:
    """How to make an env, in any process (picklable; Ray workers build their envs from it).

    ``suites`` are registered (``register_suite``) before the env is made, so a suite defined in the driver
    also exists in a worker process.
    """

    env_id: str = "w2s/TextWorld-v0"
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    suites: tuple[Any, ...] = ()

    def make(self) -> Any:
        """A new env (the gymnasium-wrapped env of :func:`w2s_agents.envs.make_env`)."""
        from w2s_agents.envs import make_env
        from w2s_agents.envs.suites import register_suite

        for suite in self.suites:
            register_suite(suite)
        return make_env(self.env_id, **dict(self.kwargs))


@dataclass(frozen=True)
class AgentSpec:
    """How to rebuild an agent in another process: load the model folder again with the same settings."""

    model_path: str
    config: AgentConfig
    device: str = "cpu"
    dtype: str = "float32"

    def load(self) -> Agent:
        """Load the model (and amateur) and build the agent."""
        from w2s_agents.agents.models import load_model

        return Agent(load_model(self.model_path, device=self.device, dtype=self.dtype), self.config)


@dataclass(frozen=True, order=True)
class EpisodeSpec:
    """One episode to run: a task, a sampling setting and a seed."""

    task_id: str
    sampler: Sampler = field(compare=False)
    seed: int
    sampler_name: str = field(init=False, default="")
    """The sampler's name (what episodes are ordered and keyed by)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "sampler_name", self.sampler.name)

    def key(self, model: str) -> EpisodeKey:
        """The store key of this episode for the agent named ``model``."""
        return EpisodeKey(self.task_id, model, self.sampler.name, self.seed)


def episode_seed(task_id: str, sampler_name: str, seed: int) -> int:
    """Seed of an episode's random stream: ``derive_seed(seed, task_id, sampler_name)``."""
    return derive_seed(seed, task_id, sampler_name)


def plan_episodes(
    tasks: Sequence[str], samplers: Sequence[Sampler], seeds: Sequence[int]
) -> list[EpisodeSpec]:
    """Every (task, sampler, seed) in run order: tasks, then samplers, then seeds."""
    return [EpisodeSpec(t, s, seed) for t in tasks for s in samplers for seed in seeds]


def shard_episodes(episodes: Sequence[EpisodeSpec], shard_size: int) -> list[list[EpisodeSpec]]:
    """Consecutive chunks of ``shard_size`` episodes (the last may be shorter)."""
    return [list(episodes[i : i + shard_size]) for i in range(0, len(episodes), shard_size)]


# ------------------------------------------------------------------------------------------- engine


class _Live:
    """A running episode and its env slot."""

    __slots__ = (
        "admissible",
        "attempt",
        "env",
        "env_id",
        "grammar",
        "initial",
        "instruction",
        "rng",
        "spec",
        "steps",
        "turns",
    )

    def __init__(self, spec: EpisodeSpec, attempt: int, env_id: str) -> None:
        self.spec = spec
        self.attempt = attempt
        self.rng = random.Random(episode_seed(spec.task_id, spec.sampler.name, spec.seed))
        self.env: Any = None
        self.env_id = env_id
        self.grammar: str | None = None
        self.instruction = ""
        self.initial = ""
        self.turns: list[tuple[str, str, str]] = []
        self.admissible: tuple[str, ...] | None = None
        self.steps: list[Step] = []

    def state(self) -> EpisodeState:
        return EpisodeState(self.instruction, self.initial, tuple(self.turns), self.admissible, self.grammar)


def _admissible(info: Mapping[str, Any]) -> tuple[str, ...] | None:
    adm = info.get("admissible_commands")
    return tuple(adm) if adm is not None else None


def _step_record(live: _Live, d: Decision, obs: str, reward: float, info: Mapping[str, Any]) -> Step:
    extra: dict[str, Any] = {}
    if not d.parse_ok:
        extra = {"raw_output": d.raw_output, "parse_error": d.parse_error}
    return Step(
        action=d.action,
        observation=obs,
        reward=float(reward),
        score=float(info.get("score", 0.0)),
        thought=d.thought,
        admissible=live.admissible,
        tokens_in=d.tokens_in,
        tokens_out=d.tokens_out,
        latency_s=d.latency_s,
        extra=extra,
    )


def _trajectory(agent: Agent, live: _Live, end: str, score: float, error: str = "") -> Trajectory:
    s = live.spec.sampler
    extra: dict[str, Any] = {"mode": agent.config.mode}
    if agent.config.contrastive:
        extra["contrastive"] = {
            "amateur": agent.config.amateur_path,
            "lambda": agent.config.contrastive_lambda,
            "alpha": agent.config.contrastive_alpha,
        }
    if error:
        extra["error"] = error
    return Trajectory(
        task_id=live.spec.task_id,
        env_id=live.env_id,
        source=Source(
            model=agent.name,
            role=agent.config.role,
            sampler=s.name,
            temperature=s.temperature,
            top_p=s.top_p,
            seed=live.spec.seed,
        ),
        instruction=live.instruction,
        initial_observation=live.initial,
        steps=tuple(live.steps),
        return_=min(1.0, max(0.0, float(score))),
        success=end == "won",
        end=end,  # type: ignore[arg-type]
        extra=extra,
    )


class EnvPool:
    """Envs kept for reuse between episodes and between calls of :func:`run_episodes` (a Ray worker keeps one
    for its life). An env is handed out preferably to an episode of the task it played last, since a TextWorld
    env reloads its game only for another task.

    Args:
        make: creates a new env.
    """

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make = make
        self._free: list[tuple[Any, str]] = []  # (env, the task it played last)

    def take(self, task_id: str) -> Any:
        """A free env (one that last played ``task_id`` if any), or a new one."""
        for i in range(len(self._free) - 1, -1, -1):
            if self._free[i][1] == task_id:
                return self._free.pop(i)[0]
        return self._free.pop()[0] if self._free else self.make()

    def give(self, env: Any, task_id: str) -> None:
        """Return a healthy env after an episode of ``task_id``."""
        self._free.append((env, task_id))

    @staticmethod
    def discard(env: Any) -> None:
        """Close an env that failed (or is no longer needed), ignoring errors from a broken one."""
        try:
            env.close()
        except Exception:
            logger.debug("closing an env raised", exc_info=True)

    def close(self) -> None:
        """Close every free env."""
        while self._free:
            self.discard(self._free.pop()[0])

    def __len__(self) -> int:
        return len(self._free)


def run_episodes(
    agent: Agent,
    env: EnvSpec | Callable[[], Any],
    episodes: Iterable[EpisodeSpec],
    *,
    batch_size: int = 16,
    max_steps: int = 50,
    episode_retries: int = 2,
    pool: EnvPool | None = None,
) -> Iterator[Trajectory]:
    """Run ``episodes`` in order with at most ``batch_size`` live at once; yield each trajectory as it ends.

    Every step makes one :meth:`Agent.act` call for all live episodes. An episode ends when the env says it
    won, lost or truncated, or after ``max_steps`` actions. The order in which episodes start, and so every
    batch, depends only on ``episodes`` and on the episodes' own courses.

    Args:
        agent: the agent.
        env: an :class:`EnvSpec` or a zero-argument env factory.
        episodes: what to run.
        batch_size: most live episodes (and envs).
        max_steps: step limit of an episode.
        episode_retries: restarts of an episode whose env raised; then it is yielded with ``end: error``.
        pool: envs to take from and return to (kept open afterwards); None uses a pool of this call, closed at
            the end.
    """
    if batch_size < 1 or max_steps < 1 or episode_retries < 0:
        raise ValueError("batch_size and max_steps must be >= 1 and episode_retries >= 0")
    make = env.make if isinstance(env, EnvSpec) else env
    # the env id of an episode whose env failed before telling its own
    default_env_id = env.env_id if isinstance(env, EnvSpec) else getattr(env, "env_id", "") or "unknown"
    pending: deque[tuple[EpisodeSpec, int]] = deque((spec, 0) for spec in episodes)
    own_pool = pool is None
    envs = EnvPool(make) if pool is None else pool
    live: list[_Live] = []

    def failed(ep: _Live, exc: BaseException, where: str) -> Trajectory | None:
        """Handle an env error: retry the episode from scratch, or give its error trajectory."""
        if ep.env is not None:
            envs.discard(ep.env)
            ep.env = None
        msg = f"{where}: {type(exc).__name__}: {exc}"
        if ep.attempt < episode_retries:
            logger.warning(
                "episode %s/%s/%d: %s; restarting it",
                ep.spec.task_id,
                ep.spec.sampler.name,
                ep.spec.seed,
                msg,
            )
            pending.appendleft((ep.spec, ep.attempt + 1))
            return None
        logger.error(
            "episode %s/%s/%d failed %d times; stored as an error: %s",
            ep.spec.task_id,
            ep.spec.sampler.name,
            ep.spec.seed,
            ep.attempt + 1,
            msg,
        )
        return _trajectory(agent, ep, "error", ep.steps[-1].score if ep.steps else 0.0, msg)

    try:
        while pending or live:
            while pending and len(live) < batch_size:
                spec, attempt = pending.popleft()
                ep = _Live(spec, attempt, default_env_id)
                ep.env = envs.take(
                    spec.task_id
                )  # an env that cannot be made is a set-up error: it stops the run
                try:
                    obs, info = ep.env.reset(seed=spec.seed, options={"task": spec.task_id})
                except W2SError:  # a user error (an unknown task id): retrying would not help
                    envs.discard(ep.env)
                    raise
                except Exception as exc:
                    traj = failed(ep, exc, "reset")
                    if traj is not None:
                        yield traj
                    continue
                base = ep.env.unwrapped if hasattr(ep.env, "unwrapped") else ep.env
                ep.env_id = (
                    getattr(base, "env_id", "")
                    or getattr(getattr(ep.env, "spec", None), "id", "")
                    or ep.env_id
                )
                ep.grammar = getattr(base, "command_grammar", "") or None
                ep.instruction = str(info.get("instruction", getattr(base, "instruction", "")))
                ep.initial = obs
                ep.admissible = _admissible(info)
                live.append(ep)
            if not live:
                continue
            decisions = agent.act(
                [ep.state() for ep in live], [ep.spec.sampler for ep in live], [ep.rng for ep in live]
            )
            still: list[_Live] = []
            for ep, d in zip(live, decisions, strict=True):
                try:
                    obs, reward, terminated, truncated, info = ep.env.step(d.action)
                except Exception as exc:
                    traj = failed(ep, exc, f"step {len(ep.steps) + 1}")
                    if traj is not None:
                        yield traj
                    continue
                ep.steps.append(_step_record(ep, d, obs, reward, info))
                ep.turns.append((d.thought, d.action, obs))
                ep.admissible = _admissible(info)
                if terminated or truncated or len(ep.steps) >= max_steps:
                    end = "won" if info.get("won") else "lost" if info.get("lost") else "truncated"
                    envs.give(ep.env, ep.spec.task_id)
                    yield _trajectory(agent, ep, end, float(info.get("score", 0.0)))
                else:
                    still.append(ep)
            live = still
    finally:
        for ep in live:  # stopped early (an error, or the caller closed the generator)
            if ep.env is not None:
                envs.discard(ep.env)
        if own_pool:
            envs.close()


# ------------------------------------------------------------------------------------------- collect


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


def _env_spec(
    env: str | EnvSpec,
    env_kwargs: Mapping[str, Any] | None,
    agent_config: AgentConfig,
    max_steps: int,
    tasks: Sequence[str],
) -> EnvSpec:
    """The env spec of a rollout: built-in envs get the step limit, admissible commands when the agent uses
    them and no expert plan; the suites of the tasks travel with it (for Ray workers)."""
    if isinstance(env, EnvSpec):
        if env_kwargs:
            raise ValueError("give env_kwargs inside the EnvSpec, not beside it")
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
    return EnvSpec(env, kwargs, suites)


def collect(
    tasks: Sequence[str],
    agent: Agent,
    samplers: Sequence[Sampler],
    store: TrajectoryStore,
    *,
    env: str | EnvSpec | Callable[[], Any] = "w2s/TextWorld-v0",
    env_kwargs: Mapping[str, Any] | None = None,
    seeds: int | Sequence[int] = 1,
    max_steps: int = 50,
    batch_size: int = 16,
    shard_size: int = 64,
    episode_retries: int = 2,
    workers: int = 0,
    ray_address: str | None = None,
    worker_cpus: float = 1.0,
    worker_gpus: float = 0.0,
    worker_threads: int = 1,
    max_worker_restarts: int = 4,
    ray_log_to_driver: bool = False,
    on_episode: Callable[[Trajectory, RolloutSummary], None] | None = None,
) -> RolloutSummary:
    """Run every (task, sampler, seed) episode that ``store`` lacks and append each as it ends.

    Args:
        tasks: task ids of the env.
        agent: the acting agent; its name is the ``model`` of the episode keys.
        samplers: sampling settings (distinct names).
        store: the open trajectory store (this process is its only writer).
        env: env id (built-in envs get ``max_steps``, admissible commands as the agent needs them and no expert
            plan, overridable by ``env_kwargs``), an :class:`EnvSpec`, or an env factory (in-process only).
        env_kwargs: env constructor arguments (with an env id).
        seeds: number of seeds (``0 .. seeds - 1``) or the seeds themselves.
        max_steps: step limit of an episode.
        batch_size: live episodes per batched agent call (per worker).
        shard_size: episodes per unit of work (see the module docstring).
        episode_retries: restarts of an episode whose env raised.
        workers: Ray workers; 0 runs everything in this process.
        ray_address: Ray cluster to join; None starts (and stops) a local instance unless one is running.
        worker_cpus, worker_gpus, worker_threads: resources and torch threads of each Ray worker.
        max_worker_restarts: replacement workers started for dead ones before giving up.
        ray_log_to_driver: show worker output here.
        on_episode: called after each trajectory is stored, with the running summary.

    Returns:
        The :class:`RolloutSummary` of this call.

    Raises:
        W2SError: bad arguments, or every Ray worker died and no replacement may be started (the store keeps
            every finished episode; run again to resume).
    """
    start = time.perf_counter()
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
        for shard in shard_episodes(planned, shard_size)
    ]
    shards = [s for s in shards if s]
    todo = sum(len(s) for s in shards)
    summary = RolloutSummary(planned=len(planned), skipped=len(planned) - todo, workers=workers)
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
        if workers == 0:
            if not isinstance(env, (str, EnvSpec)):
                env_source: EnvSpec | Callable[[], Any] = env
            else:
                env_source = _env_spec(env, env_kwargs, agent.config, max_steps, tasks)
            pool = EnvPool(env_source.make if isinstance(env_source, EnvSpec) else env_source)
            try:
                for shard in shards:
                    for traj in run_episodes(
                        agent,
                        env_source,
                        shard,
                        batch_size=batch_size,
                        max_steps=max_steps,
                        episode_retries=episode_retries,
                        pool=pool,
                    ):
                        write(traj)
            finally:
                pool.close()
        else:
            if not isinstance(env, (str, EnvSpec)):
                raise W2SError(
                    "Ray workers build their envs from an env id or an EnvSpec, not from a factory"
                )
            from w2s_agents.rollout.ray import RayOptions, run_shards

            spec = _env_spec(env, env_kwargs, agent.config, max_steps, tasks)
            agent_spec = AgentSpec(
                model_path=str(agent.lm.path),
                config=replace(agent.config, name=agent.name),
                device="cuda" if worker_gpus > 0 else "cpu",
                dtype="auto" if worker_gpus > 0 else "float32",
            )
            options = RayOptions(
                workers=workers,
                address=ray_address,
                worker_cpus=worker_cpus,
                worker_gpus=worker_gpus,
                worker_threads=worker_threads,
                max_worker_restarts=max_worker_restarts,
                log_to_driver=ray_log_to_driver,
            )
            runner = {"batch_size": batch_size, "max_steps": max_steps, "episode_retries": episode_retries}
            summary.worker_failures = run_shards(
                shards, agent_spec, spec, runner, options, write, name=agent.name
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


# ------------------------------------------------------------------------------------------- jobs (CLI)


@dataclass(frozen=True)
class RolloutJobConfig:
    """A stand-alone rollout (``w2s rollout CONFIG``): the model, the agent and the episodes."""

    run: RunConfig = option(
        default_factory=lambda: RunConfig(name="rollout"), help="run name, output folder, seed"
    )
    model: ModelConfig = option(
        default_factory=lambda: ModelConfig(tiny_preset="weak"),
        help="the acting model; path null builds a tiny model in <run dir>/model from the tasks' text",
    )
    agent: AgentConfig = option(default_factory=AgentConfig, help="how the agent acts")
    rollout: RolloutConfig = option(default_factory=RolloutConfig, help="which episodes to run and how")


# keys that change how a run executes, not which trajectories it produces: a resumed run may change them
_OPERATIONAL_KEYS = {
    "run.log_level",
    "rollout.workers",
    "rollout.threads",
    "rollout.ray_address",
    "rollout.worker_cpus",
    "rollout.worker_gpus",
    "rollout.worker_threads",
    "rollout.max_worker_restarts",
    "rollout.ray_log_to_driver",
    "rollout.batch_size",
    "rollout.shard_size",
    "rollout.episode_retries",
    "rollout.seeds",
    "rollout.tasks",
    "rollout.task_ids",
    "rollout.samplers",
    "rollout.first_seed",
    "rollout.suite",
    "rollout.split",
    "rollout.output",
    "model.device",
    "agent.score_batch_size",
    "agent.score_block_tokens",
}


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def load_job(path: str | None, overrides: Sequence[str] = ()) -> RolloutJobConfig:
    """Load a :class:`RolloutJobConfig` from YAML and ``key=value`` overrides.

    Raises:
        ConfigError: unknown key, wrong type or failed check (naming file:line or the override).
    """
    from w2s_agents.config import load_config

    return load_config(RolloutJobConfig, path, overrides)


def resolve_tasks(cfg: RolloutConfig) -> list[str]:
    """The task ids of a rollout config: ``task_ids`` if given, else the first ``tasks`` of the suite split."""
    if cfg.task_ids:
        return list(cfg.task_ids)
    from w2s_agents.envs.demos import suite_task_ids

    ids = suite_task_ids(cfg.suite, cfg.split)
    if not ids:
        raise ConfigError(f"'rollout.split' suite {cfg.suite} has no {cfg.split} tasks")
    return ids[: cfg.tasks] if cfg.tasks is not None else ids


def _check_resume(cfg: RolloutJobConfig, run_dir: Path) -> None:
    """Refuse to add episodes to a run folder started with a config that produces different trajectories."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    try:
        earlier = load_yaml(saved)
    except (ConfigError, OSError) as exc:
        raise ConfigError(f"{saved}: cannot read the config of the earlier run: {exc}") from None
    now = config_to_dict(cfg)
    old, new = _flatten(earlier), _flatten(now)
    differ = sorted(k for k in set(old) | set(new) if k not in _OPERATIONAL_KEYS and old.get(k) != new.get(k))
    # samplers may be added or removed, but a name must keep its settings (it is part of the episode keys)
    old_samplers = {s.get("name"): dict(s) for s in ((earlier.get("rollout") or {}).get("samplers") or [])}
    for s in now["rollout"]["samplers"]:
        key = f"rollout.samplers[{s['name']}]"
        if s["name"] in old_samplers and old_samplers[s["name"]] != s:
            differ.append(key)
            old[key], new[key] = old_samplers[s["name"]], s
    if differ:
        shown = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in differ[:5])
        raise ConfigError(
            f"{run_dir} holds a run started with another config: {shown}; its episodes would mix with this "
            "config's. Use another run.name (or delete the folder)"
        )


def build_task_model(
    out: str | Path,
    tasks: Sequence[str],
    env: EnvSpec,
    *,
    preset: str = "nano",
    vocab_size: int = 2048,
    seed: int = 0,
    max_tasks: int = 20,
) -> Path:
    """A tiny random-weight model whose tokenizer is trained on the text of the tasks' expert plays.

    The texts are the instruction, observations, actions and admissible commands of the expert trajectory of
    each of the first ``max_tasks`` tasks, and the system instruction with the env's command grammar.

    Returns:
        The model folder (see :func:`w2s_agents.agents.models.create_tiny_model`).

    Raises:
        W2SError: the env has no expert plan for a task.
    """
    from w2s_agents.envs.demos import expert_trajectory
    from w2s_agents.messages import system_prompt
    from w2s_agents.agents.models import create_tiny_model

    texts: list[str] = []
    kwargs = dict(env.kwargs)
    if env.env_id in BUILTIN_ENV_IDS:
        kwargs.update(expert_plan=True, admissible_commands=True)
    e = replace(env, kwargs=kwargs).make()
    try:
        base = e.unwrapped
        for task in tasks[:max_tasks]:
            traj = expert_trajectory(base, task)
            texts += [traj.instruction, traj.initial_observation]
            for s in traj.steps:
                texts += [s.action, s.observation, *(s.admissible or ())]
        texts.append(system_prompt(grammar=getattr(base, "command_grammar", "") or None))
    finally:
        e.close()
    logger.info(
        "building a tiny %s model in %s from %d texts of %d tasks",
        preset,
        out,
        len(texts),
        min(len(tasks), max_tasks),
    )
    return create_tiny_model(out, texts, preset=preset, vocab_size=vocab_size, seed=seed)


def run_job(cfg: RolloutJobConfig) -> tuple[RolloutSummary, Path]:
    """Run a rollout job: prepare the run folder, load (or build) the model, collect into the store.

    Returns:
        The summary and the trajectory file.

    Raises:
        ConfigError: the run folder holds a run with a different config, or a key is invalid.
        ModelLoadError: the model cannot be loaded.
    """
    from w2s_agents.envs.suites import get_suite
    from w2s_agents.agents.models import load_model
    from w2s_agents.store import TrajectoryStore

    run_dir = cfg.run.run_dir
    r = cfg.rollout
    output = r.output if r.output is not None else run_dir / "trajectories.jsonl"
    if output.is_file() and output.stat().st_size > 0:
        _check_resume(cfg, run_dir)
    if r.threads:
        import torch

        torch.set_num_threads(r.threads)
    tasks = resolve_tasks(r)
    env_id = get_suite(r.suite).env_id
    if cfg.model.path is not None:
        model_path = Path(cfg.model.path)
    else:
        model_path = run_dir / "model"
        if not (model_path / "config.json").is_file():
            env = _env_spec(env_id, r.env_kwargs, cfg.agent, r.max_steps, tasks)
            m = cfg.model
            build_task_model(
                model_path, tasks, env, preset=m.tiny_preset, vocab_size=m.vocab_size, seed=cfg.run.seed
            )
    agent = Agent(load_model(model_path, device=cfg.model.device, dtype=cfg.model.dtype), cfg.agent)
    with TrajectoryStore(output) as store:
        save_config(cfg, run_dir)  # once the store is ours: the config its episodes come from
        summary = collect(
            tasks,
            agent,
            r.samplers,
            store,
            env=env_id,
            env_kwargs=r.env_kwargs,
            seeds=r.seed_list,
            max_steps=r.max_steps,
            batch_size=r.batch_size,
            shard_size=r.shard_size,
            episode_retries=r.episode_retries,
            workers=r.workers,
            ray_address=r.ray_address,
            worker_cpus=r.worker_cpus,
            worker_gpus=r.worker_gpus,
            worker_threads=r.worker_threads,
            max_worker_restarts=r.max_worker_restarts,
            ray_log_to_driver=r.ray_log_to_driver,
        )
    with atomic_write(run_dir / "rollout-summary.json") as fh:  # what the last invocation did
        json.dump({"trajectories": str(output), **summary.to_dict()}, fh, indent=2)
        fh.write("\n")
    return summary, output
