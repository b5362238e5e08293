"""The ``expand`` stage (beyond the paper): every train tree grown online by PUCT in the env."""

from __future__ import annotations

from typing import Any

from w2s_agents.log import progress
from w2s_agents.pipeline.cache import StageContext
from w2s_agents.pipeline.experiment import ExperimentConfig
from w2s_agents.pipeline.stage_io import load_agent, model_path, read_json, write_json
from w2s_agents.seeding import derive_seed

__all__ = ["run_expand"]

TOTALS = ("iterations", "env_steps", "tokens", "new_nodes", "successes")
"""The per-tree statistics that ``expand.json`` sums."""


def run_expand(ctx: StageContext, cfg: ExperimentConfig, seed: int) -> dict[str, Any]:
    """Stage ``expand``: each tree of the ``trees`` stage grown by ``expand.iterations`` PUCT episodes with the
    weak SFT agent's choose-mode distribution as the prior (``AgentPolicy``), within ``expand.max_env_steps``
    / ``max_tokens`` per tree; the new episodes carry the source ``weak-sft-search``.

    Reads: ``trees/trees/*.json``, ``weak-sft/model.json``. Writes: ``trees/<task>.json`` (the grown trees),
    ``stats/<task>.json`` per tree (a stopped run skips the trees that have one) and ``expand.json`` (the
    totals and the number of trees). Returns the totals of iterations, env steps, tokens, new nodes and
    successes.
    """
    from w2s_agents.agents import AgentPolicy
    from w2s_agents.envs.demos import suite_env
    from w2s_agents.search import expand_online
    from w2s_agents.tree import TrajectoryTree

    ec = cfg.expand
    agent = load_agent(cfg, model_path(ctx, "weak-sft"), "weak-sft", "weak")
    env = suite_env(cfg.tasks.suite, max_steps=cfg.tasks.max_steps, **cfg.tasks.env_kwargs)
    paths = sorted((ctx.output("trees") / "trees").glob("*.json"))
    try:
        for path in progress(paths, desc="expand", unit="tree"):
            stats_file = ctx.directory / "stats" / path.name
            if stats_file.is_file():  # expanded before the run was stopped
                continue
            tree = TrajectoryTree.load(path)
            policy = AgentPolicy(agent, temperature=ec.temperature, top_k=ec.top_k)
            oc = ec.online(
                max_depth=cfg.tasks.max_steps, seed=derive_seed(seed, "expand", tree.task_id) % 2**31
            )
            result = expand_online(tree, env, policy, oc)
            tree.canonicalize()
            tree.save(ctx.directory / "trees" / path.name)
            write_json(
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
    per_tree = [read_json(ctx.directory / "stats" / p.name) for p in paths]
    totals = {k: sum(t[k] for t in per_tree) for k in TOTALS}
    write_json(ctx.directory / "expand.json", {**totals, "trees": len(per_tree)})
    return totals
