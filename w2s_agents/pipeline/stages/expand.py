"""The ``expand`` stage (beyond the paper): every train tree grown online by PUCT in the env.

:func:`expand_tree_files` does the work on tree files and is shared with ``w2s search --online``, which grows
the trees it is given with the same config sections (``tasks``, ``agent``, ``expand``, ``run.seed``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from w2s_agents.log import progress
from w2s_agents.pipeline.cache import StageContext
from w2s_agents.pipeline.experiment import ExperimentConfig
from w2s_agents.pipeline.stage_io import load_agent, model_path, read_json, write_json
from w2s_agents.pipeline.tracking import track_stage
from w2s_agents.seeding import derive_seed

__all__ = ["expand_tree_files", "run_expand"]

TOTALS = ("iterations", "env_steps", "tokens", "new_nodes", "successes")
"""The per-tree statistics that ``expand.json`` sums."""


def run_expand(
    ctx: StageContext, cfg: ExperimentConfig, seed: int, *, trees_stage: str = "trees"
) -> dict[str, Any]:
    """Stage ``expand``: each tree of the ``trees`` stage grown by ``expand.iterations`` PUCT episodes with the
    weak SFT agent's choose-mode distribution as the prior (``AgentPolicy``), within ``expand.max_env_steps``
    / ``max_tokens`` per tree; the new episodes carry the source ``weak-sft-search``. Stage ``expand-r<k>``
    (``run.rounds``) grows the trees of ``trees_stage`` ``trees-r<k>`` the same way.

    Reads: ``<trees_stage>/trees/*.json``, ``weak-sft/model.json``. Writes what :func:`expand_tree_files` writes
    into the stage's folder. Returns the totals of iterations, env steps, tokens, new nodes and successes.
    """
    weak_sft = model_path(ctx, "weak-sft")
    assert weak_sft is not None, "the expand stage runs after weak-sft"
    paths = sorted((ctx.output(trees_stage) / "trees").glob("*.json"))
    totals = expand_tree_files(cfg, weak_sft, paths, ctx.directory, seed)
    track_stage(ctx, cfg, seed, {"expand": totals})
    return totals


def expand_tree_files(
    cfg: ExperimentConfig, model_dir: Path, paths: Sequence[Path], out_dir: Path, seed: int
) -> dict[str, Any]:
    """Grow every tree file of ``paths`` online (``expand_online``) and write the grown trees to ``out_dir``.

    The prior is the agent ``cfg.agent`` on the model in ``model_dir`` (its choose-mode distribution, with
    ``expand.temperature`` and ``expand.top_k``); episodes are played in the env of ``cfg.tasks.suite`` with
    the exploration's step limit (``explore.max_steps``) and ``tasks.env_kwargs``; each tree gets
    ``expand.iterations`` PUCT episodes within the ``expand`` budget, seeded by ``seed`` and its task id. The
    input files are only read.

    Writes, per tree, ``out_dir/trees/<name>`` (the grown tree, canonical ids) and then
    ``out_dir/stats/<name>`` (its iterations, env steps, tokens, new nodes and successes), each atomically; a
    tree that already has its stats file is skipped, so a stopped call resumes with the trees it had not
    finished. Last, ``out_dir/expand.json``: the totals and the number of trees.

    Returns:
        The totals over every tree of ``paths`` (``TOTALS``).

    Raises:
        ModelLoadError: ``model_dir`` is not a loadable local model folder.
        DataFormatError: a tree file is malformed.
    """
    from w2s_agents.agents import AgentPolicy
    from w2s_agents.envs.demos import suite_env
    from w2s_agents.search import expand_online
    from w2s_agents.tree import TrajectoryTree

    ec = cfg.expand
    # a tree with a stats file was expanded before the run was stopped
    todo = [p for p in paths if not (out_dir / "stats" / p.name).is_file()]
    if todo:
        agent = load_agent(cfg, model_dir, "weak-sft", "weak")
        env = suite_env(cfg.tasks.suite, **cfg.tasks.env_settings(cfg.explore_max_steps))
        try:
            for path in progress(todo, desc="expand", unit="tree"):
                tree = TrajectoryTree.load(path)
                policy = AgentPolicy(agent, temperature=ec.temperature, top_k=ec.top_k)
                oc = ec.online(
                    max_depth=cfg.explore_max_steps, seed=derive_seed(seed, "expand", tree.task_id) % 2**31
                )
                result = expand_online(tree, env, policy, oc)
                tree.canonicalize()
                tree.save(out_dir / "trees" / path.name)
                write_json(
                    out_dir / "stats" / path.name,
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
    per_tree = [read_json(out_dir / "stats" / p.name) for p in paths]
    totals = {k: sum(t[k] for t in per_tree) for k in TOTALS}
    write_json(out_dir / "expand.json", {**totals, "trees": len(per_tree)})
    return totals
