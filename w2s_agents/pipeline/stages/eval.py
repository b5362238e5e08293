"""The ``eval`` stage: every trained model on the held-out test tasks (the work is in
:mod:`w2s_agents.pipeline.evaluate`)."""

from __future__ import annotations

from typing import Any

from w2s_agents.pipeline.cache import StageContext
from w2s_agents.pipeline.evaluate import evaluate_models
from w2s_agents.pipeline.experiment import ExperimentConfig
from w2s_agents.pipeline.stage_io import task_ids, write_json
from w2s_agents.pipeline.tracking import track_stage

__all__ = ["run_eval"]


def run_eval(ctx: StageContext, cfg: ExperimentConfig, seed: int) -> dict[str, Any]:
    """Stage ``eval``: every model the run trained on the test tasks, or the valid tasks with
    ``eval.split=valid`` (``eval.samplers`` x ``eval.seeds`` episodes per task); weak SFT and W2S models also on the train tasks; misfit on held-out weak states.

    Reads: the task ids, ``explore/explore.json`` and the ``model.json`` of every training stage. Writes:
    ``test-<model>.jsonl``, ``train-<model>.jsonl`` and ``eval.json`` (which the metrics aggregate). Returns
    each model's mean test return.
    """
    out = evaluate_models(ctx, cfg, seed, task_ids(ctx, cfg.eval.split), task_ids(ctx, "train"))
    write_json(ctx.directory / "eval.json", out)
    returns = {
        name: round(sum(u["return"] for u in units) / max(1, len(units)), 4)
        for name, units in out["models"].items()
    }
    track_stage(ctx, cfg, seed, {cfg.eval.split: {name: {"mean_return": r} for name, r in returns.items()}})
    return returns
