"""The ``search`` stage: offline MCTS over every tree, then the training data taken from the searched trees.

Each tree's SFT row is made of its best path as ``search.paths`` says: the greedy tree path by value (the
paper's), or that path with its cycles cut, or the fewest moves over the states the trajectories reached
(:mod:`w2s_agents.search.paths`). A shortened path is replayed in the env before it becomes a row; one that does
not reach the outcome it was taken for is dropped and counted, and the next candidate is tried.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from w2s_agents.pipeline.cache import StageContext
from w2s_agents.pipeline.experiment import ExperimentConfig
from w2s_agents.pipeline.stage_io import read_trajectories, training_system, write_json
from w2s_agents.pipeline.tracking import track_stage
from w2s_agents.seeding import derive_seed
from w2s_agents.tree import TrajectoryTree

if TYPE_CHECKING:
    from w2s_agents.search import PathChoice

__all__ = ["run_search", "summarize_paths"]


def run_search(ctx: StageContext, cfg: ExperimentConfig, seed: int, *, trees_stage: str) -> dict[str, Any]:
    """Stage ``search``: MCTS (``cfg.search``) over each tree of ``trees_stage`` (``trees``, or ``expand`` when
    the trees were grown online), then per tree the best-path SFT row (when its value reaches
    ``search.sft_min_value``) and the TreeDPO pairs at its divergence points, and over all trajectories the
    expert-vs-failed pairs of the ceiling.

    Reads: ``<trees_stage>/trees/*.json``, ``demos/demos.jsonl``, ``explore/trajectories.jsonl``. Writes:
    ``trees/<task>.json`` (with the MCTS statistics), ``sft.jsonl``, ``pairs.jsonl``, ``expert_pairs.jsonl``,
    ``paths.json`` (per tree: the best path's length before and after, how it was found, replays dropped).
    Returns the row and pair counts, the simulations per tree and the best-path summary.
    """
    from w2s_agents.envs.demos import suite_env
    from w2s_agents.search import (
        env_replayer,
        expert_failure_pairs,
        node_values,
        search_tree,
        tree_rows,
        unique_rows,
        write_rows,
    )

    system = training_system(cfg)
    sc = replace(cfg.search, seed=derive_seed(seed, "search") % 2**31)
    sft_rows, pair_rows, path_stats = [], [], []
    nodes = visited = 0  # over every tree: nodes, nodes the search went through (tracked, run.report_to)
    # shortened best paths are replayed in the env of the suite before they become rows
    env = None
    if sc.paths != "tree":
        env = suite_env(cfg.tasks.suite, **cfg.tasks.env_settings(cfg.explore_max_steps))
    try:
        replay = env_replayer(env) if env is not None else None
        for path in sorted((ctx.output(trees_stage) / "trees").glob("*.json")):
            tree = TrajectoryTree.load(path)
            mcts = search_tree(tree, sc)
            nodes, visited = nodes + tree.num_nodes, visited + int((mcts.visits > 0).sum())
            tree.save(ctx.directory / "trees" / path.name)
            data = tree_rows(tree, node_values(tree, sc.value, sc.discount), sc, replay=replay, system=system)
            if data.row is not None:
                sft_rows.append(data.row)
            path_stats.append(_path_stats(tree, data.choice, data.row is not None))
            pair_rows += data.pairs
    finally:
        if env is not None:
            env.close()
    trajs = read_trajectories(ctx.output("demos") / "demos.jsonl") + read_trajectories(
        ctx.output("explore") / "trajectories.jsonl"
    )
    expert = expert_failure_pairs(trajs, margin=sc.margin, per_task=sc.pairs_per_node, system=system)
    n_sft = write_rows(unique_rows(sft_rows), ctx.directory / "sft.jsonl")
    n_pairs = write_rows(unique_rows(pair_rows), ctx.directory / "pairs.jsonl")
    n_expert = write_rows(expert, ctx.directory / "expert_pairs.jsonl")
    summary = summarize_paths(path_stats)
    write_json(ctx.directory / "paths.json", {"summary": summary, "trees": path_stats})
    out = {
        "sft_rows": n_sft,
        "pairs": n_pairs,
        "expert_pairs": n_expert,
        "simulations": sc.iterations,
        "best_paths": summary,
    }
    track_stage(ctx, cfg, seed, {"search": {**out, "nodes": nodes, "nodes_visited": visited}})
    return out


def _path_stats(tree: TrajectoryTree, choice: PathChoice, kept: bool) -> dict[str, Any]:
    """What the best path of one tree became (one entry of ``paths.json``)."""
    won = (
        choice.trajectory.success
        if choice.trajectory is not None
        else tree.terminal(choice.nodes[-1]).get("won", 0) > 0
    )
    return {
        "task_id": tree.task_id,
        "path": choice.kind,
        "raw_steps": choice.raw_steps,
        "steps": choice.steps,
        "dropped": list(choice.tried),
        "won": bool(won),
        "tree_won": tree.successes(0) > 0,
        "row": kept,
    }


def summarize_paths(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """The best paths of a run's trees in numbers: how many were shortened (loop-erased or stitched), their
    mean length before and after, the stitched paths found and dropped by replay, and coverage expansion (trees
    where no trajectory won but the chosen path's replay does)."""
    n = len(stats)
    shortened = [s for s in stats if s["path"] != "tree"]
    return {
        "trees": n,
        "shortened": len(shortened),
        "loop_erased": sum(s["path"] == "loop-erased" for s in stats),
        "stitched": sum(s["path"] == "stitched" for s in stats),
        "stitched_found": sum(s["path"] == "stitched" or "stitched" in s["dropped"] for s in stats),
        "dropped_by_replay": sum(len(s["dropped"]) for s in stats),
        "mean_steps_before": sum(s["raw_steps"] for s in stats) / n if n else 0.0,
        "mean_steps_after": sum(s["steps"] for s in stats) / n if n else 0.0,
        "won": sum(s["won"] for s in stats),
        "expanded": sum(s["won"] and not s["tree_won"] for s in stats),
    }
