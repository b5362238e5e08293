"""The outcome of a training run, saved as ``result.json`` in its output folder."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from w2s_agents.atomic import atomic_write

__all__ = ["RESULT_FILE", "TrainResult", "final_metrics"]

RESULT_FILE = "result.json"


@dataclass(frozen=True)
class TrainResult:
    """What a finished run produced and how it went.

    ``model_dir`` is the exported model (LoRA adapters merged), loadable with
    :func:`w2s_agents.agents.models.load_model`; it holds the best validated weights unless ``export: last``.
    """

    method: str  # sft, dpo or mcts-sft
    out_dir: Path
    model_dir: Path
    adapter_dir: Path | None  # the PEFT adapters of the exported weights (LoRA runs)
    best_checkpoint: Path | None  # checkpoint of the best validation score (None without validation)
    last_checkpoint: Path | None
    exported_step: int  # optimizer step whose weights were exported
    steps: int  # optimizer steps taken
    epochs: float  # passes over the data (fractional when max_steps ends inside an epoch)
    loss_curve: list[tuple[int, float]]  # (step, training loss of that step)
    valid_curve: list[dict[str, Any]]  # {"epoch", "step", "metric", "value"} per validation
    valid_metric: str | None  # valid_success (higher is better), valid_loss (lower is better) or None
    best_step: int | None
    best_value: float | None
    stopped_early: bool
    train_tokens: int  # tokens (prompt + completion, padding excluded) through forward and backward
    train_seconds: float  # wall time of the training steps (validation and checkpoint writes excluded)
    tokens_per_second: float
    source_weights: dict[str, float] | None = None  # final per-source weights (RAVEN), when learned
    rows: int = 0  # training rows (or pairs) after truncation
    skipped_rows: int = 0  # rows too long for max_length even with their history cut
    fingerprint: str = ""  # config + data + model identity; a rerun with the same one returns this result
    # {"step", "loss", "grad_norm", "learning_rate", and the method's metrics (DPO: "rewards/margins", ...)}
    # per optimizer step; empty in results written before the curve existed
    metrics_curve: list[dict[str, float]] = field(default_factory=list)
    final_metrics: dict[str, float] = field(default_factory=dict)  # means over the last log_every steps
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (paths as strings)."""
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, Path):
                d[k] = str(v)
        d["loss_curve"] = [[s, v] for s, v in self.loss_curve]
        return d

    def save(self, out_dir: Path | None = None) -> Path:
        """Write ``result.json`` atomically into ``out_dir`` (default: the run's folder)."""
        path = Path(out_dir or self.out_dir) / RESULT_FILE
        with atomic_write(path) as fh:
            fh.write(json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n")
        return path

    @classmethod
    def load(cls, out_dir: str | Path) -> TrainResult:
        """Read ``result.json`` of a finished run (one written before ``metrics_curve`` existed reads with an
        empty curve)."""
        d = json.loads((Path(out_dir) / RESULT_FILE).read_text(encoding="utf-8"))
        for k in ("out_dir", "model_dir", "adapter_dir", "best_checkpoint", "last_checkpoint"):
            if d.get(k) is not None:
                d[k] = Path(d[k])
        d["loss_curve"] = [(int(s), float(v)) for s, v in d["loss_curve"]]
        return cls(**d)


def final_metrics(curve: Sequence[dict[str, float]], window: int) -> dict[str, float]:
    """The mean of every entry but ``step`` over the last ``window`` steps of a metrics curve (``{}`` when the
    curve is empty): :attr:`TrainResult.final_metrics`."""
    last = curve[-window:]
    names = [k for k in (last[0] if last else {}) if k != "step"]
    return {k: math.fsum(entry[k] for entry in last) / len(last) for k in names}
