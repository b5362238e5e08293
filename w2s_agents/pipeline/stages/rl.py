"""The RL stages of ``rl.rounds`` (:mod:`w2s_agents.pipeline.rl`): ``rl-search-r<k>`` (MCTS over the grown trees
and the policy-gradient rows of their steps) and ``w2s-rl-r<k>`` (policy gradient on those rows). The rounds'
exploration and trees are the explore and trees stages' functions (``rl-explore-r<k>``, ``rl-trees-r<k>``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Any

from w2s_agents.pipeline.cache import StageContext
from w2s_agents.pipeline.experiment import ExperimentConfig
from w2s_agents.pipeline.stage_io import (
    training_system,
    write_json,
)
from w2s_agents.pipeline.tracking import track_stage
from w2s_agents.seeding import derive_seed
from w2s_agents.trainers import TrainConfig
from w2s_agents.tree import TrajectoryTree

from .train import fine_tune_on_file

__all__ = ["run_pg", "run_rl_search"]


def run_rl_search(ctx: StageContext, cfg: ExperimentConfig, seed: int, *, trees_stage: str) -> dict[str, Any]:
    """Stage ``rl-search-r<k>``: MCTS (``cfg.search``, seeded as the search stage) over each tree of
    ``trees_stage`` (``rl-trees-r<k>``: the weak agent's and the RL rounds' trajectories), then the
    policy-gradient rows of every tree (:func:`~w2s_agents.search.advantages.pg_rows`): advantages at
    ``rl.advantage`` level, Q by ``search.value``, rows with ``|A| >= rl.min_abs_advantage``.

    Reads: ``<trees_stage>/trees/*.json``. Writes: ``trees/<task>.json`` (with the MCTS statistics),
    ``pg.jsonl`` and ``advantages.json`` (rows, positive and negative advantages, their sum, rows per source,
    per tree). Returns those counts. Deterministic: a stopped stage redone gives the same files.
    """
    from w2s_agents.search import search_tree, write_rows
    from w2s_agents.search.advantages import pg_rows

    sc = replace(cfg.search, seed=derive_seed(seed, "search") % 2**31)
    system = training_system(cfg)
    rows, per_tree = [], []
    for path in sorted((ctx.output(trees_stage) / "trees").glob("*.json")):
        tree = TrajectoryTree.load(path)
        if cfg.rl.advantage == "step":
            search_tree(tree, sc)  # Q(n): the search value (search.value mcts)
        tree.save(ctx.directory / "trees" / path.name)
        got = pg_rows(
            tree,
            level=cfg.rl.advantage,
            value=sc.value,
            min_abs_advantage=cfg.rl.min_abs_advantage,
            system=system,
        )
        rows += got
        per_tree.append({"task_id": tree.task_id, "nodes": len(tree), "rows": len(got)})
    write_rows([r.to_dict() for r in rows], ctx.directory / "pg.jsonl")
    sources = Counter(s for r in rows for s in r.sources)
    out = {
        "rows": len(rows),
        "positive": sum(r.advantage > 0 for r in rows),
        "negative": sum(r.advantage < 0 for r in rows),
        "advantage_sum": sum(r.advantage for r in rows),
    }
    write_json(
        ctx.directory / "advantages.json",
        {**out, "sources": dict(sorted(sources.items())), "trees": per_tree},
    )
    track_stage(ctx, cfg, seed, {"rl": out})
    return out


def run_pg(
    ctx: StageContext,
    cfg: ExperimentConfig,
    seed: int,
    *,
    train: TrainConfig,
    start: str,
    reference: str,
    search: str,
) -> dict[str, Any]:
    """Stage ``w2s-rl-r<k>``: policy gradient (``train``, the experiment's ``train.rl``) from the model of stage
    ``start`` (round k's policy: ``rl.start``'s model, or ``w2s-rl-r<k-1>``) on the rows of ``<search>/pg.jsonl``
    (``rl-search-r<k>``), with the KL to the model of stage ``reference`` (``rl.start``'s). Skipped when there
    are no rows or the ``start`` stage was skipped. A stopped stage resumes from its last checkpoint.

    Reads: ``<search>/pg.jsonl``, ``<start>/model.json``, ``<reference>/model.json``, the valid task ids.
    Writes: ``train/`` and ``model.json``. Returns the training summary.
    """
    from w2s_agents.trainers import train_pg

    data = ctx.output(search) / "pg.jsonl"
    return fine_tune_on_file(
        ctx,
        cfg,
        seed,
        train,
        train_pg,
        data,
        start=start,
        reference=reference,
        empty="no policy-gradient rows",
    )
