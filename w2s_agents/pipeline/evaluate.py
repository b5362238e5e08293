"""Evaluation of a run's models: held-out test episodes, train-task episodes and misfit.

:func:`evaluate_models` plays every model that the run trained (and did not skip) on the test tasks, the weak SFT
and W2S models also on the train tasks (for pseudolabel correction and coverage expansion), and measures misfit
between the weak SFT agent and each W2S agent on held-out states of the weak agent's test episodes. Each
episode becomes one *unit* (:func:`episode_units`), the row that the metrics' bootstraps resample.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from w2s_agents.pipeline.cache import StageContext
from w2s_agents.pipeline.experiment import BASELINES, W2S_VARIANTS, ExperimentConfig
from w2s_agents.pipeline.rl import rl_models
from w2s_agents.pipeline.rounds import later_round_models
from w2s_agents.pipeline.stage_io import load_agent, model_path, play_episodes, read_json, read_trajectories
from w2s_agents.pipeline.stats import misfit
from w2s_agents.pipeline.weaks import extra_weaks
from w2s_agents.types import EpisodeState, Trajectory

if TYPE_CHECKING:
    from w2s_agents.agents import Agent

__all__ = ["MODEL_STAGES", "episode_units", "evaluate_models", "weak_misfit"]

MODEL_STAGES = ("weak-sft", "strong-sft", *BASELINES, *W2S_VARIANTS, "ceiling-sft", "ceiling")
"""The training stages, named as their models are in the metrics; evaluation plays them in this order."""


def episode_units(trajs: Sequence[Trajectory], seed: int) -> list[dict[str, Any]]:
    """One unit per episode: run seed, task, sampler, episode seed, return, success, steps and tokens."""
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


def weak_misfit(
    cfg: ExperimentConfig, weak_trajs: Sequence[Trajectory], agents: dict[str, Agent]
) -> dict[str, dict[str, Any]]:
    """Misfit of every W2S agent in ``agents`` against ``agents["weak-sft"]``, on the first
    ``eval.misfit_states`` states of ``weak_trajs`` whose admissible commands are known; empty without them or
    without a weak SFT agent."""
    states = [
        EpisodeState.from_trajectory(x, i)
        for x in weak_trajs
        for i in range(len(x.steps))
        if x.steps[i].admissible
    ][: cfg.eval.misfit_states]
    out: dict[str, dict[str, Any]] = {}
    if not states or "weak-sft" not in agents:
        return out
    p_weak = agents["weak-sft"].action_distributions(states)
    keys = [list(p) for p in p_weak]
    for name, agent in agents.items():
        if not name.startswith("w2s-"):
            continue
        p_strong = agent.action_distributions(states)
        m = misfit(
            [[pw[k] for k in ks] for pw, ks in zip(p_weak, keys, strict=True)],
            [[ps.get(k, 0.0) for k in ks] for ps, ks in zip(p_strong, keys, strict=True)],
        )
        out[name] = m.as_dict()
    return out


def evaluate_models(
    ctx: StageContext,
    cfg: ExperimentConfig,
    seed: int,
    test_tasks: Sequence[str],
    train_tasks: Sequence[str],
) -> dict[str, Any]:
    """Play and measure every trained model of the run (the ``eval`` stage's work).

    Episodes go to ``<stage>/test-<model>.jsonl`` and ``<stage>/train-<model>.jsonl`` (resumable stores).

    Returns:
        ``{"models": {name: units of its test episodes}, "train": {name: {train task: solved}},
        "misfit": {w2s name: Misfit dict}, "explored_solved": {train task: solved by exploration}}``.
    """
    out: dict[str, Any] = {"models": {}, "train": {}, "misfit": {}}
    agents: dict[str, Agent] = {}
    extra = [w.sft_stage for w in extra_weaks(cfg)]  # every extra weak model's SFT agent, on the test tasks
    rounds = later_round_models(W2S_VARIANTS, cfg.run.rounds)  # run.rounds > 1: the later rounds' W2S models
    rl = rl_models(cfg.rl.rounds)  # rl.rounds > 0: the W2S-RL models
    for name in (*MODEL_STAGES, *extra, *rounds, *rl):
        path = model_path(ctx, name) if name in ctx.outputs else None
        if path is None:
            continue
        role = "weak" if name == "weak-sft" or name in extra else "strong"
        agents[name] = agent = load_agent(cfg, path, name, role)
        trajs, _ = play_episodes(
            cfg, agent, test_tasks, cfg.eval.samplers, cfg.eval.seeds, ctx.directory / f"test-{name}.jsonl"
        )
        out["models"][name] = episode_units(trajs, seed)
        if cfg.eval.train_tasks and (name == "weak-sft" or name.startswith("w2s-")):
            trajs, _ = play_episodes(
                cfg,
                agent,
                train_tasks,
                cfg.eval.samplers,
                cfg.eval.seeds,
                ctx.directory / f"train-{name}.jsonl",
            )
            out["train"][name] = {t: any(x.success for x in trajs if x.task_id == t) for t in train_tasks}
    weak_trajs = read_trajectories(ctx.directory / "test-weak-sft.jsonl")
    out["misfit"] = weak_misfit(cfg, weak_trajs, agents)
    solved = set(read_json(ctx.output("explore") / "explore.json")["solved_tasks"])
    out["explored_solved"] = {t: t in solved for t in train_tasks}
    return out
