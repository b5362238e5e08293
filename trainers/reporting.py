"""Where the training loop reports its numbers: the log, and the experiment trackers of ``report_to``.

:class:`RunReporter` takes the loop's records as they are made (:meth:`Trainer.run <.loop.Trainer.run>`
computes them; nothing is recomputed here) and names them as TRL does:

==============================  ============================================================================
``train/loss``                  the step's normalised loss (every optimizer step)
``train/grad_norm``             gradient norm before clipping
``train/learning_rate``         the learning rate the step used
``train/<metric>``              the objective's metrics (DPO: ``train/rewards/chosen``, ``rewards/rejected``,
                                ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``,
                                ``logps/rejected``)
``train/epoch``                 passes over the data so far (fractional)
``train/tokens_per_second``     training tokens per second of step time so far (this process's)
``eval/valid_success``          at each epoch's end: validation success (``valid_fn``) or ...
``eval/valid_loss``             ... the validation loss
``train/source_weights/<src>``  at each epoch's end, with learned per-source weights (RAVEN)
summary                         ``run/steps``, ``run/tokens``, ``run/seconds``, ``run/tokens_per_second``
                                (of every process), ``run/epochs``, ``run/rows``, ``run/skipped_rows``,
                                ``run/exported_step``, ``run/stopped_early``, ``run/best_<metric>`` and
                                ``run/best_step`` (with validation), ``final/<name>`` (the result's
                                ``final_metrics``: means of the last ``log_every`` steps)
==============================  ============================================================================

The log gets one line every ``log_every`` steps and at step 1; the trackers get every step. Only the main
process opens trackers. A run that starts afresh draws a tracking identity and keeps it in
``<out_dir>/tracking.json``; a resumed run of the same fingerprint reads it back, so its W&B run is continued,
while a run started over (``resume`` off, a redone pipeline stage) gets a W&B run of its own.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from w2s_agents.atomic import atomic_write
from w2s_agents.config import config_to_dict

from .config import TrainConfig
from .result import TrainResult
from .tracking import Trackers, TrackingSpec

__all__ = ["TRACKING_FILE", "RunReporter", "tracking_identity"]

TRACKING_FILE = "tracking.json"
"""The run's tracking identity (``{"fingerprint", "identity"}``), in its output folder."""

_STEP_KEYS = ("step", "loss", "grad_norm", "learning_rate")  # the loop's own; the others are the objective's


class RunReporter:
    """The log lines and tracker records of one training run (see the module docstring)."""

    def __init__(
        self,
        *,
        method: str,
        log: logging.Logger,
        log_every: int,
        total_steps: int,
        micro_per_epoch: int,
        trackers: Trackers | None = None,
    ) -> None:
        self.method = method
        self.log = log
        self.log_every = log_every
        self.total_steps = total_steps
        self.micro_per_epoch = micro_per_epoch
        self.trackers = trackers or Trackers()

    @classmethod
    def open(
        cls,
        *,
        method: str,
        config: TrainConfig,
        out_dir: Path,
        tracking: TrackingSpec | None,
        fingerprint: str,
        state: Mapping[str, Any],
        main: bool,
        log: logging.Logger,
        total_steps: int,
        micro_per_epoch: int,
        info: Mapping[str, Any],
    ) -> RunReporter:
        """A reporter whose trackers are ``tracking``'s, or else ``config.report_to``'s in ``out_dir``
        (:meth:`TrackingSpec.under`); none on processes other than the main one.

        ``fingerprint`` is the run's (:func:`tracking_identity`), ``state`` the loop state it starts from (a
        resumed run continues its curves after its step), ``info`` what the tracker's config records besides
        ``config`` (model, rows).

        Raises:
            W2SError: a tracker's package is missing, or the W&B run cannot start.
        """
        if tracking is None and config.report_to:
            tracking = TrackingSpec.under(config.report_to, out_dir, method)
        trackers = None
        if main and tracking is not None and tracking.report_to:
            step = int(state["step"])
            trackers = tracking.open(
                identity=tracking_identity(out_dir, fingerprint, resumed=step > 0),
                start_step=step + 1 if step else 0,
                config={"method": method, **info, "train": config_to_dict(config)},
            )
        return cls(
            method=method,
            log=log,
            log_every=config.log_every,
            total_steps=total_steps,
            micro_per_epoch=micro_per_epoch,
            trackers=trackers,
        )

    def step(self, state: Mapping[str, Any], record: Mapping[str, float]) -> None:
        """One optimizer step: its record to the trackers, and every ``log_every`` steps (and at step 1) one
        log line with the loss, learning rate, gradient norm, throughput and the objective's metrics."""
        step = int(state["step"])
        tokens_per_second = state["tokens"] / max(state["train_seconds"], 1e-9)
        if self.trackers:
            epoch = state["epoch"] + state["micro"] / self.micro_per_epoch
            metrics = {f"train/{k}": float(v) for k, v in record.items() if k != "step"}
            self.trackers.log(
                {**metrics, "train/epoch": epoch, "train/tokens_per_second": tokens_per_second}, step
            )
        if step % self.log_every and step != 1:
            return
        metrics_text = "".join(f" {k} {v:.4g}" for k, v in record.items() if k not in _STEP_KEYS)
        self.log.info(
            "%s step %d/%d epoch %d loss %.4f lr %.3g grad-norm %.3g %.0f tok/s%s",
            self.method,
            step,
            self.total_steps,
            state["epoch"] + 1,
            record["loss"],
            record["learning_rate"],
            record["grad_norm"],
            tokens_per_second,
            metrics_text,
        )

    def epoch_end(self, state: Mapping[str, Any], source_weights: Mapping[str, float] | None) -> None:
        """After an epoch's validation: its score (``eval/<metric>``) when it validated at this step, and the
        learned source weights."""
        if not self.trackers:
            return
        step = int(state["step"])
        values: dict[str, float] = {}
        valid = state["valid_curve"]
        if valid and valid[-1]["step"] == step:
            values[f"eval/{valid[-1]['metric']}"] = float(valid[-1]["value"])
        for name, weight in (source_weights or {}).items():
            values[f"train/source_weights/{name}"] = float(weight)
        if values:
            self.trackers.log(values, step)

    def finish(self, result: TrainResult) -> TrainResult:
        """The run's summary to the trackers, which are then closed; returns ``result``."""
        if self.trackers:
            summary = {
                "run/steps": result.steps,
                "run/tokens": result.train_tokens,
                "run/seconds": result.train_seconds,
                "run/tokens_per_second": result.tokens_per_second,
                "run/epochs": result.epochs,
                "run/rows": result.rows,
                "run/skipped_rows": result.skipped_rows,
                "run/exported_step": result.exported_step,
                "run/stopped_early": float(result.stopped_early),
                **{f"final/{k}": v for k, v in result.final_metrics.items()},
            }
            if result.best_value is not None and result.best_step is not None:
                summary |= {
                    f"run/best_{result.valid_metric}": result.best_value,
                    "run/best_step": result.best_step,
                }
            self.trackers.log_summary(summary)
        self.close()
        return result

    def close(self, *, failed: bool = False) -> None:
        """Close the trackers (``failed``: the run stopped with an error); closing twice does nothing."""
        self.trackers.finish(failed=failed)


def tracking_identity(out_dir: Path, fingerprint: str, *, resumed: bool) -> str:
    """The identity a run's trackers open with: the one ``out_dir/tracking.json`` holds for this fingerprint
    when the run is ``resumed``, else a new one (written there)."""
    path = out_dir / TRACKING_FILE
    if resumed:
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved["fingerprint"] == fingerprint and isinstance(saved["identity"], str):
                return saved["identity"]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no file, or not one this run wrote: a new identity
    identity = secrets.token_hex(8)
    with atomic_write(path) as fh:
        fh.write(json.dumps({"fingerprint": fingerprint, "identity": identity}) + "\n")
    return identity
