"""The end-to-end weak-to-strong pipeline behind ``w2s run``.

One :class:`~w2s_agents.pipeline.experiment.ExperimentConfig` in, a report out. For every run seed the stages of DESIGN
section 2 run in ``<run dir>/seed-<k>/<stage>/`` as cached, resumable stages (:mod:`w2s_agents.pipeline.cache`)::

    tasks       task ids of the train / valid / test splits; every game generated (cached)
    demos       expert trajectories of the train tasks
    models      the weak and strong models (local folders, or tiny models built on the demos' text)
    weak-sft    the weak agent fine-tuned on the demos (the explorer and the DPO reference)
    strong-sft  the strong agent fine-tuned on the demos (baseline)
    explore     the weak SFT agent on the train tasks under every sampling setting (tree width)
    trees       one trajectory tree per train task
    search      MCTS per tree; best-path SFT rows, TreeDPO pairs, expert-vs-failed pairs
    w2s-mcts    strong base model, SFT on the best paths (MCTS-SFT)
    w2s-treedpo strong SFT agent, TreeDPO on the tree pairs, reference = weak SFT
    w2s-mcts-treedpo  W2S-MCTS, then TreeDPO on the tree pairs
    ceiling     strong SFT agent, DPO on expert-vs-failed pairs
    eval        every model on the held-out test tasks (and train tasks for correction / expansion; misfit)

then ``metrics.json``, ``report.md`` and ``plots/`` at the top of the run, aggregated over seeds. A finished stage
is skipped when its config is unchanged; ``from_stage`` redoes a stage and the ones after it; a killed run
resumes (trajectory stores and training checkpoints carry on where they stopped).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from w2s_agents.atomic import atomic_write
from w2s_agents.config import config_hash, save_config
from w2s_agents.errors import W2SError
from w2s_agents.pipeline.experiment import ExperimentConfig
from w2s_agents.log import progress, setup_logging
from w2s_agents.messages import episode_messages, system_prompt
from w2s_agents.pipeline.report import METRICS_SCHEMA, MODEL_LABELS, write_report
from w2s_agents.seeding import derive_seed, seed_everything
from w2s_agents.pipeline.cache import Stage, StageContext, StageRecord, collect_manifest, run_stages, write_manifest
from w2s_agents.pipeline.stats import bootstrap_interval, misfit, paired_pgr, transfer
from w2s_agents.types import Trajectory

__all__ = ["W2S_VARIANTS", "PipelineResult", "build_stages", "run_pipeline", "stage_names"]

logger = logging.getLogger(__name__)

W2S_VARIANTS = ("w2s-mcts", "w2s-treedpo", "w2s-mcts-treedpo")
"""The weak-to-strong models a run can train (``train.variants``)."""


@dataclass(frozen=True)
class PipelineResult:
    """What :func:`run_pipeline` produced."""

    run_dir: Path
    report: Path
    metrics: dict[str, Any]
    records: dict[int, list[StageRecord]]
    """Stage records per run seed."""


# ------------------------------------------------------------------------------------------- helpers


def _write_json(path: Path, data: Any) -> None:
    with atomic_write(path) as fh:
        json.dump(data, fh, indent=1, default=str)
        fh.write("\n")


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _write_rows(path: Path, rows: Sequence[Mapping[str, Any]]) -> int:
    with atomic_write(path) as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(rows)


def _env_class(suite: str) -> Any:
    from w2s_agents.envs.suites import TextWorldSuite, get_suite

    if isinstance(get_suite(suite), TextWorldSuite):
        from w2s_agents.envs.textworld_env import TextWorldEnv

        return TextWorldEnv
    from w2s_agents.envs.scienceworld_env import ScienceWorldEnv

    return ScienceWorldEnv


def _system(cfg: ExperimentConfig) -> str:
    """The system instruction of every training row: what the agent's prompt holds apart from the per-step
    admissible list (which a multi-turn training row cannot carry; see ``agent.prompt_admissible``)."""
    grammar = _env_class(cfg.tasks.suite).command_grammar if cfg.agent.prompt_grammar else None
    return system_prompt(None, grammar or None)


def _sft_row(traj: Trajectory, system: str) -> dict[str, Any]:
    turns = [(s.thought, s.action, s.observation) for s in traj.steps]
    if turns:
        turns[-1] = (turns[-1][0], turns[-1][1], None)
    return {
        "messages": episode_messages(traj.instruction, traj.initial_observation, turns, system=system),
        "task_id": traj.task_id,
        "sources": [traj.source.model],
    }


def _read_trajs(path: Path) -> list[Trajectory]:
    from w2s_agents.store import read_trajectories

    return list(read_trajectories(path)) if path.is_file() else []


class _Models:
    """Model folders produced by earlier stages, found through the stage outputs."""

    def __init__(self, ctx: StageContext):
        self.ctx = ctx

    def path(self, name: str) -> Path | None:
        if name in ("weak", "strong"):
            return Path(_read_json(self.ctx.output("models") / "models.json")[name])
        info = self.ctx.output(name) / "model.json"
        if not info.is_file():
            return None
        path = _read_json(info).get("model_dir")
        return Path(path) if path else None


# ------------------------------------------------------------------------------------------- agents


def _agent(cfg: ExperimentConfig, model_dir: Path, name: str, role: str) -> Any:
    from w2s_agents.agents.agent import Agent
    from w2s_agents.agents.models import load_model

    lm = load_model(model_dir, device=cfg.agent_device, dtype=cfg.agent_dtype)
    return Agent(lm, replace(cfg.agent, name=name, role=role))


def _play(
    cfg: ExperimentConfig,
    agent: Any,
    tasks: Sequence[str],
    samplers: Sequence[Any],
    seeds: int,
    store_path: Path,
    *,
    first_seed: int = 0,
    workers: int = 0,
) -> tuple[list[Trajectory], Any]:
    """Run (resumably) every (task, sampler, seed) episode of ``agent`` into ``store_path``."""
    from w2s_agents.rollout import collect
    from w2s_agents.store import TrajectoryStore

    env_kwargs = {"max_steps": cfg.tasks.max_steps, **cfg.tasks.env_kwargs}
    with TrajectoryStore(store_path) as store:
        summary = collect(
            list(tasks),
            agent,
            list(samplers),
            store,
            env=_env_id(cfg),
            env_kwargs=env_kwargs,
            seeds=list(range(first_seed, first_seed + seeds)),
            max_steps=cfg.tasks.max_steps,
            batch_size=cfg.explore.batch_size,
            workers=workers,
            ray_address=cfg.explore.ray_address,
        )
    return _read_trajs(store_path), summary


def _env_id(cfg: ExperimentConfig) -> str:
    from w2s_agents.envs.suites import get_suite

    return get_suite(cfg.tasks.suite).env_id


def _valid_fn(cfg: ExperimentConfig, tasks: Sequence[str], work: Path) -> Callable[[Any, Any], float] | None:
    """Validation success on the valid tasks (greedy), or None when the run has no valid tasks."""
    if not tasks or not cfg.train.valid_success:
        return None
    from w2s_agents.agents.agent import Agent, Sampler
    from w2s_agents.agents.models import LoadedModel
    from w2s_agents.rollout import EnvSpec, plan_episodes, run_episodes

    calls = [0]

    def valid(model: Any, tokenizer: Any) -> float:
        calls[0] += 1
        was_training = model.training
        model.eval()
        try:
            device = next(model.parameters()).device
            dtype = next(model.parameters()).dtype
            lm = LoadedModel(model, tokenizer, work, device, dtype)
            agent = Agent(lm, replace(cfg.agent, name="valid", role="strong"))
            env = EnvSpec(_env_id(cfg), {"max_steps": cfg.tasks.max_steps, **cfg.tasks.env_kwargs})
            eps = plan_episodes(list(tasks), [Sampler(temperature=0.0)], [0])
            trajs = list(
                run_episodes(
                    agent, env, eps, batch_size=cfg.explore.batch_size, max_steps=cfg.tasks.max_steps
                )
            )
        finally:
            model.train(was_training)
        value = sum(t.success for t in trajs) / max(1, len(trajs))
        logger.info("validation %d: success %.3f on %d valid tasks", calls[0], value, len(trajs))
        return value

    return valid


def _train_summary(result: Any) -> dict[str, Any]:
    return {
        "model_dir": str(result.model_dir),
        "method": result.method,
        "steps": result.steps,
        "rows": result.rows,
        "best_value": result.best_value,
        "valid_metric": result.valid_metric,
        "tokens_per_second": round(result.tokens_per_second, 1),
        "final_loss": result.loss_curve[-1][1] if result.loss_curve else None,
    }


def _save_model_info(ctx: StageContext, result: Any) -> dict[str, Any]:
    info = _train_summary(result)
    _write_json(ctx.directory / "model.json", info)
    return info


# ------------------------------------------------------------------------------------------- stages


def build_stages(cfg: ExperimentConfig, seed: int) -> list[Stage]:
    """The stages of one run seed (see the module docstring), each with the config part it depends on."""
    from w2s_agents.trainers import train_dpo, train_sft

    t = cfg.train
    system = _system(cfg)
    searched = "expand" if cfg.expand.iterations else "trees"  # the stage whose trees MCTS searches

    def tasks_stage(ctx: StageContext) -> dict[str, Any]:
        from w2s_agents.envs.demos import suite_env, suite_task_ids

        env = suite_env(cfg.tasks.suite, max_steps=cfg.tasks.max_steps, **cfg.tasks.env_kwargs)
        try:
            ids = {
                split: suite_task_ids(cfg.tasks.suite, split, env)[:n]
                for split, n in (
                    ("train", cfg.tasks.train),
                    ("valid", cfg.tasks.valid),
                    ("test", cfg.tasks.test),
                )
            }
            for split, want in (("train", cfg.tasks.train), ("test", cfg.tasks.test)):
                if len(ids[split]) < want:
                    raise W2SError(
                        f"tasks.{split}: suite {cfg.tasks.suite} has {len(ids[split])} {split} tasks, {want} asked"
                    )
            all_ids = [i for split in ("train", "valid", "test") for i in ids[split]]
            env.prepare(all_ids, workers=cfg.tasks.workers or os.cpu_count() or 1)  # makes the games
        finally:
            env.close()
        _write_json(ctx.directory / "tasks.json", ids)
        return {split: len(v) for split, v in ids.items()}

    def task_ids(ctx: StageContext, split: str) -> list[str]:
        return list(_read_json(ctx.output("tasks") / "tasks.json")[split])

    def demos_stage(ctx: StageContext) -> dict[str, Any]:
        from w2s_agents.envs.demos import expert_trajectory, suite_env
        from w2s_agents.store import TrajectoryStore

        env = suite_env(cfg.tasks.suite, max_steps=200, **cfg.tasks.env_kwargs)
        won = 0
        try:
            with TrajectoryStore(ctx.directory / "demos.jsonl") as store:
                done = {k.task_id for k in store.keys}
                for task_id in task_ids(ctx, "train"):
                    if task_id in done:
                        continue
                    traj = expert_trajectory(env, task_id)
                    store.append(traj)
        finally:
            env.close()
        demos = _read_trajs(ctx.directory / "demos.jsonl")
        won = sum(d.success for d in demos)
        rows = [_sft_row(d, system) for d in demos if d.success]
        _write_rows(ctx.directory / "sft.jsonl", rows)
        return {"demos": len(demos), "won": won, "rows": len(rows)}

    def models_stage(ctx: StageContext) -> dict[str, Any]:
        from w2s_agents.agents.models import create_tiny_model

        texts = []
        for row in (json.loads(line) for line in (ctx.output("demos") / "sft.jsonl").open(encoding="utf-8")):
            texts.append("\n".join(m["content"] for m in row["messages"]))
        out: dict[str, str] = {}
        for role, mc in (("weak", cfg.weak), ("strong", cfg.strong)):
            if mc.path is not None:
                path = Path(mc.path)
                if not path.is_dir():
                    raise W2SError(f"{role}.path: {path} is not a local model directory")
            else:
                path = ctx.directory / role
                if not path.is_dir():
                    create_tiny_model(
                        path,
                        texts,
                        preset=mc.tiny_preset,
                        vocab_size=mc.vocab_size,
                        seed=derive_seed(seed, "model", role),
                    )
            out[role] = str(path.resolve())
        _write_json(ctx.directory / "models.json", out)
        return out

    def sft_stage(role: str, tc: Any) -> Callable[[StageContext], dict[str, Any]]:
        def run(ctx: StageContext) -> dict[str, Any]:
            models = _Models(ctx)
            result = train_sft(
                models.path(role),
                ctx.output("demos") / "sft.jsonl",
                ctx.directory / "train",
                replace(tc, seed=derive_seed(seed, role, "sft")),
                valid_fn=_valid_fn(cfg, task_ids(ctx, "valid"), ctx.directory),
            )
            return _save_model_info(ctx, result)

        return run

    def explore_stage(ctx: StageContext) -> dict[str, Any]:
        weak = _Models(ctx).path("weak-sft")
        agent = _agent(cfg, weak, "weak-sft", "weak")
        trajs, _ = _play(
            cfg,
            agent,
            task_ids(ctx, "train"),
            cfg.explore.samplers,
            cfg.explore.seeds,
            ctx.directory / "trajectories.jsonl",
            first_seed=derive_seed(seed, "explore") % 1_000_000,
            workers=cfg.explore.workers,
        )
        solved = sorted({x.task_id for x in trajs if x.success})
        stats = {
            "episodes": len(trajs),
            "successes": sum(x.success for x in trajs),
            "tasks_solved": len(solved),
            "env_steps": sum(len(x.steps) for x in trajs),
            "tokens": sum((s.tokens_in or 0) + (s.tokens_out or 0) for x in trajs for s in x.steps),
            "mean_return": sum(x.return_ for x in trajs) / max(1, len(trajs)),
        }
        _write_json(ctx.directory / "explore.json", {**stats, "solved_tasks": solved})
        return stats

    def trees_stage(ctx: StageContext) -> dict[str, Any]:
        from w2s_agents.tree import build_trees, tree_filename

        trees = build_trees(_read_trajs(ctx.output("explore") / "trajectories.jsonl"))
        per_tree = []
        for task_id, tree in sorted(trees.items()):
            tree.save(ctx.directory / "trees" / tree_filename(task_id))
            s = tree.summary()
            per_tree.append(
                {
                    "task_id": task_id,
                    "nodes": s.nodes,
                    "depth": s.depth,
                    "leaves": s.leaves,
                    "branch_points": s.branch_points,
                    "success_leaves": s.successes,
                    "trajectories": s.trajectories,
                }
            )
        _write_json(ctx.directory / "trees.json", per_tree)
        return {"trees": len(per_tree), "nodes": sum(p["nodes"] for p in per_tree)}

    def expand_stage(ctx: StageContext) -> dict[str, Any]:
        from w2s_agents.envs.demos import suite_env
        from w2s_agents.search import expand_online
        from w2s_agents.agents.policy import AgentPolicy
        from w2s_agents.tree import TrajectoryTree

        ec = cfg.expand
        agent = _agent(cfg, _Models(ctx).path("weak-sft"), "weak-sft", "weak")
        env = suite_env(cfg.tasks.suite, max_steps=cfg.tasks.max_steps, **cfg.tasks.env_kwargs)
        paths = sorted((ctx.output("trees") / "trees").glob("*.json"))
        try:
            for path in progress(paths, desc="expand", unit="tree"):
                stats_file = ctx.directory / "stats" / path.name
                if stats_file.is_file():  # expanded before the run was stopped
                    continue
                tree = TrajectoryTree.load(path)
                policy = AgentPolicy(agent, env, temperature=ec.temperature, top_k=ec.top_k)
                oc = ec.online(
                    max_depth=cfg.tasks.max_steps, seed=derive_seed(seed, "expand", tree.task_id) % 2**31
                )
                result = expand_online(tree, policy.env, policy, oc)
                tree.canonicalize()
                tree.save(ctx.directory / "trees" / path.name)
                _write_json(
                    stats_file,
                    {
                        "task_id": tree.task_id,
                        "iterations": result.iterations,
                        "env_steps": result.env_steps,
                        "tokens": result.tokens,
                        "new_nodes": result.new_nodes,
                        "successes": sum(t.success for t in result.trajectories),
                    },
                )
        finally:
            env.close()
        per_tree = [_read_json(ctx.directory / "stats" / p.name) for p in paths]
        totals = {
            k: sum(t[k] for t in per_tree)
            for k in ("iterations", "env_steps", "tokens", "new_nodes", "successes")
        }
        _write_json(ctx.directory / "expand.json", {**totals, "trees": len(per_tree)})
        return totals

    def search_stage(ctx: StageContext) -> dict[str, Any]:
        from w2s_agents.search import (
            best_path_row,
            expert_failure_pairs,
            node_values,
            search_tree,
            tree_pairs,
            unique_rows,
        )
        from w2s_agents.tree import TrajectoryTree

        sc = replace(cfg.search, seed=derive_seed(seed, "search") % 2**31)
        sft_rows, pair_rows = [], []
        for path in sorted((ctx.output(searched) / "trees").glob("*.json")):
            tree = TrajectoryTree.load(path)
            search_tree(tree, sc)
            tree.save(ctx.directory / "trees" / path.name)
            values = node_values(tree, sc.value, sc.discount)
            row = best_path_row(tree, values, min_return=sc.sft_min_value, system=system)
            if row is not None:
                sft_rows.append(row)
            pair_rows += tree_pairs(
                tree,
                values,
                margin=sc.margin,
                per_node=sc.pairs_per_node,
                step=sc.step_pairs,
                continuation=sc.continuation_pairs,
                system=system,
            )
        trajs = _read_trajs(ctx.output("demos") / "demos.jsonl") + _read_trajs(
            ctx.output("explore") / "trajectories.jsonl"
        )
        expert = expert_failure_pairs(trajs, margin=sc.margin, per_task=sc.pairs_per_node, system=system)
        n_sft = _write_rows(ctx.directory / "sft.jsonl", list(unique_rows(sft_rows)))
        n_pairs = _write_rows(ctx.directory / "pairs.jsonl", list(unique_rows(pair_rows)))
        n_expert = _write_rows(ctx.directory / "expert_pairs.jsonl", expert)
        return {"sft_rows": n_sft, "pairs": n_pairs, "expert_pairs": n_expert, "simulations": sc.iterations}

    def dpo_stage(name: str, start: str, data: str, tc: Any, reference: str) -> Callable[[StageContext], Any]:
        def run(ctx: StageContext) -> dict[str, Any]:
            models = _Models(ctx)
            pairs = ctx.output("search") / data
            n = sum(1 for _ in pairs.open(encoding="utf-8"))
            init = models.path(start)
            if n == 0 or init is None:
                why = "no preference pairs" if n == 0 else f"no {start} model"
                logger.warning("%s: skipped (%s)", name, why)
                _write_json(ctx.directory / "model.json", {"skipped": why})
                return {"skipped": why}
            result = train_dpo(
                init,
                pairs,
                ctx.directory / "train",
                replace(tc, method="dpo", seed=derive_seed(seed, name)),
                reference_path=models.path(reference),
                valid_fn=_valid_fn(cfg, task_ids(ctx, "valid"), ctx.directory),
            )
            return _save_model_info(ctx, result)

        return run

    def mcts_stage(ctx: StageContext) -> dict[str, Any]:
        rows = ctx.output("search") / "sft.jsonl"
        if sum(1 for _ in rows.open(encoding="utf-8")) == 0:
            logger.warning("w2s-mcts: skipped (no best path reached the minimum value)")
            _write_json(ctx.directory / "model.json", {"skipped": "no best-path rows"})
            return {"skipped": "no best-path rows"}
        result = train_sft(
            _Models(ctx).path("strong"),
            rows,
            ctx.directory / "train",
            replace(t.mcts_sft, method="mcts-sft", seed=derive_seed(seed, "w2s-mcts")),
            valid_fn=_valid_fn(cfg, task_ids(ctx, "valid"), ctx.directory),
        )
        return _save_model_info(ctx, result)

    def eval_stage(ctx: StageContext) -> dict[str, Any]:
        return _evaluate(cfg, ctx, seed, task_ids(ctx, "test"), task_ids(ctx, "train"), system)

    variants = [v for v in W2S_VARIANTS if v in t.variants]
    stages = [
        Stage("tasks", tasks_stage, config=replace(cfg.tasks, workers=0)),  # workers: not in the outputs
        Stage("demos", demos_stage, config={"system": system}, deps=("tasks",)),
        Stage(
            "models",
            models_stage,
            config={"weak": cfg.weak, "strong": cfg.strong, "seed": seed},
            deps=("demos",),
        ),
        Stage(
            "weak-sft",
            sft_stage("weak", t.weak_sft),
            config=_train_part(cfg, t.weak_sft, seed),
            deps=("models",),
        ),
        Stage(
            "strong-sft",
            sft_stage("strong", t.strong_sft),
            config=_train_part(cfg, t.strong_sft, seed),
            deps=("models",),
        ),
        Stage(
            "explore",
            explore_stage,
            config={"explore": cfg.explore, "agent": cfg.agent, "seed": seed},
            deps=("weak-sft",),
        ),
        Stage("trees", trees_stage, deps=("explore",)),
    ]
    if cfg.expand.iterations:
        stages.append(
            Stage(
                "expand",
                expand_stage,
                config={"expand": cfg.expand, "agent": cfg.agent, "seed": seed},
                deps=("trees", "weak-sft"),
            )
        )
    stages.append(
        Stage(
            "search",
            search_stage,
            config={"search": cfg.search, "seed": seed},
            deps=(searched, "demos"),
        )
    )
    if "w2s-mcts" in variants or "w2s-mcts-treedpo" in variants:
        stages.append(
            Stage(
                "w2s-mcts", mcts_stage, config=_train_part(cfg, t.mcts_sft, seed), deps=("search", "models")
            )
        )
    if "w2s-treedpo" in variants:
        stages.append(
            Stage(
                "w2s-treedpo",
                dpo_stage("w2s-treedpo", "strong-sft", "pairs.jsonl", t.treedpo, "weak-sft"),
                config=_train_part(cfg, t.treedpo, seed),
                deps=("search", "strong-sft", "weak-sft"),
            )
        )
    if "w2s-mcts-treedpo" in variants:
        stages.append(
            Stage(
                "w2s-mcts-treedpo",
                dpo_stage("w2s-mcts-treedpo", "w2s-mcts", "pairs.jsonl", t.treedpo, "weak-sft"),
                config=_train_part(cfg, t.treedpo, seed),
                deps=("search", "w2s-mcts", "weak-sft"),
            )
        )
    if t.ceiling:
        stages.append(
            Stage(
                "ceiling",
                dpo_stage("ceiling", "strong-sft", "expert_pairs.jsonl", t.ceiling_dpo, "strong-sft"),
                config=_train_part(cfg, t.ceiling_dpo, seed),
                deps=("search", "strong-sft"),
            )
        )
    stages.append(
        Stage(
            "eval",
            eval_stage,
            config={"eval": cfg.eval, "agent": cfg.agent, "variants": variants, "ceiling": t.ceiling},
            deps=tuple(
                s.name
                for s in stages
                if s.name not in ("tasks", "demos", "models", "trees", "expand", "search")
            ),
        )
    )
    return stages


def _train_part(cfg: ExperimentConfig, tc: Any, seed: int) -> dict[str, Any]:
    return {
        "train": tc,
        "valid_success": cfg.train.valid_success,
        "agent": cfg.agent if cfg.train.valid_success else None,
        "seed": seed,
    }


def stage_names(cfg: ExperimentConfig) -> list[str]:
    """Names of the stages of ``cfg``, in order (for ``--from`` / ``--until``)."""
    return [s.name for s in build_stages(cfg, cfg.run.seed_list[0])]


# ------------------------------------------------------------------------------------------- evaluation


def _episode_units(trajs: Sequence[Trajectory], seed: int) -> list[dict[str, Any]]:
    return [
        {
            "run_seed": seed,
            "task_id": x.task_id,
            "sampler": x.source.sampler,
            "seed": x.source.seed,
            "return": x.return_,
            "success": bool(x.success),
            "steps": len(x.steps),
            "tokens": sum((s.tokens_in or 0) + (s.tokens_out or 0) for s in x.steps),
        }
        for x in trajs
    ]


def _evaluate(
    cfg: ExperimentConfig,
    ctx: StageContext,
    seed: int,
    test_tasks: Sequence[str],
    train_tasks: Sequence[str],
    system: str,
) -> dict[str, Any]:
    from w2s_agents.agents.agent import EpisodeState

    models = _Models(ctx)
    names = ["weak-sft", "strong-sft", *[v for v in W2S_VARIANTS if v in ctx.outputs], "ceiling"]
    out: dict[str, Any] = {"models": {}, "train": {}, "misfit": {}}
    agents: dict[str, Any] = {}
    for name in names:
        path = models.path(name) if name in ctx.outputs else None
        if path is None:
            continue
        role = "weak" if name == "weak-sft" else "strong"
        agents[name] = agent = _agent(cfg, path, name, role)
        trajs, _ = _play(
            cfg, agent, test_tasks, cfg.eval.samplers, cfg.eval.seeds, ctx.directory / f"test-{name}.jsonl"
        )
        out["models"][name] = _episode_units(trajs, seed)
        if cfg.eval.train_tasks and (name == "weak-sft" or name.startswith("w2s-")):
            trajs, _ = _play(
                cfg,
                agent,
                train_tasks,
                cfg.eval.samplers,
                cfg.eval.seeds,
                ctx.directory / f"train-{name}.jsonl",
            )
            out["train"][name] = {
                t: any(u["success"] for u in _episode_units(trajs, seed) if u["task_id"] == t)
                for t in train_tasks
            }
    # misfit: held-out states of the weak SFT agent's test episodes
    weak_trajs = _read_trajs(ctx.directory / "test-weak-sft.jsonl")
    states = [
        EpisodeState.from_trajectory(x, i)
        for x in weak_trajs
        for i in range(len(x.steps))
        if x.steps[i].admissible
    ][: cfg.eval.misfit_states]
    if states and "weak-sft" in agents:
        p_weak = agents["weak-sft"].action_distributions(states)
        for name in agents:
            if not name.startswith("w2s-"):
                continue
            p_strong = agents[name].action_distributions(states)
            keys = [list(p) for p in p_weak]
            m = misfit(
                [[pw[k] for k in ks] for pw, ks in zip(p_weak, keys, strict=True)],
                [[ps.get(k, 0.0) for k in ks] for ps, ks in zip(p_strong, keys, strict=True)],
            )
            out["misfit"][name] = m.as_dict()
    explore = _read_json(ctx.output("explore") / "explore.json")
    out["explored_solved"] = {t: t in set(explore["solved_tasks"]) for t in train_tasks}
    _write_json(ctx.directory / "eval.json", out)
    return {
        name: round(sum(u["return"] for u in units) / max(1, len(units)), 4)
        for name, units in out["models"].items()
    }


# ------------------------------------------------------------------------------------------- aggregation


def aggregate(run_dir: Path, seeds: Sequence[int], cfg: ExperimentConfig) -> dict[str, Any]:
    """The metrics of a run (schema ``w2s.metrics/1``) from the eval outputs of every seed."""
    per_seed = {s: _read_json(run_dir / f"seed-{s}" / "eval" / "eval.json") for s in seeds}
    names: list[str] = []
    for ev in per_seed.values():
        names += [n for n in ev["models"] if n not in names]
    models: dict[str, Any] = {}
    scores: dict[str, dict[tuple, float]] = {}
    level_seed = derive_seed(cfg.run.seed, "bootstrap") % 2**31
    for name in names:
        units = [u for ev in per_seed.values() for u in ev["models"].get(name, [])]
        groups = [u["run_seed"] for u in units]
        models[name] = {
            "label": MODEL_LABELS.get(name, name),
            "return": bootstrap_interval([u["return"] for u in units], groups, seed=level_seed).as_dict(),
            "success": bootstrap_interval(
                [float(u["success"]) for u in units], groups, seed=level_seed
            ).as_dict(),
            "steps": bootstrap_interval([u["steps"] for u in units], groups, seed=level_seed).as_dict(),
            "episodes": len(units),
            "tokens": sum(u["tokens"] for u in units),
        }
        scores[name] = {(u["run_seed"], u["task_id"], u["sampler"], u["seed"]): u["return"] for u in units}
    metrics: dict[str, Any] = {
        "schema": METRICS_SCHEMA,
        "run": cfg.run.name,
        "config_hash": config_hash(cfg),
        "suite": cfg.tasks.suite,
        "split": "test",
        "tasks": cfg.tasks.test,
        "seeds": list(seeds),
        "models": models,
        "pgr": {},
        "gain": {},
        "misfit": {},
        "transfer": {},
    }
    weak = scores.get("weak-sft", {})
    for name in names:
        if not name.startswith("w2s-"):
            continue
        if "ceiling" in scores:
            metrics["pgr"][name] = paired_pgr(
                weak, scores[name], scores["ceiling"], seed=level_seed
            ).as_dict()
        if weak:
            metrics["gain"][name] = (
                models[name]["return"]["estimate"] - models["weak-sft"]["return"]["estimate"]
            )
        mis = [ev["misfit"][name] for ev in per_seed.values() if name in ev.get("misfit", {})]
        if mis:
            n = sum(m["states"] for m in mis)
            metrics["misfit"][name] = {
                "disagreement": sum(m["disagreement"] * m["states"] for m in mis) / n if n else math.nan,
                "kl": sum(m["kl"] * m["states"] for m in mis) / n if n else math.nan,
                "states": n,
            }
        tr = [
            transfer(ev["train"]["weak-sft"], ev["train"][name], ev["explored_solved"])
            for ev in per_seed.values()
            if name in ev.get("train", {}) and "weak-sft" in ev.get("train", {})
        ]
        if tr:
            c, wf = sum(x.corrected for x in tr), sum(x.weak_failed for x in tr)
            e, un = sum(x.expanded for x in tr), sum(x.uncovered for x in tr)
            metrics["transfer"][name] = {
                "correction": c / wf if wf else math.nan,
                "corrected": c,
                "weak_failed": wf,
                "expansion": e / un if un else math.nan,
                "expanded": e,
                "uncovered": un,
            }
    # search cost and trees
    cost = {
        "exploration_episodes": 0,
        "exploration_env_steps": 0,
        "exploration_tokens": 0,
        "mcts_simulations": 0,
    }
    per_tree: list[dict[str, Any]] = []
    for s in seeds:
        ex = _read_json(run_dir / f"seed-{s}" / "explore" / "explore.json")
        cost["exploration_episodes"] += ex["episodes"]
        cost["exploration_env_steps"] += ex["env_steps"]
        cost["exploration_tokens"] += ex["tokens"]
        trees = _read_json(run_dir / f"seed-{s}" / "trees" / "trees.json")
        cost["mcts_simulations"] += cfg.search.iterations * len(trees)
        expanded = run_dir / f"seed-{s}" / "expand" / "expand.json"
        if cfg.expand.iterations and expanded.is_file():
            ex = _read_json(expanded)
            for key in ("iterations", "env_steps", "tokens", "new_nodes"):
                cost[f"online_{key}"] = cost.get(f"online_{key}", 0) + ex[key]
        per_tree += trees
    metrics["search_cost"] = cost
    if per_tree:
        metrics["trees"] = {
            "trees": len(per_tree),
            "nodes_mean": sum(t["nodes"] for t in per_tree) / len(per_tree),
            "depth_mean": sum(t["depth"] for t in per_tree) / len(per_tree),
            "trees_with_success": sum(t["success_leaves"] > 0 for t in per_tree),
            "per_tree": per_tree,
        }
    curves: dict[str, Any] = {}
    first = run_dir / f"seed-{seeds[0]}"
    for name in ("weak-sft", "strong-sft", *W2S_VARIANTS, "ceiling"):
        result = first / name / "train" / "result.json"
        if result.is_file():
            r = _read_json(result)
            curves[name] = {
                "loss": r.get("loss_curve", []),
                "valid": [[v["epoch"], v["value"]] for v in r.get("valid_curve", [])],
            }
    metrics["curves"] = curves
    return metrics


# ------------------------------------------------------------------------------------------- run


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
        ConfigError: ``from_stage`` / ``until`` names no stage.
        W2SError: a stage failed with a reportable error (finished stages stay cached).
    """
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

    for s in seeds:
        seed_everything(s)
        logger.info("run %s seed %d: %s", cfg.run.name, s, run_dir / f"seed-{s}")
        records[s] = []

        def on_stage(rec: StageRecord, s: int = s) -> None:
            records[s].append(rec)
            manifest()

        run_stages(
            build_stages(cfg, s), run_dir / f"seed-{s}", from_stage=from_stage, until=until, on_stage=on_stage
        )
    if until is not None and until != "eval":
        manifest({"finished": time.time(), "until": until})
        return PipelineResult(run_dir, run_dir / "report.md", {}, records)
    metrics = aggregate(run_dir, seeds, cfg)
    metrics["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    _write_json(run_dir / "metrics.json", metrics)
    report = write_report(metrics, run_dir)
    manifest({"finished": time.time()})
    logger.info("report: %s", report)
    return PipelineResult(run_dir, report, metrics, records)
