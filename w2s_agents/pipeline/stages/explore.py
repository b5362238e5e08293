"""The stages that gather the weak agent's experience: ``explore`` (episodes) and ``trees`` (one tree per task)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from w2s_agents.pipeline.cache import StageContext
from w2s_agents.pipeline.experiment import ExperimentConfig, TreeConfig
from w2s_agents.pipeline.stage_io import (
    exploration_stats,
    load_agent,
    model_path,
    play_episodes,
    read_trajectories,
    task_ids,
    write_json,
)
from w2s_agents.pipeline.tracking import rollout_scalars, track_stage
from w2s_agents.seeding import derive_seed

if TYPE_CHECKING:
    from w2s_agents.agents import Sampler

__all__ = ["explore_pairs", "run_explore", "run_trees"]

logger = logging.getLogger(__name__)


def explore_pairs(samplers: Sequence[Sampler], seeds: int, width: int = 0) -> list[tuple[Sampler, int]]:
    """The (sampler, seed index) pairs that exploration plays on every train task, seed-major.

    ``width`` 0 gives every sampler x ``range(seeds)``; ``width`` N > 0 the first N pairs of seed 0 of every
    sampler in list order, then seed 1 of every sampler, and so on (``explore.width``).

    Raises:
        ValueError: ``width`` is negative or above ``len(samplers) * seeds``.
    """
    pairs = [(sampler, s) for s in range(seeds) for sampler in samplers]
    if not 0 <= width <= len(pairs):
        raise ValueError(f"width must be between 0 and {len(pairs)} (samplers x seeds), got {width}")
    return pairs[:width] if width else pairs


def _episode_groups(
    pairs: Sequence[tuple[Sampler, int]],
) -> list[tuple[list[Sampler], list[int]]]:
    """``pairs`` as (samplers, consecutive seed indices) groups, each a full cross product for one rollout call:
    seeds that play the same samplers share a group."""
    per_seed: dict[int, list[Sampler]] = {}
    for sampler, s in pairs:
        per_seed.setdefault(s, []).append(sampler)
    groups: list[tuple[list[Sampler], list[int]]] = []
    for s, samplers in per_seed.items():
        if groups and groups[-1][0] == samplers and groups[-1][1][-1] == s - 1:
            groups[-1][1].append(s)
        else:
            groups.append((samplers, [s]))
    return groups


def run_explore(
    ctx: StageContext,
    cfg: ExperimentConfig,
    seed: int,
    *,
    model: str = "weak-sft",
    source: str | None = None,
    role: str = "weak",
) -> dict[str, Any]:
    """Stage ``explore``: the weak SFT agent on every train task under every sampler of ``explore.samplers``
    (the tree width), ``explore.seeds`` episodes each, or the first ``explore.width`` (sampler, seed) pairs
    (:func:`explore_pairs`), on ``explore.workers`` Ray workers or in this process. An episode has the same seed
    whatever the width, so a narrower exploration plays a subset of a wider one's episodes.

    Stage ``explore-<name>`` is the same with ``model`` the extra weak model's SFT stage ``weak-sft-<name>``,
    the source of its episodes. Stage ``explore-r<k>`` (``run.rounds``) is the same with ``model`` round k-1's
    W2S model, ``source`` the name its episodes carry (``w2s-mcts-r1``) and ``role`` strong; it plays nothing
    when that model was not trained (its stage skipped), and says so in ``explore.json`` (``skipped``).

    Reads: ``<model>/model.json``, the train task ids. Writes: ``trajectories.jsonl`` (resumable: a stopped run
    plays only the missing episodes) and ``explore.json`` (the statistics below plus ``solved_tasks``).
    Returns episodes, successes, tasks solved, env steps, tokens and mean return.
    """
    path = model_path(ctx, model)
    skipped = {} if path is not None else {"skipped": f"no {model} model"}
    trajs = []
    if path is None:
        logger.warning("%s: plays nothing (no %s model: its stage was skipped)", ctx.name, model)
    else:
        agent = load_agent(cfg, path, source or model, role)
        first_seed = derive_seed(seed, "explore") % 1_000_000
        pairs = explore_pairs(cfg.explore.samplers, cfg.explore.seeds, cfg.explore.width)
        for samplers, seeds in _episode_groups(pairs):
            trajs, _ = play_episodes(
                cfg,
                agent,
                task_ids(ctx, "train"),
                samplers,
                len(seeds),
                ctx.directory / "trajectories.jsonl",
                first_seed=first_seed + seeds[0],
                workers=cfg.explore.workers,
                max_steps=cfg.explore_max_steps,
            )
    stats = exploration_stats(trajs)
    solved = stats.pop("solved_tasks")
    write_json(ctx.directory / "explore.json", {**stats, "solved_tasks": solved, **skipped})
    track_stage(ctx, cfg, seed, rollout_scalars(stats))
    return {**stats, **skipped}


def run_trees(
    ctx: StageContext,
    *,
    explores: tuple[str, ...] = ("explore",),
    tree: TreeConfig | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Stage ``trees``: the trajectories of the exploration stages ``explores`` (``explore``, and
    ``explore-<name>`` of every extra weak model) merged into one trajectory tree per train task. Stage
    ``trees-r<k>`` (``run.rounds``) is the same over those and ``explore-r2`` .. ``explore-r<k>``.

    Reads: ``<explore>/trajectories.jsonl``. Writes: ``trees/<task>.json`` and ``trees.json`` (per tree: nodes,
    depth, leaves, branch points, successful leaves, trajectories). Returns the number of trees and nodes.

    ``tree`` (the ``tree`` config section) chooses the merge; with ``tree.merge: similarity`` every row of
    ``trees.json`` also has ``nodes_exact`` and ``nodes_similarity`` (the trees saved are the similarity ones),
    and the summary the totals, ``xi_sim`` and ``embedder`` (:mod:`w2s_agents.pipeline.tree_merge`).
    """
    from w2s_agents.pipeline.tree_merge import merge_trees
    from w2s_agents.tree import tree_filename

    merged = merge_trees(
        [x for stage in explores for x in read_trajectories(ctx.output(stage) / "trajectories.jsonl")],
        tree,
        device=device,
    )
    trees = merged.trees
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
                **merged.counts(task_id),
            }
        )
    write_json(ctx.directory / "trees.json", per_tree)
    return {"trees": len(per_tree), "nodes": sum(p["nodes"] for p in per_tree), **merged.info}
