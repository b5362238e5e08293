"""The end-to-end weak-to-strong pipeline behind ``w2s run``.

One :class:`~w2s_agents.pipeline.experiment.ExperimentConfig` in, a report out. For every run seed the stages of DESIGN
section 2 run in ``<run dir>/seed-<k>/<stage>/`` as cached, resumable stages (:mod:`w2s_agents.pipeline.cache`)::

    tasks       task ids of the train split; every game generated (cached)
    held-out    task ids of the valid / test splits; every game generated (changing them retrains nothing)
    demos       expert trajectories of the train tasks
    models      the weak and strong models (local folders, or tiny models built on the demos' text)
    weak-sft    the weak agent fine-tuned on the demos (the explorer and the DPO reference)
    strong-sft  the strong agent fine-tuned on the demos (baseline)
    ceiling-sft with scarce demos (tasks.demos < tasks.train): the strong agent on every train task's demo
    explore     the weak SFT agent on the train tasks under every sampling setting (tree width)
    models-<name>, weak-sft-<name>, explore-<name>
                with weak_extra: each extra weak model's base model, SFT and exploration (module weaks)
    trees       one trajectory tree per train task
    search      MCTS per tree; best-path SFT rows, TreeDPO pairs, expert-vs-failed pairs
    w2s-mcts    strong base model, SFT on the best paths (MCTS-SFT)
    w2s-treedpo strong SFT agent, TreeDPO on the tree pairs, reference = weak SFT
    w2s-mcts-treedpo  W2S-MCTS, then TreeDPO on the tree pairs
    ceiling     strong SFT agent (ceiling-sft with scarce demos), DPO on expert-vs-failed pairs
    strong-explore  with train.baselines: the strong SFT agent on the train tasks (explore.samplers x seeds)
    eto         strong SFT + ETO: DPO on expert demos vs its own failed episodes of the demo tasks
    best-of-n   strong SFT + Best-of-N: SFT on its best successful episode of each train task
    explore-r<k>, trees-r<k>, (expand-r<k>,) search-r<k>, w2s-*-r<k>
                with run.rounds > 1, rounds 2 .. N: round k-1's W2S model explores, its episodes join the
                trees, the W2S stages train again on them (module rounds)
    rl-explore-r<k>, rl-trees-r<k>, rl-search-r<k>, w2s-rl-r<k>
                with rl.rounds > 0, RL rounds 1 .. N: round k's policy (rl.start's model, then w2s-rl-r<k-1>)
                explores, its episodes join the weak agent's trees, policy gradient on the steps' advantages
                from the grown trees (module rl)
    eval        every model on the held-out test tasks (and train tasks for correction / expansion; misfit)

then ``metrics.json`` (:mod:`w2s_agents.pipeline.metrics`), ``report.md`` and ``plots/`` at the top of the run,
aggregated over seeds. A finished stage is skipped when its config is unchanged; ``from_stage`` redoes a stage and
the ones after it; a killed run resumes (trajectory stores and training checkpoints carry on where they stopped).

:func:`build_stages` is the pipeline's table of contents: each stage's function (in
:mod:`w2s_agents.pipeline.stages`), the part of the config its key hashes, and the stages it reads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from w2s_agents.config import config_to_dict, save_config
from w2s_agents.errors import ConfigError
from w2s_agents.log import setup_logging
from w2s_agents.pipeline.cache import (
    Stage,
    StageGroup,
    StageRecord,
    collect_manifest,
    link_finished_stages,
    run_stage_groups,
    write_manifest,
)
from w2s_agents.pipeline.experiment import BASELINES, W2S_VARIANTS, ExperimentConfig
from w2s_agents.pipeline.jobs import stage_process_init
from w2s_agents.pipeline.metrics import aggregate, write_metrics
from w2s_agents.pipeline.report import write_report
from w2s_agents.pipeline.rl import rl_round_stages
from w2s_agents.pipeline.rounds import later_round_stages
from w2s_agents.pipeline.stage_io import plays_valid, training_system
from w2s_agents.pipeline.stages import (
    run_best_of_n,
    run_demos,
    run_dpo,
    run_eto,
    run_eval,
    run_expand,
    run_explore,
    run_held_out,
    run_mcts_sft,
    run_models,
    run_pg,
    run_rl_search,
    run_search,
    run_sft,
    run_strong_explore,
    run_tasks,
    run_trees,
    run_weak_model,
)
from w2s_agents.pipeline.tracking import check_tracking, train_key_part
from w2s_agents.pipeline.weaks import W2S_WEIGHTED_STAGES, extra_weaks, with_source_weights
from w2s_agents.seeding import seed_everything
from w2s_agents.trainers import TrainConfig

__all__ = [
    "W2S_VARIANTS",
    "PipelineResult",
    "build_stages",
    "check_stage_range",
    "run_pipeline",
    "stage_names",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineResult:
    """What :func:`run_pipeline` produced."""

    run_dir: Path
    report: Path
    metrics: dict[str, Any]
    records: dict[int, list[StageRecord]]
    """Stage records per run seed."""


def _train_part(cfg: ExperimentConfig, tc: TrainConfig, seed: int) -> dict[str, Any]:
    """The config part of a training stage: its own run, and the validation settings it trains with (the
    agent's settings only when it plays the valid tasks)."""
    valid = plays_valid(cfg)
    # train_key_part: report_to is left out (where numbers are reported is not what is computed)
    return {
        "train": train_key_part(tc),
        "valid_success": valid,
        "agent": cfg.agent if valid else None,
        "seed": seed,
    }


def _replay_part(cfg: ExperimentConfig) -> dict[str, Any]:
    """The env settings a search stage replays shortened paths in (none when it keeps tree paths)."""
    if cfg.search.paths == "tree":
        return {}
    return {"replay_env": {"max_steps": cfg.explore_max_steps, "env_kwargs": cfg.tasks.env_kwargs}}


def _tasks_part(cfg: ExperimentConfig, splits: tuple[str, ...]) -> dict[str, Any]:
    """The config part of the tasks (``splits`` = train) or held-out (valid, test) stage: the suite, its env
    settings and the number of tasks of ``splits``; not how games are made (``workers``,
    ``generation_timeout_s``), nor which train tasks have demos (the demos stage's part). A ScienceWorld suite's
    part names its task order (its tasks take turns in a split), so that task lists cached in the earlier order
    (task by task) are not reused."""
    from w2s_agents.envs.suites import ScienceWorldSuite, get_suite

    t = cfg.tasks
    part = {
        "suite": t.suite,
        "max_steps": t.max_steps,
        "env_kwargs": t.env_kwargs,
        **{split: getattr(t, split) for split in splits},
    }
    if isinstance(get_suite(t.suite), ScienceWorldSuite):
        part["task_order"] = "turns"
    return part


def _explore_part(cfg: ExperimentConfig, seed: int) -> dict[str, Any]:
    """The config part of the explore stage; ``explore.width`` only when set, so that a run without it keeps the
    key it had before that setting existed. Where the Ray workers run (``ray_address`` when set, ``worker_cpus``,
    ``worker_gpus``, ``workers_per_node``) is left out: it is not what they compute. The step limit enters as
    the one the episodes run under (null ``explore.max_steps`` resolved), so naming the default gives its key."""
    part = config_to_dict(cfg.explore)
    part["max_steps"] = cfg.explore_max_steps
    if not cfg.explore.width:
        part.pop("width")
    for key in ("worker_cpus", "worker_gpus", "workers_per_node"):
        part.pop(key, None)
    if part.get("ray_address") is not None:
        part["ray_address"] = None  # the key a run without a cluster has
    return {"explore": part, "agent": cfg.agent, "seed": seed}


def _tree_part(cfg: ExperimentConfig) -> dict[str, Any] | None:
    """The config part of the trees stage: none with the exact merge (the key it had before the ``tree``
    section existed), the ``tree`` section otherwise."""
    return None if cfg.tree.merge == "exact" else {"tree": cfg.tree}


def build_stages(cfg: ExperimentConfig, seed: int) -> list[Stage]:
    """The stages of one run seed (see the module docstring), each with the config part it depends on.

    A stage's key hashes its name, version, config part and the keys of its ``deps``: changing any of them
    reruns it and every stage that depends on it.
    """
    t = cfg.train
    system = training_system(cfg)
    searched = "expand" if cfg.expand.iterations else "trees"  # the stage whose trees MCTS searches
    variants = [v for v in W2S_VARIANTS if v in t.variants]
    weaks = extra_weaks(cfg)  # several weak supervisors: the W2S stages learn per-source weights
    weighted = W2S_WEIGHTED_STAGES if weaks and t.source_weights else ()

    def training(
        name: str, run: Callable[..., Any], tc: TrainConfig, deps: tuple[str, ...], **kw: Any
    ) -> Stage:
        if name in weighted:
            tc = with_source_weights(tc)
        # the training config is bound to the function and hashed into the key from the same object
        bound = partial(run, cfg=cfg, seed=seed, train=tc, **kw)
        if plays_valid(cfg):  # validation success plays the valid tasks each epoch
            deps = (*deps, "held-out")
        return Stage(name, bound, config=_train_part(cfg, tc, seed), deps=deps)

    # tasks, expert demos, base models
    stages = [
        # tasks.workers and tasks.generation_timeout_s are left out of the key: they set how games are made, not
        # what is made
        Stage("tasks", partial(run_tasks, cfg=cfg), config=_tasks_part(cfg, ("train",)), version=2),
        Stage("held-out", partial(run_held_out, cfg=cfg), config=_tasks_part(cfg, ("valid", "test"))),
        Stage(
            "demos",
            partial(run_demos, cfg=cfg),
            config={"system": system, "demos": cfg.tasks.demos if cfg.tasks.scarce else 0},
            deps=("tasks",),
            version=2,  # 2: sft-all.jsonl, the demo tasks of scarce demonstrations
        ),
        Stage(
            "models",
            partial(run_models, cfg=cfg, seed=seed),
            config={"weak": cfg.weak, "strong": cfg.strong, "seed": seed},
            deps=("demos",),
        ),
        # baselines; the weak SFT agent is also the explorer and the TreeDPO reference
        training("weak-sft", run_sft, t.weak_sft, ("models",), role="weak"),
        training("strong-sft", run_sft, t.strong_sft, ("models",), role="strong"),
    ]
    # scarce demonstrations: the ceiling starts from the strong model trained on every train task's demo
    ceiling_start = "strong-sft"
    if t.ceiling and cfg.tasks.scarce:
        ceiling_start = "ceiling-sft"
        stages.append(
            training("ceiling-sft", run_sft, t.ceiling_sft, ("models",), role="strong", rows="sft-all.jsonl")
        )
    for i, w in enumerate(weaks):  # each extra weak model (weak_extra): its base model, SFT on the demos
        stages += [
            Stage(
                w.models_stage,
                partial(run_weak_model, cfg=cfg, seed=seed, index=i),
                config={"weak": w.config, "seed": seed},
                deps=("demos",),
            ),
            training(w.sft_stage, run_sft, t.weak_sft, (w.models_stage,), role="weak", models=w.models_stage),
        ]
    stages += [  # the weak agent's experience, merged into trees, (grown online,) searched
        Stage(
            "explore",
            partial(run_explore, cfg=cfg, seed=seed),
            config=_explore_part(cfg, seed),
            deps=("weak-sft",),
            version=2,  # 2: trajectories carry the env's state keys
        ),
        Stage(
            "trees",
            partial(run_trees, tree=cfg.tree, device=cfg.agent_device),
            config=_tree_part(cfg),
            deps=("explore",),
            version=2,  # 2: tree files w2s.tree/2
        ),
    ]
    if weaks:  # each extra weak model explores as the first does; the trees merge every exploration
        names = [s.name for s in stages]
        explore, at = stages[names.index("explore")], names.index("trees")
        extra = [
            replace(
                explore,
                name=w.explore_stage,
                run=partial(run_explore, cfg=cfg, seed=seed, model=w.sft_stage),
                deps=(w.sft_stage,),
            )
            for w in weaks
        ]
        trees = stages[at]
        explores = ("explore", *(e.name for e in extra))
        stages[at : at + 1] = [
            *extra,
            replace(trees, run=partial(trees.run, explores=explores), deps=(*trees.deps, *explores[1:])),
        ]
    if cfg.expand.iterations:
        stages.append(
            Stage(
                "expand",
                partial(run_expand, cfg=cfg, seed=seed),
                config={
                    "expand": cfg.expand,
                    "agent": cfg.agent,
                    "seed": seed,
                    "max_steps": cfg.explore_max_steps,  # online episodes are explorations
                },
                deps=("trees", "weak-sft"),
            )
        )
    stages.append(
        Stage(
            "search",
            partial(run_search, cfg=cfg, seed=seed, trees_stage=searched),
            config={"search": cfg.search, "seed": seed, **_replay_part(cfg)},
            deps=(searched, "demos"),
        )
    )
    # the weak-to-strong models and the ceiling
    if "w2s-mcts" in variants or "w2s-mcts-treedpo" in variants:
        # train.mcts_start: the strong base model (the paper's released code; docs/pipeline.md) or strong SFT
        start_deps = ("models",) if t.mcts_start == "base" else ("strong-sft",)
        stages.append(
            training("w2s-mcts", run_mcts_sft, t.mcts_sft, ("search", *start_deps), start=t.mcts_start)
        )
    # DPO stages: the model they start from, the search stage's pairs file, the reference model
    if "w2s-treedpo" in variants:
        stages.append(
            training(
                "w2s-treedpo",
                run_dpo,
                t.treedpo,
                ("search", "strong-sft", "weak-sft"),
                start="strong-sft",
                pairs="pairs.jsonl",
                reference="weak-sft",
            )
        )
    if "w2s-mcts-treedpo" in variants:
        stages.append(
            training(
                "w2s-mcts-treedpo",
                run_dpo,
                t.treedpo,
                ("search", "w2s-mcts", "weak-sft"),
                start="w2s-mcts",
                pairs="pairs.jsonl",
                reference="weak-sft",
            )
        )
    if t.ceiling:
        stages.append(
            training(
                "ceiling",
                run_dpo,
                t.ceiling_dpo,
                ("search", ceiling_start),
                start=ceiling_start,
                pairs="expert_pairs.jsonl",
                reference=ceiling_start,
            )
        )
    # the paper's strong-SFT baselines: the strong SFT agent's own episodes, then ETO and Best-of-N from them
    baselines = [b for b in BASELINES if b in t.baselines]
    if baselines:
        stages.append(
            Stage(
                "strong-explore",
                partial(run_strong_explore, cfg=cfg, seed=seed),
                config={
                    "samplers": cfg.explore.samplers,
                    "seeds": cfg.explore.seeds,
                    "batch_size": cfg.explore.batch_size,
                    "agent": cfg.agent,
                    "seed": seed,
                    "max_steps": cfg.explore_max_steps,
                },
                deps=("strong-sft",),
            )
        )
    if "eto" in baselines:
        stage = training("eto", run_eto, t.eto, ("strong-explore", "demos", "strong-sft"))
        pairs = {"margin": cfg.search.margin, "pairs_per_task": cfg.search.pairs_per_node}
        stages.append(replace(stage, config={**stage.config, "pairs": pairs}))
    if "best-of-n" in baselines:
        stage = training("best-of-n", run_best_of_n, t.best_of_n, ("strong-explore", "strong-sft"))
        stages.append(replace(stage, config={**stage.config, "samples": t.best_of_n_samples}))
    # run.rounds > 1: rounds 2 .. N, made from round 1's stages; their W2S models are evaluated
    later = later_round_stages(cfg, stages)
    stages += later
    # rl.rounds > 0: the RL rounds after them (module rl); their W2S-RL models are evaluated
    rl = rl_round_stages(cfg, seed, stages, training, search_run=run_rl_search, pg_run=run_pg)
    stages += rl
    round_data = {s.name for s in (*later, *rl) if not s.name.startswith("w2s-")}
    # evaluation reads the models of every training stage, and exploration's solved tasks
    stages.append(
        Stage(
            "eval",
            partial(run_eval, cfg=cfg, seed=seed),
            config={"eval": cfg.eval, "agent": cfg.agent, "variants": variants, "ceiling": t.ceiling},
            deps=tuple(
                s.name
                for s in stages
                if s.name not in ("tasks", "demos", "models", "trees", "expand", "search", "strong-explore")
                and s.name not in round_data
            ),
        )
    )
    return stages


def stage_names(cfg: ExperimentConfig) -> list[str]:
    """Names of the stages of ``cfg``, in order (for ``--from`` / ``--until``)."""
    return [s.name for s in build_stages(cfg, cfg.run.seed_list[0])]


def check_stage_range(cfg: ExperimentConfig, *, from_stage: str | None, until: str | None) -> None:
    """Check ``--from`` / ``--until`` against the stages of ``cfg``.

    Raises:
        ConfigError: either names no stage, or ``until`` comes before ``from_stage``.
    """
    names = stage_names(cfg)
    for opt, value in (("--from", from_stage), ("--until", until)):
        if value is not None and value not in names:
            raise ConfigError(f"{opt} {value!r}: no such stage; stages are {', '.join(names)}")
    if from_stage is not None and until is not None and names.index(until) < names.index(from_stage):
        raise ConfigError(
            f"--until {until!r} comes before --from {from_stage!r}; stages are {', '.join(names)}"
        )


def run_pipeline(
    cfg: ExperimentConfig,
    *,
    from_stage: str | None = None,
    until: str | None = None,
) -> PipelineResult:
    """Run (or resume) the whole experiment of ``cfg`` and write its report.

    Returns:
        The run folder, the report path, the metrics and the stage records per seed.

    Raises:
        ConfigError: ``from_stage`` / ``until`` names no stage, or ``until`` comes before ``from_stage``
            (checked before anything is written).
        W2SError: a stage failed with a reportable error (finished stages stay cached).
    """
    check_stage_range(cfg, from_stage=from_stage, until=until)
    check_tracking(cfg)
    run_dir = cfg.run.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(cfg.run.log_level, run_dir / "run.log")
    save_config(cfg, run_dir)
    if cfg.run.threads:
        import torch

        torch.set_num_threads(cfg.run.threads)
    if cfg.agent.prompt_admissible:
        logger.warning(
            "agent.prompt_admissible is on: the agent's prompt lists admissible commands that multi-turn "
            "training rows cannot carry, so models run on a slightly different prompt than they trained on"
        )
    started = time.time()
    records: dict[int, list[StageRecord]] = {}
    seeds = cfg.run.seed_list

    def manifest(extra: Mapping[str, Any] | None = None) -> None:
        flat = [r for s in seeds for r in records.get(s, [])]
        write_manifest(
            run_dir / "manifest.json",
            collect_manifest(
                cfg, flat, seeds={"run": seeds}, extra={"started": started, **dict(extra or {})}
            ),
        )

    groups = []
    for s in seeds:
        records[s] = []

        def on_stage(rec: StageRecord, s: int = s) -> None:
            records[s].append(rec)
            manifest()

        groups.append(
            StageGroup(build_stages(cfg, s), run_dir / f"seed-{s}", on_stage, partial(seed_everything, s))
        )
    for folder in cfg.run.reuse:
        if not folder.is_dir():
            logger.warning("run.reuse: %s is not a run folder (yet); its stages are computed here", folder)
    for s, group in zip(seeds, groups, strict=True):  # run.reuse: stages finished in other run folders
        link_finished_stages(group.run_dir, group.stages, [r / f"seed-{s}" for r in cfg.run.reuse])
    jobs = cfg.run.stage_jobs
    if jobs == 1:
        for s, group in zip(seeds, groups, strict=True):
            seed_everything(s)
            logger.info("run %s seed %d: %s", cfg.run.name, s, group.run_dir)
            run_stage_groups([group], from_stage=from_stage, until=until)
    else:
        logger.info(
            "run %s seeds %s: %s, up to %d stages at once",
            cfg.run.name,
            ", ".join(map(str, seeds)),
            run_dir,
            jobs,
        )
        per_seed = run_stage_groups(
            groups,
            from_stage=from_stage,
            until=until,
            jobs=jobs,
            threads=cfg.run.threads,
            init=partial(stage_process_init, cfg.run.log_level, run_dir / "run.log"),
        )
        records.update(zip(seeds, per_seed, strict=True))  # in pipeline order, not the order they finished
    if until is not None and until != "eval":
        manifest({"finished": time.time(), "until": until})
        return PipelineResult(run_dir, run_dir / "report.md", {}, records)
    metrics = aggregate(run_dir, seeds, cfg)
    metrics["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    write_metrics(run_dir / "metrics.json", metrics)
    report = write_report(metrics, run_dir)
    manifest({"finished": time.time()})
    logger.info("report: %s", report)
    return PipelineResult(run_dir, report, metrics, records)
