"""The batched rollout engine: many episodes of an agent in their own envs, one batched agent call a step.

How episodes run (:func:`run_episodes`): up to ``batch_size`` episodes are live at once, each in its own env;
every step, one batched agent call decides the next action of all of them; an episode that ends frees its slot
for the next one. Each episode samples from its own random stream seeded with
``derive_seed(seed, task_id, sampler.name)``, and is recorded by :class:`~w2s_agents.episode.EpisodeRecorder`
(the rule env outcome -> trajectory shared with demos and online search).

An env that raises in ``reset`` or ``step`` is replaced and its episode restarted from scratch
(``episode_retries`` times); an episode that keeps failing is stored with ``end: error`` and the error message in
``extra.error``. An env that cannot be made, or a :class:`~w2s_agents.errors.W2SError` from ``reset`` (an unknown
task id), stops the run instead: it would fail every episode the same way.

:class:`EnvFactory` and :class:`AgentSpec` say how to build an env and an agent in any process, so that Ray
workers (:mod:`w2s_agents.rollout.ray`) run the same engine.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from w2s_agents.agents import Agent, AgentConfig, Sampler
from w2s_agents.episode import EpisodeRecorder
from w2s_agents.errors import W2SError
from w2s_agents.seeding import derive_seed
from w2s_agents.types import EpisodeKey, Source, Trajectory

__all__ = [
    "AgentSpec",
    "EnvFactory",
    "EnvPool",
    "EpisodeSpec",
    "episode_seed",
    "plan_episodes",
    "run_episodes",
    "shard_episodes",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EnvFactory:
    """How to make an env, in any process: an env id, constructor arguments and the task suites it needs
    (picklable; Ray workers build their envs from it).

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
        """Load the model (and amateur) on the configured backend and build the agent."""
        from w2s_agents.agents import load_agent

        return load_agent(self.model_path, self.config, device=self.device, dtype=self.dtype)


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


class _Live:
    """A running episode: its spec, env slot, random stream and recorder."""

    __slots__ = ("attempt", "env", "recorder", "rng", "spec")

    def __init__(self, spec: EpisodeSpec, attempt: int) -> None:
        self.spec = spec
        self.attempt = attempt
        self.rng = random.Random(episode_seed(spec.task_id, spec.sampler.name, spec.seed))
        self.env: Any = None
        self.recorder: EpisodeRecorder | None = None


def _source(agent: Agent, spec: EpisodeSpec) -> Source:
    s = spec.sampler
    return Source(
        model=agent.name,
        role=agent.config.role,
        sampler=s.name,
        temperature=s.temperature,
        top_p=s.top_p,
        seed=spec.seed,
    )


def _trajectory_extra(agent: Agent) -> dict[str, Any]:
    """What a rollout adds to each trajectory: how the agent acted."""
    extra: dict[str, Any] = {"mode": agent.config.mode}
    if agent.config.contrastive:
        extra["contrastive"] = {
            "amateur": agent.config.amateur_path,
            "lambda": agent.config.contrastive_lambda,
            "alpha": agent.config.contrastive_alpha,
        }
    return extra


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
    env: EnvFactory | Callable[[], Any],
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
        env: an :class:`EnvFactory` or a zero-argument env factory.
        episodes: what to run.
        batch_size: most live episodes (and envs).
        max_steps: step limit of an episode.
        episode_retries: restarts of an episode whose env raised; then it is yielded with ``end: error``.
        pool: envs to take from and return to (kept open afterwards); None uses a pool of this call, closed at
            the end.
    """
    if batch_size < 1 or max_steps < 1 or episode_retries < 0:
        raise ValueError("batch_size and max_steps must be >= 1 and episode_retries >= 0")
    make = env.make if isinstance(env, EnvFactory) else env
    # the env id of an episode whose env failed before telling its own
    default_env_id = env.env_id if isinstance(env, EnvFactory) else getattr(env, "env_id", "") or "unknown"
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
        rec = ep.recorder or EpisodeRecorder(ep.spec.task_id, default_env_id, _source(agent, ep.spec))
        return rec.finish(error=msg, extra=_trajectory_extra(agent))

    try:
        while pending or live:
            while pending and len(live) < batch_size:
                spec, attempt = pending.popleft()
                ep = _Live(spec, attempt)
                # an env that cannot be made is a set-up error: it stops the run
                ep.env = envs.take(spec.task_id)
                try:
                    ep.recorder, _ = EpisodeRecorder.reset(
                        ep.env, spec.task_id, _source(agent, spec), seed=spec.seed, env_id=default_env_id
                    )
                except W2SError:  # a user error (an unknown task id): retrying would not help
                    envs.discard(ep.env)
                    raise
                except Exception as exc:
                    traj = failed(ep, exc, "reset")
                    if traj is not None:
                        yield traj
                    continue
                live.append(ep)
            if not live:
                continue
            decisions = agent.act(
                [ep.recorder.state() for ep in live],
                [ep.spec.sampler for ep in live],
                [ep.rng for ep in live],
            )
            still: list[_Live] = []
            for ep, d in zip(live, decisions, strict=True):
                rec = ep.recorder
                try:
                    obs, reward, terminated, truncated, info = ep.env.step(d.action)
                except Exception as exc:
                    traj = failed(ep, exc, f"step {rec.num_steps + 1}")
                    if traj is not None:
                        yield traj
                    continue
                rec.step(
                    d.action,
                    obs,
                    reward,
                    info,
                    thought=d.thought,
                    tokens_in=d.tokens_in,
                    tokens_out=d.tokens_out,
                    latency_s=d.latency_s,
                    extra=None if d.parse_ok else {"raw_output": d.raw_output, "parse_error": d.parse_error},
                    token_ids=d.token_ids,
                    logprobs=d.logprobs,
                    tokenizer=d.tokenizer,
                )
                if terminated or truncated or rec.num_steps >= max_steps:
                    envs.give(ep.env, ep.spec.task_id)
                    yield rec.finish(info, bool(terminated), extra=_trajectory_extra(agent))
                else:
                    still.append(ep)
            live = still
    finally:
        for ep in live:  # stopped early (an error, or the caller closed the generator)
            if ep.env is not None:
                envs.discard(ep.env)
        if own_pool:
            envs.close()
