"""The metrics of a run (schema ``w2s.metrics/1``), aggregated over its seeds from the stages' outputs.

:func:`aggregate` reads every seed's ``eval/eval.json`` (the units of :mod:`w2s_agents.pipeline.evaluate`),
``explore/explore.json``, ``trees/trees.json``, ``expand/expand.json`` and the first seed's training results,
and computes what the report shows: per-model intervals, PGR, gain, misfit, correction and expansion, search
cost, tree statistics and learning curves (layout in :mod:`w2s_agents.pipeline.report`).

The metrics are strict JSON (:func:`write_metrics`): a number that cannot be computed is ``null`` with a
``reason`` beside it (e.g. PGR when the ceiling does not beat weak SFT by
:data:`~w2s_agents.pipeline.stats.PGR_MIN_GAP`), never a bare ``NaN`` that strict readers (jq, JavaScript)
reject.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from w2s_agents.atomic import atomic_write
from w2s_agents.config import config_hash
from w2s_agents.pipeline.evaluate import MODEL_STAGES
from w2s_agents.pipeline.experiment import ExperimentConfig
from w2s_agents.pipeline.report import METRICS_SCHEMA, MODEL_LABELS
from w2s_agents.pipeline.rl import rl_label, rl_metrics
from w2s_agents.pipeline.rounds import round_label, round_metrics, round_name
from w2s_agents.pipeline.stage_io import read_json, read_trajectories
from w2s_agents.pipeline.stats import Misfit, Transfer, bootstrap_interval, paired_pgr, transfer
from w2s_agents.pipeline.weaks import extra_weaks, weak_label, weak_supervisor_metrics
from w2s_agents.seeding import derive_seed

__all__ = ["aggregate", "strict_json", "write_metrics"]

logger = logging.getLogger(__name__)


def _model_metrics(
    per_seed: dict[int, Any], names: Sequence[str], level_seed: int
) -> tuple[dict[str, Any], dict[str, dict[tuple, float]]]:
    """Per model: intervals of return, success and steps, episodes and tokens; and its return per unit."""
    models: dict[str, Any] = {}
    scores: dict[str, dict[tuple, float]] = {}
    for name in names:
        units = [u for ev in per_seed.values() for u in ev["models"].get(name, [])]
        groups = [u["run_seed"] for u in units]
        models[name] = {
            "label": MODEL_LABELS.get(name) or weak_label(name),
            "return": bootstrap_interval([u["return"] for u in units], groups, seed=level_seed).as_dict(),
            "success": bootstrap_interval(
                [float(u["success"]) for u in units], groups, seed=level_seed
            ).as_dict(),
            "steps": bootstrap_interval([u["steps"] for u in units], groups, seed=level_seed).as_dict(),
            "episodes": len(units),
            "tokens": sum(u["tokens"] for u in units),
            "return_per_seed": {
                str(s): sum(r) / len(r)
                for s in per_seed
                if (r := [u["return"] for u in units if u["run_seed"] == s])
            },
        }
        scores[name] = {(u["run_seed"], u["task_id"], u["sampler"], u["seed"]): u["return"] for u in units}
    return models, scores


def _weak_to_strong(
    metrics: dict[str, Any],
    per_seed: dict[int, Any],
    names: Sequence[str],
    scores: dict[str, dict[tuple, float]],
    level_seed: int,
) -> None:
    """Fill ``pgr``, ``gain``, ``vs_strong``, ``misfit`` and ``transfer`` of every W2S model into ``metrics``.

    ``vs_strong`` is the mean of W2S minus strong SFT return over the episodes both played (same run seed, task,
    sampler and episode seed), with a paired bootstrap interval: run seeds, then episodes within a seed.
    """
    models = metrics["models"]
    weak = scores.get("weak-sft", {})
    for name in names:
        if not name.startswith("w2s-"):
            continue
        if "ceiling" in scores:
            iv = paired_pgr(weak, scores[name], scores["ceiling"], seed=level_seed)
            metrics["pgr"][name] = iv.as_dict()
            label = models[name]["label"]
            if iv.reason:
                logger.warning("PGR of %s: %s", label, iv.reason)
            elif iv.dropped:
                logger.warning(
                    "PGR of %s: %.1f%% of the bootstrap resamples dropped (ceiling - weak below the minimum gap)",
                    label,
                    100 * iv.dropped,
                )
        if "strong-sft" in scores:
            strong = scores["strong-sft"]
            shared = [u for u in scores[name] if u in strong]
            metrics["vs_strong"][name] = bootstrap_interval(
                [scores[name][u] - strong[u] for u in shared], [u[0] for u in shared], seed=level_seed
            ).as_dict()
        if weak:
            metrics["gain"][name] = (
                models[name]["return"]["estimate"] - models["weak-sft"]["return"]["estimate"]
            )
        mis = [ev["misfit"][name] for ev in per_seed.values() if name in ev.get("misfit", {})]
        if mis:
            n = sum(m["states"] for m in mis)
            metrics["misfit"][name] = Misfit(
                disagreement=sum(m["disagreement"] * m["states"] for m in mis) / n if n else math.nan,
                kl=sum(m["kl"] * m["states"] for m in mis) / n if n else math.nan,
                states=n,
            ).as_dict()
        tr = [
            transfer(ev["train"]["weak-sft"], ev["train"][name], ev["explored_solved"])
            for ev in per_seed.values()
            if name in ev.get("train", {}) and "weak-sft" in ev.get("train", {})
        ]
        if tr:
            c, wf = sum(x.corrected for x in tr), sum(x.weak_failed for x in tr)
            e, un = sum(x.expanded for x in tr), sum(x.uncovered for x in tr)
            metrics["transfer"][name] = Transfer(
                correction=c / wf if wf else math.nan,
                corrected=c,
                weak_failed=wf,
                expansion=e / un if un else math.nan,
                expanded=e,
                uncovered=un,
            ).as_dict()


def _search_cost(
    run_dir: Path, seeds: Sequence[int], cfg: ExperimentConfig
) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Exploration and search cost summed over seeds (online expansion's when it ran), and every tree's row."""
    cost = {
        "exploration_episodes": 0,
        "exploration_env_steps": 0,
        "exploration_tokens": 0,
        "mcts_simulations": 0,
    }
    per_tree: list[dict[str, Any]] = []
    explores = ("explore", *(w.explore_stage for w in extra_weaks(cfg)))  # every weak model's exploration
    # run.rounds > 1: each later round's exploration, trees and expansion
    later = range(2, cfg.run.rounds + 1)
    explores += tuple(round_name("explore", k) for k in later)
    for s in seeds:
        for stage in explores:
            ex = read_json(run_dir / f"seed-{s}" / stage / "explore.json")
            cost["exploration_episodes"] += ex["episodes"]
            cost["exploration_env_steps"] += ex["env_steps"]
            cost["exploration_tokens"] += ex["tokens"]
        trees = read_json(run_dir / f"seed-{s}" / "trees" / "trees.json")
        cost["mcts_simulations"] += cfg.search.iterations * len(trees)
        for k in later:
            n = len(read_json(run_dir / f"seed-{s}" / round_name("trees", k) / "trees.json"))
            cost["mcts_simulations"] += cfg.search.iterations * n
        for stage in ("expand", *(round_name("expand", k) for k in later)):
            expanded = run_dir / f"seed-{s}" / stage / "expand.json"
            if cfg.expand.iterations and expanded.is_file():
                ex = read_json(expanded)
                for key in ("iterations", "env_steps", "tokens", "new_nodes"):
                    cost[f"online_{key}"] = cost.get(f"online_{key}", 0) + ex[key]
        per_tree += trees
    return cost, per_tree


def _curves(seed_dir: Path) -> dict[str, Any]:
    """Loss and validation curves of every training stage of one seed that trained."""
    curves: dict[str, Any] = {}
    for name in MODEL_STAGES:
        result = seed_dir / name / "train" / "result.json"
        if result.is_file():
            r = read_json(result)
            curves[name] = {
                "loss": r.get("loss_curve", []),
                "valid": [[v["epoch"], v["value"]] for v in r.get("valid_curve", [])],
            }
    return curves


def aggregate(run_dir: Path, seeds: Sequence[int], cfg: ExperimentConfig) -> dict[str, Any]:
    """The metrics of a run (schema ``w2s.metrics/1``) from the outputs of every seed's stages.

    Intervals are bootstrapped with a seed derived from ``run.seed``, so the same outputs give the same metrics.
    Learning curves are the first seed's.
    """
    per_seed = {s: read_json(run_dir / f"seed-{s}" / "eval" / "eval.json") for s in seeds}
    names: list[str] = []
    for ev in per_seed.values():
        names += [n for n in ev["models"] if n not in names]
    level_seed = derive_seed(cfg.run.seed, "bootstrap") % 2**31
    models, scores = _model_metrics(per_seed, names, level_seed)
    for name, m in models.items():  # run.rounds > 1: "W2S-MCTS (round 1)", ...; rl.rounds: "W2S-RL (round 1)"
        m["label"] = round_label(name, MODEL_LABELS, cfg.run.rounds) or rl_label(name) or m["label"]
    metrics: dict[str, Any] = {
        "schema": METRICS_SCHEMA,
        "run": cfg.run.name,
        "config_hash": config_hash(cfg),
        "suite": cfg.tasks.suite,
        "split": cfg.eval.split,
        "tasks": cfg.tasks.test if cfg.eval.split == "test" else cfg.tasks.valid,
        "seeds": list(seeds),
        "models": models,
        "pgr": {},
        "gain": {},
        "vs_strong": {},
        "misfit": {},
        "transfer": {},
    }
    _weak_to_strong(metrics, per_seed, names, scores, level_seed)
    cost, per_tree = _search_cost(run_dir, seeds, cfg)
    metrics["search_cost"] = cost
    if per_tree:
        metrics["trees"] = {
            "trees": len(per_tree),
            "nodes_mean": sum(t["nodes"] for t in per_tree) / len(per_tree),
            "depth_mean": sum(t["depth"] for t in per_tree) / len(per_tree),
            "trees_with_success": sum(t["success_leaves"] > 0 for t in per_tree),
            "per_tree": per_tree,
        }
        if all("nodes_similarity" in t for t in per_tree):  # tree.merge similarity: node counts both ways
            metrics["trees"].update(
                merge="similarity",
                xi_sim=cfg.tree.xi_sim,
                nodes_exact=sum(t["nodes_exact"] for t in per_tree),
                nodes_similarity=sum(t["nodes_similarity"] for t in per_tree),
            )
    paths = _best_paths(run_dir, seeds)
    if paths is not None:
        metrics["best_paths"] = paths
    if cfg.run.rounds > 1:  # each round's exploration, trees, training data and models
        metrics["rounds"] = round_metrics(run_dir, seeds, cfg)
    if cfg.rl.rounds:  # each RL round's exploration, grown trees, policy-gradient rows and model
        metrics["rl"] = rl_metrics(run_dir, seeds, cfg)
    if cfg.weak_extra:  # several weak supervisors: each one's share of the data, the learned weights
        metrics["weak_supervisors"] = weak_supervisor_metrics(run_dir, seeds, cfg)
    metrics["curves"] = _curves(run_dir / f"seed-{seeds[0]}")
    return strict_json(metrics)


def _not_finite_in(value: Any) -> bool:
    """Whether ``value`` is, or a list below it (not a dict, which explains its own) holds, a non-finite number."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(_not_finite_in(v) for v in value)
    return False


def strict_json(value: Any) -> Any:
    """``value`` (nested dicts and lists) with every NaN or infinite number replaced by None; a dict where one
    was replaced (as a value or inside a list value) gets a ``reason`` unless it has one, so that no ``null``
    goes unexplained."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        out = {k: strict_json(v) for k, v in value.items()}
        if "reason" not in out and any(_not_finite_in(v) for v in value.values()):
            out["reason"] = "not a number (nothing to compute it from)"
        return out
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_metrics(path: str | os.PathLike[str], metrics: Mapping[str, Any]) -> Path:
    """Write ``metrics`` as strict JSON (:func:`strict_json`; no ``NaN``), atomically; return the path."""
    target = Path(path)
    text = json.dumps(strict_json(metrics), indent=1, default=str, allow_nan=False)
    with atomic_write(target) as fh:
        fh.write(text + "\n")
    return target


def _best_paths(run_dir: Path, seeds: Sequence[int]) -> dict[str, Any] | None:
    """The best-path summary of the search stages (``search/paths.json``) over every seed, with how many best
    paths were as short as the expert's demo of their task before and after shortening; None without one."""
    from w2s_agents.pipeline.stages.search import summarize_paths

    stats: list[dict[str, Any]] = []
    expert_before = expert_after = with_demo = 0
    for s in seeds:
        seed_dir = run_dir / f"seed-{s}"
        f = seed_dir / "search" / "paths.json"
        if not f.is_file():
            return None
        trees = read_json(f)["trees"]
        stats += trees
        demos = {
            t.task_id: t.num_steps for t in read_trajectories(seed_dir / "demos" / "demos.jsonl") if t.success
        }
        for entry in trees:
            if entry["task_id"] in demos:
                with_demo += 1
                expert_before += entry["raw_steps"] <= demos[entry["task_id"]]
                expert_after += entry["steps"] <= demos[entry["task_id"]]
    summary = summarize_paths(stats)
    summary.update(
        as_short_as_expert_before=expert_before,
        as_short_as_expert_after=expert_after,
        with_expert_demo=with_demo,
    )
    return summary
