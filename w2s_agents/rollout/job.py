"""Stand-alone rollout jobs (``w2s rollout CONFIG``): the config, the run folder, the model, the collection.

:class:`RolloutConfig` is the ``rollout:`` section (which episodes, how they run); :func:`run_job` prepares the
run folder (refusing to mix episodes of another config into it), loads or builds the model and collects into
``<run dir>/trajectories.jsonl`` with :func:`~w2s_agents.rollout.collect`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from w2s_agents.agents import AgentConfig, ModelConfig, Sampler, load_agent
from w2s_agents.atomic import atomic_write
from w2s_agents.config import RunConfig, check, config_to_dict, load_yaml, option, save_config
from w2s_agents.errors import ConfigError, W2SError

from .collect import BUILTIN_ENV_IDS, RolloutSummary, collect, env_factory
from .engine import EnvFactory
from .options import EngineOptions, RayOptions, gpu_share_ok

__all__ = ["RolloutConfig", "RolloutJobConfig", "build_task_model", "load_job", "resolve_tasks", "run_job"]

logger = logging.getLogger(__name__)


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
        None,
        "address of a running Ray cluster to join ('auto', 'host:port' or 'ray://host:port'); null: the "
        "RAY_ADDRESS environment variable if set, else a local instance (this key wins over the variable)",
    )
    worker_cpus: float = option(1.0, "CPUs reserved per Ray worker")
    worker_gpus: float = option(
        0.0,
        "GPUs per Ray worker (> 0 loads the worker's model on CUDA); a fraction below 1 shares a GPU (0.5: two "
        "workers per GPU), whole numbers above",
    )
    workers_per_node: int = option(
        0,
        "at most this many Ray workers on each node of the cluster, each pinned to its node (0: Ray places them)",
        omit_default=True,
    )
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
        check(
            self.worker_gpus >= 0 and gpu_share_ok(self.worker_gpus),
            "worker_gpus",
            f"must be a fraction in [0, 1) or a whole number, got {self.worker_gpus}",
        )
        check(self.workers_per_node >= 0, "workers_per_node", f"must be >= 0, got {self.workers_per_node}")
        check(self.worker_threads >= 1, "worker_threads", f"must be >= 1, got {self.worker_threads}")
        check(
            self.max_worker_restarts >= 0,
            "max_worker_restarts",
            f"must be >= 0, got {self.max_worker_restarts}",
        )
        check(len(set(self.task_ids)) == len(self.task_ids), "task_ids", "must not repeat a task")

    def engine(self) -> EngineOptions:
        """The batched engine's settings of this config."""
        return EngineOptions(self.batch_size, self.shard_size, self.episode_retries)

    def ray(self) -> RayOptions | None:
        """The Ray workers of this config, None to run in this process (``workers: 0``)."""
        if self.workers == 0:
            return None
        return RayOptions(
            workers=self.workers,
            address=self.ray_address,
            address_key="rollout.ray_address",
            worker_cpus=self.worker_cpus,
            worker_gpus=self.worker_gpus,
            workers_per_node=self.workers_per_node,
            worker_threads=self.worker_threads,
            max_worker_restarts=self.max_worker_restarts,
            log_to_driver=self.ray_log_to_driver,
        )

    @property
    def seed_list(self) -> list[int]:
        """The episode seeds of every (task, sampler)."""
        return list(range(self.first_seed, self.first_seed + self.seeds))


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
    "rollout.workers_per_node",
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
    env: EnvFactory,
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
    from w2s_agents.agents.models import create_tiny_model
    from w2s_agents.envs.demos import expert_trajectory
    from w2s_agents.messages import system_prompt

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

    ``<run dir>/rollout-summary.json`` records what this invocation did, also when it was stopped (SIGTERM
    through the CLI, Ctrl-C) or failed after collecting began: its ``status`` is ``complete``, ``interrupted``
    or ``failed``.

    Returns:
        The summary and the trajectory file.

    Raises:
        ConfigError: the run folder holds a run with a different config, or a key is invalid.
        ModelLoadError: the model cannot be loaded.
    """
    from w2s_agents.envs.suites import get_suite
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
            env = env_factory(env_id, r.env_kwargs, cfg.agent, r.max_steps, tasks)
            m = cfg.model
            build_task_model(
                model_path, tasks, env, preset=m.tiny_preset, vocab_size=m.vocab_size, seed=cfg.run.seed
            )
    agent = load_agent(model_path, cfg.agent, device=cfg.model.device, dtype=cfg.model.dtype)
    summary = RolloutSummary()
    status = "failed"
    try:
        with TrajectoryStore(output) as store:
            save_config(cfg, run_dir)  # once the store is ours: the config its episodes come from
            collect(
                tasks,
                agent,
                r.samplers,
                store,
                env=env_id,
                env_kwargs=r.env_kwargs,
                seeds=r.seed_list,
                max_steps=r.max_steps,
                engine=r.engine(),
                ray=r.ray(),
                summary=summary,
            )
        status = "complete"
    except (KeyboardInterrupt, SystemExit):  # SIGINT, or SIGTERM through the CLI's handler
        status = "interrupted"
        raise
    finally:
        if summary.planned:  # collection began: the store is closed, record what this invocation did
            try:
                _write_summary(run_dir / "rollout-summary.json", output, summary, status)
            except OSError as exc:
                if status == "complete":
                    raise W2SError(
                        f"{run_dir / 'rollout-summary.json'}: cannot write the summary: {exc}"
                    ) from exc
                logger.warning("cannot write %s: %s", run_dir / "rollout-summary.json", exc)
    return summary, output


def _write_summary(path: Path, output: Path, summary: RolloutSummary, status: str) -> None:
    """Write ``rollout-summary.json`` (whole or not at all): the store, how the invocation ended, its counts."""
    with atomic_write(path) as fh:
        json.dump({"trajectories": str(output), "status": status, **summary.to_dict()}, fh, indent=2)
        fh.write("\n")
