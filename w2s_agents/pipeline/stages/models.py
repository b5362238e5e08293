"""The ``models`` stage: the run's weak and strong models (local folders, or tiny models built on the demos)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from w2s_agents.errors import W2SError
from w2s_agents.pipeline.cache import StageContext
from w2s_agents.pipeline.experiment import ExperimentConfig
from w2s_agents.pipeline.stage_io import write_json
from w2s_agents.seeding import derive_seed

__all__ = ["run_models"]


def run_models(ctx: StageContext, cfg: ExperimentConfig, seed: int) -> dict[str, Any]:
    """Stage ``models``: the folder of the weak and of the strong model.

    A model with ``path`` set is that local folder; otherwise a tiny model of its ``tiny_preset`` is built in
    ``<stage>/weak`` or ``<stage>/strong`` with a tokenizer trained on the text of the demos' SFT rows (seeded
    from the run seed and the role; a folder left by a stopped attempt is kept).

    Reads: ``demos/sft.jsonl``. Writes: ``models.json`` (role -> absolute folder), which it also returns.

    Raises:
        W2SError: a configured ``path`` is not a local directory.
    """
    from w2s_agents.agents import create_tiny_model

    texts = []
    for row in (json.loads(line) for line in (ctx.output("demos") / "sft.jsonl").open(encoding="utf-8")):
        texts.append("\n".join(m["content"] for m in row["messages"]))
    out: dict[str, str] = {}
    for role, mc in (("weak", cfg.weak), ("strong", cfg.strong)):
        if mc.path is not None:
            path = Path(mc.path)
            if not path.is_dir():
                raise W2SError(f"{role}.path: {path} is not a local model directory")
        else:
            path = ctx.directory / role
            if not path.is_dir():
                create_tiny_model(
                    path,
                    texts,
                    preset=mc.tiny_preset,
                    vocab_size=mc.vocab_size,
                    seed=derive_seed(seed, "model", role),
                )
        out[role] = str(path.resolve())
    write_json(ctx.directory / "models.json", out)
    return out
