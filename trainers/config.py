"""Configuration of the trainers: one dataclass per section, every key with a default and a help string.

``TrainConfig`` holds the hyperparameters of SFT, TreeDPO, MCTS-SFT and policy gradient (its ``pg`` section);
``TrainJobConfig`` is what ``w2s train`` reads from YAML (model, data, output folder, reference models and a
``train`` section).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from w2s_agents.config import check, option

__all__ = [
    "BOOKKEEPING_KEYS",
    "METHOD_LR",
    "TRACKING_KEYS",
    "LoraOptions",
    "Method",
    "PGOptions",
    "ReportTo",
    "SourceOptions",
    "TrainConfig",
    "TrainJobConfig",
    "method_key_dict",
]

Method = Literal["sft", "dpo", "mcts-sft", "pg"]

METHOD_LR: dict[str, float] = {"sft": 1e-5, "mcts-sft": 1e-5, "dpo": 2e-5, "pg": 1e-6}
"""Learning rate of each method when ``lr`` is null (the paper's settings)."""

BOOKKEEPING_KEYS = frozenset(
    {"checkpoint_every", "keep_checkpoints", "log_every", "export", "early_stopping_patience", "report_to"}
)
"""Keys that do not change the computation of a step: a run may resume with other values of these."""

ReportTo = Literal["tensorboard", "wandb"]
"""An experiment tracker (``report_to``, as in TRL): TensorBoard event files or a Weights & Biases run."""

TRACKING_KEYS = frozenset({"report_to"})
"""Keys that say where a run's numbers are reported, not what it computes: neither a run's fingerprint nor a
pipeline stage's key hashes them (they are also bookkeeping keys)."""


@dataclass(frozen=True)
class LoraOptions:
    """Low-rank adapters through PEFT; when disabled every parameter of the model is trained."""

    enabled: bool = option(False, "train LoRA adapters (PEFT) instead of every parameter")
    r: int = option(64, "rank of the adapters (paper: 64)")
    alpha: float = option(128.0, "scaling numerator of the adapters, scale = alpha / r (paper: 128)")
    dropout: float = option(0.05, "dropout on the adapters' input")
    target_modules: list[str] = option(
        default_factory=lambda: ["all-linear"],
        help="module names that get adapters (e.g. [q_proj, v_proj]); [all-linear]: every linear layer "
        "except the output head",
    )

    def __post_init__(self) -> None:
        check(self.r >= 1, "r", f"must be >= 1, got {self.r}")
        check(self.alpha > 0 and math.isfinite(self.alpha), "alpha", f"must be > 0, got {self.alpha}")
        check(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        check(
            len(self.target_modules) > 0 and all(m.strip() for m in self.target_modules),
            "target_modules",
            "must name at least one module",
        )


@dataclass(frozen=True)
class SourceOptions:
    """Several weak supervisors (RAVEN): per-source weights on the simplex and easy-pairs-first ordering."""

    weights: bool = option(
        False,
        "learn one weight per source (weak model) jointly with the model: a row's loss is scaled by "
        "K * mean weight of its sources; the weights take a gradient step, are clipped and renormalised",
    )
    weight_lr: float = option(
        0.01, "step size of the source weights' gradient step (the gradient is about the mean loss per unit)"
    )
    min_weight: float = option(1e-6, "the weights are clipped at this value before renormalising")
    easy_first: bool = option(
        False,
        "order each epoch with the easy rows first (pairs whose chosen and rejected branches have the same "
        "sources, or rows with one source), each group shuffled",
    )

    def __post_init__(self) -> None:
        check(self.weight_lr >= 0 and math.isfinite(self.weight_lr), "weight_lr", "must be finite and >= 0")
        check(0 < self.min_weight < 1, "min_weight", f"must be in (0, 1), got {self.min_weight}")


@dataclass(frozen=True)
class PGOptions:
    """The policy-gradient objective (method pg; equations in docs/training.md and :mod:`.pg`)."""

    loss: Literal["clip", "reinforce"] = option(
        "clip",
        "clip: PPO/GRPO clipped ratio to the start policy, -min(r A, clip(r, 1-eps, 1+eps) A) per agent token; "
        "reinforce: -A log pi per agent token",
    )
    clip_eps: float = option(0.2, "clip range eps of the ratio r = pi / pi_start (loss: clip)")
    kl_coef: float = option(
        0.0,
        "weight of the KL penalty to the frozen reference model ('reference'), k3 estimator per agent token; "
        "0 disables it (no reference model is loaded)",
    )
    aggregation: Literal["token", "sequence"] = option(
        "token",
        "token: mean over the agent tokens of an optimizer step; sequence: each row's token mean, averaged over "
        "the rows",
    )

    def __post_init__(self) -> None:
        check(
            0 < self.clip_eps < 1 and math.isfinite(self.clip_eps),
            "clip_eps",
            f"must be in (0, 1), got {self.clip_eps}",
        )
        check(
            self.kl_coef >= 0 and math.isfinite(self.kl_coef), "kl_coef", f"must be >= 0, got {self.kl_coef}"
        )


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one fine-tuning run (SFT, TreeDPO, MCTS-SFT or policy gradient)."""

    method: Method = option(
        "sft", "sft, dpo (TreeDPO), mcts-sft (SFT on best paths; named so in outputs) or pg (policy gradient)"
    )
    lr: float | None = option(None, "peak learning rate; null: 1e-5 for sft and mcts-sft, 2e-5 for dpo")
    epochs: int = option(3, "passes over the data (ignored when max_steps is set)")
    max_steps: int | None = option(None, "optimizer steps to train for; null: as many as 'epochs' take")
    batch_size: int = option(4, "rows (or pairs) per micro-batch on each device")
    grad_accum: int = option(1, "micro-batches accumulated into one optimizer step")
    max_length: int = option(
        2048, "tokens per sequence; longer conversations lose their oldest turns (system + task turn kept)"
    )
    loss_reduction: Literal["token", "turn"] = option(
        "token",
        "SFT loss: mean over agent tokens (token) or mean over agent turns of each turn's summed log-prob (turn)",
    )
    beta: float = option(0.1, "DPO temperature beta of the sigmoid loss (paper: 0.1)")
    sft_weight: float = option(
        0.0,
        "DPO: add this weight times the chosen completion's mean agent-token NLL to each pair's loss (RPO), "
        "which keeps the chosen actions likely where plain DPO on little data pushes both sides down; "
        "0 is plain DPO (the paper)",
    )
    reference: str = option(
        "weak",
        "DPO reference model (and pg's KL reference when pg.kl_coef > 0): weak (the weak SFT agent, paper), "
        "strong (the initial policy) or a path",
    )
    lora: LoraOptions = option(default_factory=LoraOptions, help="LoRA adapters (PEFT)")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass to save memory")
    device: str = option(
        "auto",
        "'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N' (accelerate sets it per rank)",
    )
    dtype: Literal["auto", "float32", "bfloat16"] = option(
        "auto",
        "compute dtype: auto = bfloat16 on CUDA, float32 on CPU; bfloat16 runs under autocast with float32 "
        "trainable weights (frozen LoRA base weights are held in bfloat16)",
    )
    lr_scheduler: Literal["cosine", "linear", "constant"] = option(
        "cosine", "learning-rate decay after warmup"
    )
    warmup_ratio: float = option(0.03, "fraction of the optimizer steps spent warming the learning rate up")
    weight_decay: float = option(0.0, "AdamW weight decay (not applied to biases and norm weights)")
    adam_betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas")
    max_grad_norm: float = option(1.0, "gradient clipping norm; 0 disables clipping")
    checkpoint_every: int = option(100, "save a checkpoint every N optimizer steps (and at each epoch's end)")
    keep_checkpoints: int = option(2, "most recent checkpoints kept (the best one is always kept too)")
    seed: int = option(0, "seed of the data order, initialisation of adapters and dropout")
    valid_fraction: float = option(
        0.1,
        "without valid data and valid_fn: share of the tasks held out for the validation loss (0 disables)",
    )
    early_stopping_patience: int = option(
        0, "stop after this many epochs without a better validation score (0: never stop early)"
    )
    export: Literal["best", "last"] = option(
        "best", "which weights the exported model gets: the best validated checkpoint or the last"
    )
    log_every: int = option(
        10,
        "log the loss and the method's metrics every N optimizer steps (and at step 1); the result's "
        "final_metrics average the last N steps",
    )
    success_only: bool = option(
        True, "SFT on trajectory files: only won episodes become rows (expert demos are won)"
    )
    sources: SourceOptions = option(default_factory=SourceOptions, help="several weak supervisors (RAVEN)")
    pg: PGOptions = option(
        default_factory=PGOptions,
        help="policy gradient (method pg); left out of the identity of runs of the other methods",
    )
    report_to: list[ReportTo] | None = option(
        None,
        "experiment trackers of this run: tensorboard, wandb (TRL's report_to); [] none; null: none, or under "
        "w2s run the run's run.report_to",
    )

    def __post_init__(self) -> None:
        check(
            self.lr is None or (self.lr > 0 and math.isfinite(self.lr)), "lr", f"must be > 0, got {self.lr}"
        )
        check(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        check(
            self.max_steps is None or self.max_steps >= 1, "max_steps", f"must be >= 1, got {self.max_steps}"
        )
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.grad_accum >= 1, "grad_accum", f"must be >= 1, got {self.grad_accum}")
        check(self.max_length >= 8, "max_length", f"must be >= 8, got {self.max_length}")
        check(self.beta > 0 and math.isfinite(self.beta), "beta", f"must be > 0, got {self.beta}")
        check(
            self.sft_weight >= 0 and math.isfinite(self.sft_weight),
            "sft_weight",
            f"must be a finite number >= 0, got {self.sft_weight}",
        )
        check(bool(self.reference.strip()), "reference", "must be weak, strong or a model path")
        check(
            re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
            "device",
            f"must be auto, cpu, cuda or cuda:N, got {self.device!r}",
        )
        check(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(all(0 <= b < 1 for b in self.adam_betas), "adam_betas", "must be in [0, 1)")
        check(self.max_grad_norm >= 0, "max_grad_norm", f"must be >= 0, got {self.max_grad_norm}")
        check(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0 (0: only at epoch ends)")
        check(self.keep_checkpoints >= 1, "keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}")
        check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        check(0.0 <= self.valid_fraction < 1.0, "valid_fraction", "must be in [0, 1)")
        check(self.early_stopping_patience >= 0, "early_stopping_patience", "must be >= 0")
        check(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")
        check(
            self.report_to is None or len(set(self.report_to)) == len(self.report_to),
            "report_to",
            f"must not repeat a tracker, got {self.report_to}",
        )

    @property
    def learning_rate(self) -> float:
        """The peak learning rate: ``lr``, or the method's default (:data:`METHOD_LR`)."""
        return self.lr if self.lr is not None else METHOD_LR[self.method]

    @property
    def is_dpo(self) -> bool:
        """Whether the method trains on preference pairs."""
        return self.method == "dpo"


def method_key_dict(config: TrainConfig, data: dict) -> dict:
    """``data`` (``config`` as a dict) without the sections of other methods than ``config.method``: a run of
    sft, mcts-sft or dpo is identified (fingerprint, pipeline stage key) as before the pg section existed."""
    return data if config.method == "pg" else {k: v for k, v in data.items() if k != "pg"}


@dataclass(frozen=True)
class TrainJobConfig:
    """A ``w2s train`` run: which model trains on which data, where it writes, and the hyperparameters."""

    model: str = option("", "local folder of the model to train (the initial policy)")
    data: list[str] = option(
        default_factory=list,
        help="training data files (.jsonl): SFT rows {messages}, pairs {prompt, chosen, rejected}, pg rows "
        "{messages, advantage}, or trajectory files for plain SFT",
    )
    valid_data: list[str] = option(default_factory=list, help="validation data files (same format as data)")
    out_dir: Path = option(Path("runs/train"), "output folder: checkpoints, curves, exported model")
    weak_model: str | None = option(None, "local folder of the weak SFT agent (the DPO reference 'weak')")
    strong_model: str | None = option(
        None, "local folder of the strong SFT agent (reference 'strong'; null: the model being trained)"
    )
    resume: bool = option(True, "continue from the last checkpoint in out_dir when it belongs to this run")
    train: TrainConfig = option(default_factory=TrainConfig, help="hyperparameters")

    def __post_init__(self) -> None:
        check(bool(self.model.strip()), "model", "must name the local folder of the model to train")
        check(len(self.data) > 0, "data", "must list at least one data file")

    def reference_path(self) -> str:
        """The DPO reference model folder that ``train.reference`` names."""
        ref = self.train.reference
        if ref == "weak":
            check(self.weak_model is not None, "weak_model", "must be set when train.reference is weak")
            return str(self.weak_model)
        if ref == "strong":
            return str(self.strong_model or self.model)
        return ref
