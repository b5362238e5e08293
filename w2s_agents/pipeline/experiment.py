"""The experiment config: every section of a w2s-agents run in one typed object.

``ExperimentConfig`` is what ``w2s`` commands read from a YAML file plus ``key.sub=value`` overrides. Its
defaults, which live in the section dataclasses (one source of truth per fact), are the embedded default
config: the CPU quickstart, used when no file is given. ``configs/quickstart.yaml`` spells the same experiment
out as a starting point for copies (a test keeps the two equal).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from w2s_agents.agents import AgentConfig, ModelConfig, Sampler
from w2s_agents.config import RunConfig, check, load_config, option, save_config
from w2s_agents.pipeline.rl import RLConfig, check_rl
from w2s_agents.pipeline.rounds import PipelineRunConfig, check_rounds
from w2s_agents.pipeline.weaks import WeakModelConfig, check_weak_names
from w2s_agents.search import OnlineSearchConfig, SearchConfig
from w2s_agents.trainers import PGOptions, TrainConfig

__all__ = [
    "BASELINES",
    "W2S_VARIANTS",
    "EvalConfig",
    "ExpandConfig",
    "ExperimentConfig",
    "ExploreConfig",
    "PipelineRunConfig",
    "RLConfig",
    "RunConfig",
    "TasksConfig",
    "TrainStagesConfig",
    "TreeConfig",
    "load_experiment",
    "prepare_run_dir",
]


W2S_VARIANTS = ("w2s-mcts", "w2s-treedpo", "w2s-mcts-treedpo")
"""The weak-to-strong models a run can train (``train.variants``), in the pipeline's order."""

BASELINES = ("eto", "best-of-n")
"""The paper's strong-SFT baselines a run can train (``train.baselines``): strong SFT + ETO (DPO on expert demos vs
the strong SFT agent's failed explorations) and strong SFT + Best-of-N (SFT on its best successful sample per
train task), in the pipeline's order."""


@dataclass(frozen=True)
class TasksConfig:
    """The task suite and how many tasks of each split the run uses."""

    suite: str = option("tw-coin_collector", "task suite (`w2s envs suites`)")
    train: int = option(60, "first N tasks of the train split: exploration, trees, the ceiling's demos")
    demos: int = option(
        8,
        "the first N train tasks have expert demos for weak and strong SFT (scarce demonstrations); the "
        "ceiling sees every train task's demo (0, or N >= tasks.train: every train task has a demo)",
    )
    valid: int = option(0, "first N tasks of the valid split: validation success each epoch (0: none)")
    test: int = option(50, "first N tasks of the test split: the held-out evaluation")
    max_steps: int = option(12, "step limit of an episode (exploration and evaluation)")
    env_kwargs: dict[str, Any] = option(default_factory=dict, help="extra env constructor arguments")
    workers: int = option(
        0, "processes that prepare the tasks at once (TextWorld makes their games; 0: one per CPU core)"
    )
    generation_timeout_s: float = option(
        600.0, "longest time one task may take to prepare (a TextWorld game to generate), in seconds"
    )

    @property
    def scarce(self) -> bool:
        """Whether only some train tasks have demos for SFT (``0 < demos < train``)."""
        return 0 < self.demos < self.train

    def __post_init__(self) -> None:
        check(self.train >= 1, "train", f"must be >= 1, got {self.train}")
        check(self.demos >= 0, "demos", f"must be >= 0, got {self.demos}")
        check(self.workers >= 0, "workers", f"must be >= 0, got {self.workers}")
        check(
            math.isfinite(self.generation_timeout_s) and self.generation_timeout_s > 0,
            "generation_timeout_s",
            f"must be a positive number of seconds, got {self.generation_timeout_s}",
        )
        check(self.valid >= 0, "valid", f"must be >= 0, got {self.valid}")
        check(self.test >= 1, "test", f"must be >= 1, got {self.test}")
        check(self.max_steps >= 1, "max_steps", f"must be >= 1, got {self.max_steps}")
        check(
            "max_steps" not in self.env_kwargs,
            "env_kwargs",
            "must not set max_steps: the step limit is tasks.max_steps (evaluation) and explore.max_steps "
            "(exploration)",
        )

    def env_settings(self, max_steps: int) -> dict[str, Any]:
        """The env constructor arguments of the suite's env with the step limit ``max_steps``."""
        return {"max_steps": max_steps, **self.env_kwargs}


@dataclass(frozen=True)
class ExploreConfig:
    """The weak SFT agent's exploration of the train tasks."""

    samplers: list[Sampler] = option(
        default_factory=lambda: [
            Sampler(temperature=0.0),
            Sampler(temperature=0.7, top_p=0.95),
            Sampler(temperature=1.0),
            Sampler(temperature=1.5),
        ],
        help="sampling settings, one exploration each (the tree width)",
    )
    seeds: int = option(4, "episodes per task and sampler")
    width: int = option(
        0,
        "trajectories per train task: the first N (sampler, seed) pairs taken seed-major (seed 0 of every "
        "sampler in list order, then seed 1, ...); 0: every sampler x seeds",
    )
    max_steps: int | None = option(
        None,
        "step limit of an exploration episode (the weak agents', the strong SFT agent's for the ETO and "
        "Best-of-N baselines, RL rounds' and online expansion's); the search replays shortened paths under it; "
        "null: twice tasks.max_steps. A longer limit than evaluation's lets the explorer reach the goal after detours, which "
        "search.paths cuts out of the best paths; evaluation keeps tasks.max_steps",
    )
    batch_size: int = option(16, "live episodes per batched agent call")
    workers: int = option(0, "Ray workers for exploration (0: in this process)")
    ray_address: str | None = option(
        None,
        "Ray cluster to join ('auto', 'host:port' or 'ray://host:port'); null: the RAY_ADDRESS environment "
        "variable if set (this key wins over it), else a local instance when workers > 0",
    )
    # where the workers run is not what they compute: these keys stay out of the explore stage's key
    worker_cpus: float = option(1.0, "CPUs reserved per Ray worker", omit_default=True)
    worker_gpus: float = option(
        0.0,
        "GPUs per Ray worker (> 0 loads its model on CUDA); a fraction below 1 shares a GPU, whole numbers above",
        omit_default=True,
    )
    workers_per_node: int = option(
        0, "at most this many Ray workers on each node, pinned to it (0: Ray places them)", omit_default=True
    )

    def __post_init__(self) -> None:
        check(len(self.samplers) >= 1, "samplers", "must list at least one sampler")
        names = [s.name for s in self.samplers]
        check(len(set(names)) == len(names), "samplers", f"names must be unique, got {names}")
        check(self.seeds >= 1, "seeds", f"must be >= 1, got {self.seeds}")
        pairs = len(self.samplers) * self.seeds
        check(
            0 <= self.width <= pairs,
            "width",
            f"must be between 0 and len(samplers) x seeds = {len(self.samplers)} x {self.seeds} = {pairs}, "
            f"got {self.width}",
        )
        check(
            self.max_steps is None or self.max_steps >= 1,
            "max_steps",
            f"must be >= 1 (or null: twice tasks.max_steps), got {self.max_steps}",
        )
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.workers >= 0, "workers", f"must be >= 0, got {self.workers}")
        check(self.worker_cpus > 0, "worker_cpus", f"must be > 0, got {self.worker_cpus}")
        check(
            self.worker_gpus >= 0 and (self.worker_gpus < 1 or float(self.worker_gpus).is_integer()),
            "worker_gpus",
            f"must be a fraction in [0, 1) or a whole number, got {self.worker_gpus}",
        )
        check(self.workers_per_node >= 0, "workers_per_node", f"must be >= 0, got {self.workers_per_node}")


@dataclass(frozen=True)
class ExpandConfig:
    """Online expansion of every train tree before MCTS (beyond the paper): PUCT episodes played in the env with
    the weak SFT agent's choose-mode distribution as the prior (``w2s_agents.agents.policy.AgentPolicy``); the
    new nodes carry the source ``weak-sft-search``."""

    iterations: int = option(0, "PUCT episodes per train tree (0: no online expansion, the paper's setting)")
    max_env_steps: int = option(300, "env steps per tree, replays included (0: no limit)")
    max_tokens: int = option(0, "policy tokens per tree (0: no limit)")
    c_puct: float = option(1.0, "exploration weight of PUCT")
    temperature: float = option(1.0, "temperature of the prior, softmax(score / temperature)")
    top_k: int = option(0, "propose only the k most probable commands (0: all)")

    def __post_init__(self) -> None:
        self.online(max_depth=1, seed=0)  # the search's own checks of the keys it shares
        check(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        check(self.top_k >= 0, "top_k", f"must be >= 0, got {self.top_k}")

    def online(self, *, max_depth: int, seed: int) -> OnlineSearchConfig:
        """The settings of one tree's expansion (``expand_online``) with this section's budget and PUCT."""
        return OnlineSearchConfig(
            iterations=self.iterations,
            c_puct=self.c_puct,
            max_env_steps=self.max_env_steps,
            max_tokens=self.max_tokens,
            max_depth=max_depth,
            seed=seed,
            model="weak-sft-search",
        )


@dataclass(frozen=True)
class TreeConfig:
    """How the trees stage merges the exploration trajectories into trees (``w2s_agents.tree``)."""

    merge: Literal["exact", "similarity"] = option(
        "exact",
        "exact: a step joins a child with the same normalised action and observation acted on; similarity "
        "(the paper's): the same action and an observation whose embedding has cosine >= xi_sim",
    )
    xi_sim: float = option(0.9, "similarity merge: least cosine of two observations that merge, in (0, 1]")
    embedder: str | None = option(
        None,
        "similarity merge: a local sentence-embedding model folder (mean-pooled, L2-normalised); null: TF-IDF "
        "over character 3- to 5-grams of the task's observations",
    )

    def __post_init__(self) -> None:
        check(
            isinstance(self.xi_sim, (int, float)) and math.isfinite(self.xi_sim) and 0 < self.xi_sim <= 1,
            "xi_sim",
            f"must be a number in (0, 1], got {self.xi_sim!r}",
        )


def _tiny_sft(lr: float, epochs: int, method: str = "sft") -> TrainConfig:
    # tiny models start from random weights: learning rates far above the paper's 1e-5 for pretrained LLMs,
    # and enough optimizer steps for the strong model to learn the games' rule (fewer leave it at the weak
    # model's level; docs/pipeline.md). The best epoch by validation loss is exported; after 5 epochs without
    # a better one training stops (the schedule is not shortened, so the steps before the stop are the same)
    return TrainConfig(
        method=method,
        lr=lr,
        epochs=epochs,
        batch_size=8,
        max_length=1024,
        warmup_ratio=0.05,
        early_stopping_patience=5,
    )


def _tiny_pg() -> TrainConfig:
    # policy gradient refines a policy that already plays (rl.start): a learning rate a tenth of the tiny
    # models' SFT rate, two passes over each round's rows, the ratio clipped and a KL to the start model
    return TrainConfig(
        method="pg",
        lr=1e-4,
        epochs=2,
        batch_size=8,
        max_length=1024,
        warmup_ratio=0.05,
        valid_fraction=0.0,
        export="last",
        reference="strong",
        pg=PGOptions(loss="clip", clip_eps=0.2, kl_coef=0.05, aggregation="token"),
    )


def _tiny_dpo(reference: str) -> TrainConfig:
    return TrainConfig(
        method="dpo",
        lr=2e-5,
        epochs=2,
        batch_size=8,
        max_length=1024,
        beta=0.1,
        sft_weight=1.0,
        reference=reference,
    )


@dataclass(frozen=True)
class TrainStagesConfig:
    """The training stages of an experiment (the ``train`` section): one :class:`TrainConfig` per stage, which
    weak-to-strong variants to train, and how the stages validate."""

    weak_sft: TrainConfig = option(
        default_factory=lambda: replace(_tiny_sft(3e-3, 200), early_stopping_patience=20),
        help="weak model on expert demos",
    )
    strong_sft: TrainConfig = option(
        default_factory=lambda: replace(
            _tiny_sft(1e-3, 100), valid_fraction=0.0, early_stopping_patience=0, export="last"
        ),
        help="strong model on expert demos",
    )
    mcts_sft: TrainConfig = option(
        default_factory=lambda: _tiny_sft(1e-3, 30, "mcts-sft"),
        help="strong model on the best paths (W2S-MCTS)",
    )
    treedpo: TrainConfig = option(
        default_factory=lambda: _tiny_dpo("weak"), help="TreeDPO on the tree pairs (reference: weak SFT)"
    )
    ceiling_sft: TrainConfig = option(
        default_factory=lambda: _tiny_sft(1e-3, 30),
        help="with scarce demos (tasks.demos < tasks.train): the strong model on every train task's demo, the "
        "ceiling's start",
    )
    ceiling_dpo: TrainConfig = option(
        default_factory=lambda: _tiny_dpo("strong"),
        help="the ceiling: strong SFT + DPO on expert-vs-failed pairs",
    )
    rl: TrainConfig = option(
        default_factory=_tiny_pg,
        help="with rl.rounds > 0: policy gradient of each RL round (W2S-RL) from that round's policy, KL to "
        "rl.start's model (method pg)",
    )
    variants: list[Literal["w2s-mcts", "w2s-treedpo", "w2s-mcts-treedpo"]] = option(
        default_factory=lambda: ["w2s-mcts"],
        help="weak-to-strong models to train (configs/paper-table.yaml: all three)",
    )
    ceiling: bool = option(True, "train and evaluate the ceiling")
    mcts_start: Literal["base", "strong-sft"] = option(
        "base",
        "the model W2S-MCTS fine-tunes on the best paths: base (the strong base model, the paper's released "
        "code) or strong-sft (the strong SFT agent)",
    )
    baselines: list[Literal["eto", "best-of-n"]] = option(
        default_factory=list,
        help="the paper's strong-SFT baselines to train: eto (DPO on expert demos vs the strong SFT agent's "
        "failed explorations of the demo tasks), best-of-n (SFT on its best successful sample per train task)",
    )
    eto: TrainConfig = option(
        default_factory=lambda: _tiny_dpo("strong"),
        help="strong SFT + ETO: DPO from the strong SFT agent on expert-vs-own-failure pairs (reference: strong "
        "SFT)",
    )
    best_of_n: TrainConfig = option(
        default_factory=lambda: _tiny_sft(1e-3, 30),
        help="strong SFT + Best-of-N: SFT from the strong SFT agent on its best successful sample per train task",
    )
    best_of_n_samples: int = option(
        0,
        "N of Best-of-N: the strong SFT agent's first N exploration episodes per train task that the best is "
        "chosen from, seed by seed under every explore.samplers (0: all, explore.samplers x explore.seeds)",
    )
    source_weights: bool = option(
        True,
        "with several weak models (weak_extra): the W2S stages learn one weight per source (RAVEN; their "
        "sources.weights on); false: their train.*.sources settings as written",
    )
    valid_success: bool = option(
        True,
        "with valid tasks (tasks.valid > 0): validate each epoch by greedy success on them and export the best "
        "epoch; otherwise the trainers' validation loss on held-out train tasks (train.*.valid_fraction)",
    )

    def __post_init__(self) -> None:
        check(self.best_of_n_samples >= 0, "best_of_n_samples", f"must be >= 0, got {self.best_of_n_samples}")


@dataclass(frozen=True)
class EvalConfig:
    """The held-out evaluation and the weak-to-strong diagnostics."""

    samplers: list[Sampler] = option(
        default_factory=lambda: [Sampler(temperature=0.0)], help="sampling settings of evaluation episodes"
    )
    seeds: int = option(1, "episodes per test task and sampler")
    train_tasks: bool = option(
        True, "also play the train tasks with weak SFT and W2S models (pseudolabel correction, expansion)"
    )
    misfit_states: int = option(200, "held-out weak states on which misfit is measured (0: skip)")
    split: Literal["test", "valid"] = option(
        "test",
        "the split the models are evaluated on: test, or valid to choose settings without the test tasks",
    )

    def __post_init__(self) -> None:
        check(len(self.samplers) >= 1, "samplers", "must list at least one sampler")
        check(self.seeds >= 1, "seeds", f"must be >= 1, got {self.seeds}")
        check(self.misfit_states >= 0, "misfit_states", f"must be >= 0, got {self.misfit_states}")


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole weak-to-strong experiment."""

    run: PipelineRunConfig = option(
        default_factory=PipelineRunConfig, help="run name, output folder, seed, logging, rounds, trackers"
    )
    weak: ModelConfig = option(
        default_factory=lambda: ModelConfig(tiny_preset="nano"),
        help="the weak agent (explorer, DPO reference)",
    )
    weak_extra: list[WeakModelConfig] = option(
        default_factory=list,
        help="more weak supervisors (RAVEN), each {name: ..., <model keys>}: its own SFT (weak-sft-<name>) and "
        "exploration (explore-<name>), merged into the same trees; weak stays the weak baseline",
    )
    strong: ModelConfig = option(
        default_factory=lambda: ModelConfig(tiny_preset="strong"), help="the strong agent that is trained"
    )
    tasks: TasksConfig = option(default_factory=TasksConfig, help="task suite and split sizes")
    agent: AgentConfig = option(
        default_factory=lambda: AgentConfig(mode="choose", prompt_admissible=False, prompt_grammar=False),
        help="how every agent of the run acts (exploration, validation, evaluation)",
    )
    explore: ExploreConfig = option(default_factory=ExploreConfig, help="the weak agent's exploration")
    tree: TreeConfig = option(
        default_factory=TreeConfig, help="how trajectories merge into trees (exact, or by similarity)"
    )
    expand: ExpandConfig = option(
        default_factory=ExpandConfig, help="online expansion of the trees in the env (off by default)"
    )
    search: SearchConfig = option(
        default_factory=lambda: SearchConfig(
            iterations=200, sft_min_value=0.5, discount=0.9, pairs_per_node=2, continuation_pairs=False
        ),
        help="MCTS and the extraction of paths and pairs",
    )
    train: TrainStagesConfig = option(default_factory=TrainStagesConfig, help="fine-tuning runs")
    eval: EvalConfig = option(default_factory=EvalConfig, help="held-out evaluation and diagnostics")
    rl: RLConfig = option(
        default_factory=RLConfig, help="on-policy RL rounds from the trees (W2S-RL; off by default)"
    )

    def __post_init__(self) -> None:
        check_weak_names(self.weak_extra)
        episodes = len(self.explore.samplers) * self.explore.seeds
        check(
            self.train.best_of_n_samples <= episodes,
            "train.best_of_n_samples",
            f"is {self.train.best_of_n_samples}, more than the strong SFT agent's exploration episodes per train "
            f"task (explore.samplers x explore.seeds = {episodes})",
        )
        check(
            self.eval.split == "test" or self.tasks.valid > 0,
            "eval.split",
            "is 'valid' but tasks.valid is 0: set tasks.valid to the number of valid tasks to evaluate on",
        )
        check_rounds(self)
        check_rl(self)

    @property
    def explore_max_steps(self) -> int:
        """Step limit of an exploration episode: ``explore.max_steps``, or twice ``tasks.max_steps`` when null."""
        return self.explore.max_steps if self.explore.max_steps is not None else 2 * self.tasks.max_steps

    @property
    def agent_device(self) -> str:
        """Device of the agents' models (the strong model's setting)."""
        return self.strong.device

    @property
    def agent_dtype(self) -> str:
        """Dtype of the agents' models (the strong model's setting)."""
        return self.strong.dtype


def load_experiment(
    path: str | os.PathLike[str] | None = None, overrides: Iterable[str] = ()
) -> ExperimentConfig:
    """Load an :class:`ExperimentConfig` from ``path`` (the embedded defaults when None) and overrides.

    Raises:
        ConfigError: unknown key, wrong type or failed check, naming file:line or the override.
    """
    return load_config(ExperimentConfig, path, overrides)


def prepare_run_dir(cfg: ExperimentConfig) -> Path:
    """Create the run folder and save the resolved config in it as ``config.yaml``; return the folder."""
    run_dir = cfg.run.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir)
    return run_dir
