"""The training loop shared by SFT, MCTS-SFT and TreeDPO.

One loop, read top to bottom in :meth:`Trainer.run`: load the policy (LoRA adapters added when asked), build
AdamW and the learning-rate schedule, resume from the newest intact checkpoint of the run (:mod:`.resume`),
then for each optimizer step take ``grad_accum`` micro-batches of the epoch's seeded order, accumulate the
gradient of the normalised loss, clip, step, and checkpoint every ``checkpoint_every`` steps and at each
epoch's end after validating. The data order of an epoch depends only on the seed and the epoch, so a resumed run takes
exactly the batches the interrupted one would have taken.

The loop knows no method: it is handed an :class:`~.batch.Objective` (:func:`.sft.sft_objective`,
:class:`.dpo.DPOObjective`) that turns a :class:`~.batch.Batch` into per-row losses and metrics. Each step's
loss, gradient norm, learning rate and the objective's metrics (averaged over the step's rows) form one entry
of the metrics curve, which is checkpointed with the rest of the state, written to ``curves.json`` and
``result.json``, and reported to the log and to the trackers of ``report_to`` (:mod:`.reporting`).

Several GPUs: run under ``accelerate launch`` (or ``torchrun``); accelerate's process state joins the process
group, the policy is wrapped by DDP, the micro-batches of a step are dealt round-robin to the processes, and
only the main process writes files.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from w2s_agents.atomic import atomic_write
from w2s_agents.config import save_config
from w2s_agents.errors import W2SError
from w2s_agents.log import progress
from w2s_agents.seeding import derive_seed, seed_everything

from . import logps as logps_module
from .batch import Example, Objective, collate
from .checkpoint import (
    checkpoint_dirs,
    latest_checkpoint,
    new_checkpoint_dir,
    remove_stale,
    rotate_checkpoints,
    write_checkpoint,
)
from .config import TrainConfig
from .distributed import Processes
from .export import export_model
from .losses import SourceWeights
from .model import load_policy, make_optimizer, make_scheduler, saved_dtype
from .reporting import RunReporter
from .result import RESULT_FILE, TrainResult, final_metrics
from .resume import load_run_checkpoint, load_verified_trainable, resume_newest_intact
from .state_files import write_rng
from .tracking import TrackingSpec

__all__ = ["CURVES_FILE", "NonFiniteLossError", "Trainer", "ValidFn", "epoch_order"]

logger = logging.getLogger(__name__)

CURVES_FILE = "curves.json"
SOURCE_WEIGHTS_FILE = "source_weights.json"

ValidFn = Callable[[nn.Module, Any], float]
"""``valid_fn(model, tokenizer) -> score``: higher is better (e.g. the success rate of rollouts)."""


class NonFiniteLossError(W2SError):
    """The loss or the gradient norm became NaN or infinite; training stopped without saving that state."""


def epoch_order(n: int, seed: int, epoch: int, easy: np.ndarray | None = None) -> np.ndarray:
    """The order of the rows in ``epoch``: a permutation seeded by ``(seed, epoch)``; with ``easy`` given, the
    easy rows first and then the others, each group permuted."""
    rng = np.random.default_rng(derive_seed(seed, "order", epoch))
    if easy is None:
        return rng.permutation(n)
    return np.concatenate([rng.permutation(np.flatnonzero(easy)), rng.permutation(np.flatnonzero(~easy))])


class Trainer:
    """One training run of ``method`` on tokenized ``examples`` (see the module docstring).

    Args:
        method: sft, dpo or mcts-sft (names outputs and logs).
        model_path: local folder of the initial policy.
        out_dir: the run's folder.
        config: hyperparameters.
        objective: the method's loss (:func:`.sft.sft_objective`, :class:`.dpo.DPOObjective`).
        examples: training rows, tokenized with the policy's tokenizer.
        valid_examples: rows of the validation loss (used when ``valid_fn`` is None).
        valid_fn: ``valid_fn(model, tokenizer) -> score`` (higher is better), called each epoch.
        fingerprint: identity of the run; checkpoints of another run in ``out_dir`` are refused.
        source_names: the sources that ``Example.sources`` index.
        resume: continue from the newest checkpoint (else existing checkpoints are removed).
        skipped_rows: rows left out before tokenization (too long), reported in the result.
        tracking: where the run's numbers are tracked (:mod:`.reporting`); None: ``config.report_to`` in
            ``out_dir``.
    """

    def __init__(
        self,
        *,
        method: str,
        model_path: str | Path,
        out_dir: str | Path,
        config: TrainConfig,
        objective: Objective,
        examples: Sequence[Example],
        valid_examples: Sequence[Example] = (),
        valid_fn: ValidFn | None = None,
        fingerprint: str,
        source_names: Sequence[str] = (),
        resume: bool = True,
        skipped_rows: int = 0,
        tracking: TrackingSpec | None = None,
    ) -> None:
        if not examples:
            raise W2SError("no training rows left (all were too long for max_length, or the data is empty)")
        self.method = method
        self.model_path = Path(model_path).expanduser()
        self.out_dir = Path(out_dir)
        self.cfg = config
        self.examples = list(examples)
        self.valid_examples = list(valid_examples)
        self.valid_fn = valid_fn
        self.fingerprint = fingerprint
        self.source_names = list(source_names)
        self.resume = resume
        self.skipped_rows = skipped_rows
        self.tracking = tracking
        self.objective = objective
        self.log = logger

    # ------------------------------------------------------------------ set-up

    def _setup(self) -> None:
        from w2s_agents.agents.models import resolve_device

        cfg = self.cfg
        want = resolve_device(cfg.device)
        self.procs = Processes(cpu=want.type == "cpu")
        self.device = self.procs.state.device if self.procs.world > 1 else want
        self.rank, self.world = self.procs.rank, self.procs.world
        if not self.procs.is_main:  # one process reports; the others only warn
            self.log = logging.getLogger(f"{__name__}.rank{self.rank}")
            self.log.setLevel(logging.WARNING)
        cuda = self.device.type == "cuda"
        bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and cuda and torch.cuda.is_bf16_supported())
        self.autocast_dtype = torch.bfloat16 if bf16 else None
        # trainable weights stay float32 under bf16 autocast; frozen LoRA base weights may be bf16
        param_dtype = "bfloat16" if (bf16 and cfg.lora.enabled) else "float32"
        seed_everything(cfg.seed)
        self.model, self.tokenizer = load_policy(
            self.model_path, cfg, device=self.device, param_dtype=param_dtype
        )
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, cfg, fused=cuda)
        n = len(self.examples)
        micro = math.ceil(n / cfg.batch_size)
        if self.world > 1:
            micro -= micro % self.world
            if micro == 0:
                raise W2SError(
                    f"{n} rows give fewer micro-batches of {cfg.batch_size} than the {self.world} processes"
                )
        self.micro_per_epoch = micro
        self.steps_per_epoch = math.ceil(micro / (cfg.grad_accum * self.world))
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.scheduler = make_scheduler(self.optimizer, cfg, self.total_steps)
        self.scorer = self.procs.wrap(logps_module.TokenScorer(self.model), self.device)
        self.weights = (
            SourceWeights(self.source_names, lr=cfg.sources.weight_lr, min_weight=cfg.sources.min_weight)
            if cfg.sources.weights and self.source_names
            else None
        )
        self.easy = np.array([ex.easy for ex in self.examples]) if cfg.sources.easy_first else None
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def _fresh_state(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "fingerprint": self.fingerprint,
            "step": 0,
            "epoch": 0,
            "micro": 0,  # next micro-batch of the epoch
            "loss_curve": [],
            "metrics_curve": [],  # {"step", "loss", "grad_norm", "learning_rate", <objective metrics>}
            "valid_curve": [],
            "best": None,  # {"step", "value", "metric"}
            "bad_epochs": 0,
            "stopped_early": False,
            "tokens": 0,
            "train_seconds": 0.0,
            "source_weights": None,
            "source_weights_history": [],
            "processes": self.world,
        }

    def _resume(self) -> dict[str, Any]:
        """The state to start from: the newest intact checkpoint's (its weights, optimizer, schedule and random
        states loaded), or a fresh one when the run has no checkpoint.

        A damaged checkpoint (see :func:`.checkpoint.verify_checkpoint`) is skipped with a warning naming the
        file and the reason, and renamed ``step-NNNNNNNN.corrupt``; the next older one is tried
        (:func:`.resume.resume_newest_intact`).

        Raises:
            W2SError: checkpoints exist but none is intact (the message names each one's problem), or they
                belong to another run.
        """
        if self.procs.is_main:
            remove_stale(self.out_dir)
        self.procs.wait()
        candidates = checkpoint_dirs(self.out_dir)
        if candidates and not self.resume:
            if self.procs.is_main:
                self.log.warning("resume is off: removing the checkpoints and result in %s", self.out_dir)
                shutil.rmtree(self.out_dir / "checkpoints", ignore_errors=True)
                (self.out_dir / RESULT_FILE).unlink(missing_ok=True)
            self.procs.wait()
            candidates = []
        if not candidates:
            return self._fresh_state()
        load = functools.partial(
            load_run_checkpoint,
            fingerprint=self.fingerprint,
            procs=self.procs,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            weights=self.weights,
            log=self.log,
        )
        ckpt, state = resume_newest_intact(
            candidates, procs=self.procs, device=self.device, load=load, log=self.log
        )
        self.log.info(
            "resuming %s from %s (step %d, epoch %d)", self.method, ckpt, state["step"], state["epoch"]
        )
        return state

    # ------------------------------------------------------------------ steps

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _step(self, micro_batches: Sequence[np.ndarray], state: dict[str, Any]) -> dict[str, float]:
        """One optimizer step over this process's micro-batches.

        Returns the step's record: ``loss`` (the step's normalised loss, averaged over the processes),
        ``grad_norm`` (before clipping), ``learning_rate`` (of this step) and the objective's metrics, each
        averaged over the step's rows on every process.
        """
        exs = [[self.examples[i] for i in mb] for mb in micro_batches]
        norm = sum(ex.units for batch in exs for ex in batch) or 1.0
        loss_sum = torch.zeros((), device=self.device)
        metric_sums: dict[str, torch.Tensor] = {}
        rows = 0
        grad_w = np.zeros(len(self.source_names)) if self.weights is not None else None
        for j, batch_exs in enumerate(exs):
            batch = collate(batch_exs, self.pad_id, self.device)
            sync = j == len(exs) - 1  # gradients are all-reduced once per step, on the last micro-batch
            with contextlib.nullcontext() if sync else self.procs.no_sync(self.scorer):
                with self._autocast():
                    per_row, metrics = self.objective(self.scorer, batch)
                    if self.weights is not None:
                        w = torch.tensor(
                            [self.weights.row_weight(ex.sources) for ex in batch_exs], device=self.device
                        )
                        loss = (per_row * w).sum() / norm
                    else:
                        loss = per_row.sum() / norm
                loss.backward()
            loss_sum += loss.detach()
            for name, value in metrics.items():  # summed over rows here, divided by the step's rows below
                v = value.detach().double()
                metric_sums[name] = metric_sums.get(name, 0.0) + (v.sum() if v.ndim else v * len(batch_exs))
            rows += len(batch_exs)
            state["tokens"] += sum(ex.tokens for ex in batch_exs)
            if grad_w is not None:
                for ex, value in zip(batch_exs, per_row.detach().float().cpu().tolist(), strict=True):
                    self.weights.accumulate(grad_w, ex.sources, value)
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        if self.world > 1:
            loss_sum = self.procs.mean(loss_sum)
        loss_value = float(loss_sum)
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            last = latest_checkpoint(self.out_dir)
            kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written before it"
            what = "loss" if not math.isfinite(loss_value) else "gradient norm"
            raise NonFiniteLossError(
                f"non-finite {what} ({loss_value if what == 'loss' else grad_norm}) at step {state['step'] + 1} "
                f"(epoch {state['epoch'] + 1}) of {self.method} in {self.out_dir}; training stopped; {kept}"
            )
        learning_rate = float(self.scheduler.get_last_lr()[0])
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if grad_w is not None:
            grad = grad_w / norm  # the gradient of this process's loss (normalised as the model's)
            if self.world > 1:  # DDP averaged the processes' losses; so are the weights' gradients
                grad = self.procs.mean(torch.tensor(grad, device=self.device)).cpu().numpy()
            self.weights.step(grad)
        record = {"loss": loss_value, "grad_norm": grad_norm, "learning_rate": learning_rate}
        return record | self._row_means(metric_sums, rows)

    def _row_means(self, sums: dict[str, torch.Tensor], rows: int) -> dict[str, float]:
        """``sums[name] / rows`` with both summed over the processes (one all-reduce for all metrics)."""
        if not sums:
            return {}
        names = list(sums)  # the same objective on every process: the same names in the same order
        count = torch.tensor(float(rows), dtype=torch.float64, device=self.device)
        packed = self.procs.sum(torch.stack([sums[n] for n in names] + [count])).cpu()
        return {n: float(packed[i] / packed[-1]) for i, n in enumerate(names)}

    # ------------------------------------------------------------------ validation and checkpoints

    def _validate(self) -> tuple[str, float] | None:
        if self.valid_fn is None and not self.valid_examples:
            return None
        model = self.model
        model.eval()
        try:
            if self.valid_fn is not None:
                value = None
                if self.procs.is_main:  # rollouts run once; the score is shared
                    with torch.no_grad():
                        value = self.valid_fn(model, self.tokenizer)
                    if isinstance(value, bool) or not isinstance(value, (int, float)):
                        raise W2SError(f"valid_fn must return a number (higher is better), got {value!r}")
                metric, result = "valid_success", float(self.procs.broadcast(value))
            else:
                total, units = 0.0, 0.0
                bs = self.cfg.batch_size
                with torch.no_grad():
                    for i in range(0, len(self.valid_examples), bs):
                        chunk = self.valid_examples[i : i + bs]
                        with self._autocast():
                            per_row = self.objective(
                                self.model_forward, collate(chunk, self.pad_id, self.device)
                            ).losses
                        total += float(per_row.sum())
                        units += sum(ex.units for ex in chunk)
                metric, result = "valid_loss", total / max(units, 1.0)
        finally:
            model.train()
        if not math.isfinite(result):
            raise NonFiniteLossError(f"validation of {self.method} in {self.out_dir} gave {result}")
        return metric, result

    def model_forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        """Token log-probs through the unwrapped model (validation: no distributed wrapper involved)."""
        return logps_module.token_logps(self.model, input_ids, attention_mask, target)

    def _save(self, state: dict[str, Any]) -> Path | None:
        step = state["step"]
        tmp: Path | None = None
        final: Path | None = None
        if self.weights is not None:
            state["source_weights"] = self.weights.state_dict()
        if self.procs.is_main:
            tmp, final = new_checkpoint_dir(self.out_dir, step)
        if self.world > 1:
            names = self.procs.broadcast([str(tmp), str(final)])
            tmp, final = Path(names[0]), Path(names[1])
        assert tmp is not None and final is not None
        write_rng(tmp, self.rank)
        self.procs.wait()
        if self.procs.is_main:
            write_checkpoint(
                tmp, final, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, state=state
            )
            best = state["best"]["step"] if state["best"] else None
            rotate_checkpoints(self.out_dir, self.cfg.keep_checkpoints, {best} if best is not None else set())
            self._write_curves(state)
        self.procs.wait()
        return final

    def _write_curves(self, state: dict[str, Any]) -> None:
        curves = {
            "method": self.method,
            "loss": state["loss_curve"],
            "metrics": state["metrics_curve"],
            "valid": state["valid_curve"],
            "best": state["best"],
        }
        with atomic_write(self.out_dir / CURVES_FILE) as fh:
            fh.write(json.dumps(curves, allow_nan=False) + "\n")
        if self.weights is not None:
            with atomic_write(self.out_dir / SOURCE_WEIGHTS_FILE) as fh:
                fh.write(
                    json.dumps(
                        {"weights": self.weights.as_dict(), "history": state["source_weights_history"]},
                        indent=1,
                    )
                    + "\n"
                )

    # ------------------------------------------------------------------ run

    def run(self) -> TrainResult:
        """Train (resuming where a previous run stopped), export the model and return the result.

        Raises:
            NonFiniteLossError: the loss or gradient became NaN/inf (the last good checkpoint is kept).
            W2SError: ``out_dir`` holds another run's checkpoints, or bad input.
        """
        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._setup()
        if self.procs.is_main:
            save_config(cfg, self.out_dir, "train_config.yaml")
        state = self._resume()
        A, W = cfg.grad_accum, self.world
        self.log.info(
            "%s: %d rows, %d steps (%d per epoch), %d trainable parameters, device %s%s",
            self.method,
            len(self.examples),
            self.total_steps,
            self.steps_per_epoch,
            sum(p.numel() for p in self.params),
            self.device,
            f" x{W} processes" if W > 1 else "",
        )
        bar = progress(
            total=self.total_steps,
            initial=state["step"],
            desc=self.method,
            unit="step",
            leave=self.procs.is_main,
        )
        if not self.procs.is_main:
            bar.disable = True
        reporter = RunReporter.open(
            method=self.method,
            config=cfg,
            out_dir=self.out_dir,
            tracking=self.tracking,
            fingerprint=self.fingerprint,
            state=state,
            main=self.procs.is_main,
            log=self.log,
            total_steps=self.total_steps,
            micro_per_epoch=self.micro_per_epoch,
            info={"model": str(self.model_path), "rows": len(self.examples), "processes": self.world},
        )
        try:
            while state["step"] < self.total_steps and not state["stopped_early"]:
                order = epoch_order(len(self.examples), cfg.seed, state["epoch"], self.easy)
                bs = cfg.batch_size
                batches = [order[i * bs : (i + 1) * bs] for i in range(self.micro_per_epoch)]
                while state["micro"] < self.micro_per_epoch and state["step"] < self.total_steps:
                    window = batches[state["micro"] : state["micro"] + A * W]
                    t0 = time.perf_counter()
                    record = self._step(window[self.rank :: W], state)
                    state["train_seconds"] += time.perf_counter() - t0
                    state["micro"] += len(window)
                    state["step"] += 1
                    step = state["step"]
                    state["loss_curve"].append([step, record["loss"]])
                    state["metrics_curve"].append({"step": step, **record})
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}")
                    reporter.step(state, record)
                    epoch_done = state["micro"] >= self.micro_per_epoch
                    last = step >= self.total_steps
                    if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and not (epoch_done or last):
                        self._save(state)
                if state["micro"] >= self.micro_per_epoch:
                    state["epoch"] += 1
                    state["micro"] = 0
                self._end_of_epoch(state)  # at an epoch's end, or where max_steps ends inside one
                reporter.epoch_end(state, self.weights.as_dict() if self.weights is not None else None)
                self._save(state)
            return reporter.finish(self._finish(state))
        except BaseException:
            reporter.close(failed=True)
            raise
        finally:
            bar.close()

    def _end_of_epoch(self, state: dict[str, Any]) -> None:
        measured = self._validate()
        if self.weights is not None:
            state["source_weights_history"].append({"step": state["step"], **self.weights.as_dict()})
            self.log.info(
                "source weights after step %d: %s",
                state["step"],
                ", ".join(f"{k}={v:.4f}" for k, v in self.weights.as_dict().items()),
            )
        if measured is None:
            return
        metric, value = measured
        entry = {"epoch": state["epoch"], "step": state["step"], "metric": metric, "value": value}
        state["valid_curve"].append(entry)
        best = state["best"]
        higher = metric == "valid_success"
        better = best is None or (value > best["value"] if higher else value < best["value"])
        if better:
            state["best"] = {"step": state["step"], "value": value, "metric": metric}
            state["bad_epochs"] = 0
        else:
            state["bad_epochs"] += 1
        self.log.info(
            "%s epoch %d step %d: %s %.4f (best %.4f at step %d)",
            self.method,
            state["epoch"],
            state["step"],
            metric,
            value,
            state["best"]["value"],
            state["best"]["step"],
        )
        patience = self.cfg.early_stopping_patience
        if patience and state["bad_epochs"] >= patience and state["step"] < self.total_steps:
            self.log.info("%s: no better %s for %d epochs; stopping early", self.method, metric, patience)
            state["stopped_early"] = True

    def _finish(self, state: dict[str, Any]) -> TrainResult:
        cfg = self.cfg
        dirs = {int(p.name[5:]): p for p in checkpoint_dirs(self.out_dir)}
        best = state["best"]
        export_step = best["step"] if (cfg.export == "best" and best) else state["step"]
        if export_step != state["step"]:
            load_verified_trainable(self.model, dirs[export_step], self.procs, self.device)
            self.log.info("exporting the best checkpoint (step %d) instead of the last", export_step)
        model_dir = self.out_dir / "model"
        adapter_dir = self.out_dir / "adapter" if cfg.lora.enabled else None
        if self.procs.is_main:
            export_model(
                self.model,
                self.tokenizer,
                model_dir,
                adapter_dir=adapter_dir,
                base_path=self.model_path,
                dtype=saved_dtype(self.model_path),
                meta={
                    "method": self.method,
                    "trained_from": str(self.model_path.resolve()),
                    "step": export_step,
                    "fingerprint": self.fingerprint,
                },
            )
        self.procs.wait()
        tokens = state["tokens"]
        if self.world > 1:
            tokens = int(self.procs.sum(torch.tensor(tokens, device=self.device)))
        seconds = state["train_seconds"]
        result = TrainResult(
            method=self.method,
            out_dir=self.out_dir,
            model_dir=model_dir,
            adapter_dir=adapter_dir,
            best_checkpoint=dirs.get(best["step"]) if best else None,
            last_checkpoint=dirs.get(state["step"]),
            exported_step=export_step,
            steps=state["step"],
            epochs=state["epoch"] + state["micro"] / self.micro_per_epoch,
            loss_curve=[(int(s), float(v)) for s, v in state["loss_curve"]],
            valid_curve=list(state["valid_curve"]),
            valid_metric=best["metric"] if best else None,
            best_step=best["step"] if best else None,
            best_value=best["value"] if best else None,
            stopped_early=bool(state["stopped_early"]),
            train_tokens=tokens,
            train_seconds=seconds,
            tokens_per_second=tokens / seconds if seconds > 0 else 0.0,
            source_weights=self.weights.as_dict() if self.weights is not None else None,
            rows=len(self.examples),
            skipped_rows=self.skipped_rows,
            fingerprint=self.fingerprint,
            metrics_curve=[dict(entry) for entry in state["metrics_curve"]],
            final_metrics=final_metrics(state["metrics_curve"], cfg.log_every),
        )
        if self.procs.is_main:
            result.save()
        self.log.info(
            "%s finished: %d steps, final loss %.4f, %.0f tokens/s; model exported to %s",
            self.method,
            result.steps,
            result.loss_curve[-1][1] if result.loss_curve else float("nan"),
            result.tokens_per_second,
            model_dir,
        )
        return result
