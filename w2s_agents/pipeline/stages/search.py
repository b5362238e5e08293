"""The ``search`` stage: offline MCTS over every tree, then the training data taken from the searched trees."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from w2s_agents.pipeline.cache import StageContext
from w2s_agents.pipeline.experiment import ExperimentConfig
from w2s_agents.pipeline.stage_io import read_trajectories, training_system
from w2s_agents.seeding import derive_seed

__all__ = ["run_search"]


def run_search(ctx: StageContext, cfg: ExperimentConfig, seed: int, *, trees_stage: str) -> dict[str, Any]:
    """Stage ``search``: MCTS (``cfg.search``) over each tree of ``trees_stage`` (``trees``, or ``expand`` when
    the trees were grown online), then per tree the best-path SFT row (when its value reaches
    ``search.sft_min_value``) and the TreeDPO pairs at its divergence points, and over all trajectories the
    expert-vs-failed pairs of the ceiling.

    Reads: ``<trees_stage>/trees/*.json``, ``demos/demos.jsonl``, ``explore/trajectories.jsonl``. Writes:
    ``trees/<task>.json`` (with the MCTS statistics), ``sft.jsonl``, ``pairs.jsonl``, ``expert_pairs.jsonl``.
    Returns the row and pair counts and the simulations per tree.
    """
    from w2s_agents.search import (
        best_path_row,
        expert_failure_pairs,
        node_values,
        search_tree,
        tree_pairs,
        unique_rows,
        write_rows,
    )
    from w2s_agents.tree import TrajectoryTree

    system = training_system(cfg)
    sc = replace(cfg.search, seed=derive_seed(seed, "search") % 2**31)
    sft_rows, pair_rows = [], []
    for path in sorted((ctx.output(trees_stage) / "trees").glob("*.json")):
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
    trajs = read_trajectories(ctx.output("demos") / "demos.jsonl") + read_trajectories(
        ctx.output("explore") / "trajectories.jsonl"
    )
    expert = expert_failure_pairs(trajs, margin=sc.margin, per_task=sc.pairs_per_node, system=system)
    n_sft = write_rows(unique_rows(sft_rows), ctx.directory / "sft.jsonl")
    n_pairs = write_rows(unique_rows(pair_rows), ctx.directory / "pairs.jsonl")
    n_expert = write_rows(expert, ctx.directory / "expert_pairs.jsonl")
    return {"sft_rows": n_sft, "pairs": n_pairs, "expert_pairs": n_expert, "simulations": sc.iterations}
