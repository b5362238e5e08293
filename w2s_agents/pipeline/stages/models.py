"""The ``models`` stages: the run's weak and strong models (local folders, or tiny models built on the demos), and
the base model of each extra weak model (``models-<name>``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from w2s_agents.errors import W2SError
from w2s_agents.pipeline.cache import StageContext
from w2s_agents.pipeline.experiment import ExperimentConfig
from w2s_agents.pipeline.stage_io import write_json
from w2s_agents.seeding import derive_seed

if TYPE_CHECKING:
    from w2s_agents.agents import ModelConfig

__all__ = ["run_models", "run_weak_model"]


def _demo_texts(ctx: StageContext) -> list[str]:
    """The text of every SFT row of the demos (what tiny tokenizers are trained on)."""
    texts = []
    for row in (json.loads(line) for line in (ctx.output("demos") / "sft.jsonl").open(encoding="utf-8")):
        texts.append("\n".join(m["content"] for m in row["messages"]))
    return texts


def _model_folder(
    ctx: StageContext, mc: ModelConfig, texts: list[str], *, folder: str, seed: int, key: str
) -> str:
    """The absolute folder of the model of ``mc``: its local ``path``, or a tiny model built in
    ``<stage>/<folder>`` from ``seed`` (a folder left by a stopped attempt is kept). ``key`` names the config
    section in errors.

    Raises:
        W2SError: ``path`` is not a local directory.
    """
    from w2s_agents.agents import create_tiny_model

    if mc.path is not None:
        path = Path(mc.path)
        if not path.is_dir():
            raise W2SError(f"{key}.path: {path} is not a local model directory")
    else:
        path = ctx.directory / folder
        if not path.is_dir():
            create_tiny_model(path, texts, preset=mc.tiny_preset, vocab_size=mc.vocab_size, seed=seed)
    return str(path.resolve())


def run_models(ctx: StageContext, cfg: ExperimentConfig, seed: int) -> dict[str, Any]:
    """Stage ``models``: the folder of the weak and of the strong model.

    A model with ``path`` set is that local folder; otherwise a tiny model of its ``tiny_preset`` is built in
    ``<stage>/weak`` or ``<stage>/strong`` with a tokenizer trained on the text of the demos' SFT rows (seeded
    from the run seed and the role; a folder left by a stopped attempt is kept).

    Reads: ``demos/sft.jsonl``. Writes: ``models.json`` (role -> absolute folder), which it also returns.

    Raises:
        W2SError: a configured ``path`` is not a local directory.
    """
    texts = _demo_texts(ctx)
    out = {
        role: _model_folder(ctx, mc, texts, folder=role, seed=derive_seed(seed, "model", role), key=role)
        for role, mc in (("weak", cfg.weak), ("strong", cfg.strong))
    }
    write_json(ctx.directory / "models.json", out)
    return out


def run_weak_model(ctx: StageContext, cfg: ExperimentConfig, seed: int, *, index: int) -> dict[str, Any]:
    """Stage ``models-<name>``: the base model of the extra weak model ``weak_extra[index]``, as ``run_models``
    makes the weak model (a tiny one in ``<stage>/model``, seeded from the run seed and the entry's name).

    Reads: ``demos/sft.jsonl``. Writes: ``models.json`` (``{"weak": absolute folder}``), which it also returns.

    Raises:
        W2SError: the entry's ``path`` is not a local directory.
    """
    mc = cfg.weak_extra[index]
    texts = [] if mc.path is not None else _demo_texts(ctx)
    folder = _model_folder(
        ctx,
        mc,
        texts,
        folder="model",
        seed=derive_seed(seed, "model", "weak", mc.name),
        key=f"weak_extra[{index}]",
    )
    out = {"weak": folder}
    write_json(ctx.directory / "models.json", out)
    return out
