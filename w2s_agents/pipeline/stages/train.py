"""The training stages: ``weak-sft`` (and ``weak-sft-<name>``), ``strong-sft`` and ``ceiling-sft`` (SFT on the
demos), ``w2s-mcts`` (MCTS-SFT on the best paths), and the DPO stages ``w2s-treedpo``, ``w2s-mcts-treedpo`` and
``ceiling`` (and, with ``run.rounds`` > 1, the later rounds' ``w2s-*-r<k>``).

Each trains into ``<stage>/train/`` (checkpoints there let a stopped run carry on) and records its model in
``<stage>/model.json``; a stage with no data to train on records ``{"skipped": why}`` instead, and the stages
after it treat the model as absent. With valid tasks, every stage validates by greedy success on them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from w2s_agents.pipeline.cache import StageContext
from w2s_agents.pipeline.experiment import ExperimentConfig
from w2s_agents.pipeline.stage_io import model_path, save_model_info, validation_fn, write_json
from w2s_agents.pipeline.tracking import stage_tracking
from w2s_agents.seeding import derive_seed
from w2s_agents.trainers import TrainConfig

__all__ = ["run_dpo", "run_mcts_sft", "run_sft"]

logger = logging.getLogger(__name__)


def _skip(ctx: StageContext, why: str, detail: str | None = None) -> dict[str, Any]:
    """Record that the stage trained nothing, and why."""
    logger.warning("%s: skipped (%s)", ctx.name, detail or why)
    write_json(ctx.directory / "model.json", {"skipped": why})
    return {"skipped": why}


def run_sft(
    ctx: StageContext,
    cfg: ExperimentConfig,
    seed: int,
    *,
    role: Literal["weak", "strong"],
    train: TrainConfig,
    rows: str = "sft.jsonl",
    models: str = "models",
) -> dict[str, Any]:
    """Stages ``weak-sft`` / ``strong-sft`` / ``ceiling-sft`` / ``weak-sft-<name>``: the ``role`` base model
    (recorded by the stage ``models``, or ``models-<name>`` for an extra weak model) fine-tuned on the expert
    demos of the demos stage's file ``rows`` (``sft.jsonl``: the tasks with demos; ``sft-all.jsonl``: every
    train task, the ceiling's data under scarce demonstrations).

    Reads: ``<models>/models.json``, ``demos/<rows>``, the valid task ids. Writes: ``train/`` (the model in
    ``train/model/``) and ``model.json``. Returns the training summary.
    """
    from w2s_agents.trainers import train_sft

    first = rows == "sft.jsonl" and models == "models"  # weak-sft, strong-sft: seeded by the role
    result = train_sft(
        model_path(ctx, role, models=models),
        ctx.output("demos") / rows,
        ctx.directory / "train",
        replace(train, seed=derive_seed(seed, role, "sft") if first else derive_seed(seed, ctx.name)),
        valid_fn=validation_fn(cfg, ctx),
        tracking=stage_tracking(ctx, cfg, seed, train.report_to),
    )
    return save_model_info(ctx, result)


def run_mcts_sft(
    ctx: StageContext,
    cfg: ExperimentConfig,
    seed: int,
    *,
    train: TrainConfig,
    start: Literal["base", "strong-sft"] = "base",
    search: str = "search",
) -> dict[str, Any]:
    """Stage ``w2s-mcts``: MCTS-SFT on the searched trees' best paths (``train``, the experiment's
    ``train.mcts_sft``), from the strong *base* model (``start`` base: no expert data) or from the strong SFT
    agent (``start`` strong-sft, ``train.mcts_start``). Skipped when no best path reached
    ``search.sft_min_value``. Stage ``w2s-mcts-r<k>`` (``run.rounds``) is the same on the rows of ``search``
    ``search-r<k>``.

    Reads: ``<search>/sft.jsonl``, ``models/models.json`` or ``strong-sft/model.json``, the valid task ids.
    Writes: ``train/`` and ``model.json``. Returns the training summary.
    """
    from w2s_agents.trainers import train_sft

    rows = ctx.output(search) / "sft.jsonl"
    if sum(1 for _ in rows.open(encoding="utf-8")) == 0:
        return _skip(ctx, "no best-path rows", "no best path reached the minimum value")
    init = model_path(ctx, "strong" if start == "base" else start)
    if init is None:
        return _skip(ctx, f"no {start} model")
    result = train_sft(
        init,
        rows,
        ctx.directory / "train",
        replace(train, method="mcts-sft", seed=derive_seed(seed, "w2s-mcts")),
        valid_fn=validation_fn(cfg, ctx),
        tracking=stage_tracking(ctx, cfg, seed, train.report_to),
    )
    return save_model_info(ctx, result)


def run_dpo(
    ctx: StageContext,
    cfg: ExperimentConfig,
    seed: int,
    *,
    start: str,
    pairs: str,
    train: TrainConfig,
    reference: str,
    search: str = "search",
) -> dict[str, Any]:
    """Stages ``w2s-treedpo``, ``w2s-mcts-treedpo`` and ``ceiling``: DPO from the model of stage ``start`` on
    the pairs file ``pairs`` of the stage ``search``, against the model of stage ``reference``. Skipped when
    there are no pairs or the ``start`` stage was skipped. The stages ``w2s-treedpo-r<k>`` and
    ``w2s-mcts-treedpo-r<k>`` (``run.rounds``) read round k's ``search-r<k>`` (and start from
    ``w2s-mcts-r<k>``).

    Reads: ``<search>/<pairs>``, ``<start>/model.json``, ``<reference>/model.json``, the valid task ids.
    Writes: ``train/`` and ``model.json``. Returns the training summary.
    """
    from w2s_agents.trainers import train_dpo

    data = ctx.output(search) / pairs
    return fine_tune_on_file(
        ctx, cfg, seed, train, train_dpo, data, start=start, reference=reference, empty="no preference pairs"
    )


def fine_tune_on_file(
    ctx: StageContext,
    cfg: ExperimentConfig,
    seed: int,
    train: TrainConfig,
    trainer: Callable[..., Any],
    data: Path,
    *,
    start: str,
    reference: str,
    empty: str,
) -> dict[str, Any]:
    """Train the model of stage ``start`` with ``trainer`` (``train_dpo`` or ``train_pg``, which sets
    ``train.method``) on the rows of ``data`` against the model of stage ``reference``. Skipped (with the reason
    ``empty``) when ``data`` has no rows, or when ``start`` was skipped. Returns the training summary."""
    n = sum(1 for _ in data.open(encoding="utf-8"))
    init = model_path(ctx, start)
    if n == 0 or init is None:
        return _skip(ctx, empty if n == 0 else f"no {start} model")
    method = {"train_dpo": "dpo", "train_pg": "pg"}[trainer.__name__]
    result = trainer(
        init,
        data,
        ctx.directory / "train",
        replace(train, method=method, seed=derive_seed(seed, ctx.name)),
        reference_path=model_path(ctx, reference),
        valid_fn=validation_fn(cfg, ctx),
        tracking=stage_tracking(ctx, cfg, seed, train.report_to),
    )
    return save_model_info(ctx, result)
