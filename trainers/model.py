"""The model being trained and its optimizer: the tokenizer of a model folder, the policy loaded for training
(gradient checkpointing, LoRA adapters), AdamW with its weight-decay groups and the learning-rate schedule.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from w2s_agents.errors import ModelLoadError

from .config import TrainConfig

__all__ = ["load_policy", "load_tokenizer", "make_optimizer", "make_scheduler", "saved_dtype"]


def load_tokenizer(model_path: str | Path) -> Any:
    """The tokenizer of a local model folder (pad = eos when it has no pad token).

    Raises:
        ModelLoadError: the folder does not exist or holds no loadable tokenizer.
    """
    p = Path(model_path).expanduser()
    if not p.is_dir():
        raise ModelLoadError(f"model path '{model_path}' is not a local directory")
    from w2s_agents.agents.models import load_tokenizer as load_local_tokenizer

    return load_local_tokenizer(p)


def saved_dtype(model_path: Path) -> torch.dtype:
    """The dtype a model folder's weights were saved in (its config.json), float32 when unknown."""
    try:
        cfg = json.loads((model_path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return torch.float32
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(name), torch.float32)


def load_policy(
    model_path: Path, config: TrainConfig, *, device: torch.device, param_dtype: str
) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` of the policy to train, in training mode: gradient checkpointing enabled and
    LoRA adapters added (PEFT) as ``config`` asks; ``param_dtype`` is the dtype of the loaded weights.

    Raises:
        ModelLoadError: the folder cannot be loaded.
    """
    from w2s_agents.agents.models import load_model

    lm = load_model(model_path, device=str(device), dtype=param_dtype)
    model = lm.model
    if config.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 names it so
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # pragma: no cover - older transformers
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False
    if config.lora.enabled:
        from peft import LoraConfig, get_peft_model

        targets = config.lora.target_modules
        model = get_peft_model(
            model,
            LoraConfig(
                r=config.lora.r,
                lora_alpha=config.lora.alpha,
                lora_dropout=config.lora.dropout,
                target_modules=targets[0] if targets == ["all-linear"] else list(targets),
                task_type="CAUSAL_LM",
            ),
        )
    model.train()
    return model, lm.tokenizer


def make_optimizer(params: Sequence[nn.Parameter], config: TrainConfig, *, fused: bool) -> torch.optim.AdamW:
    """AdamW over ``params``: weight decay on matrices only (not on biases and norm weights)."""
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=config.learning_rate,
        betas=tuple(config.adam_betas),
        eps=1e-8,
        fused=fused or None,
    )


def _lr_lambda(total: int, warmup: int, kind: str) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if kind == "constant":
            return 1.0
        progress_ = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return 1.0 - progress_
        return 0.5 * (1.0 + math.cos(math.pi * progress_))

    return f


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warmup_ratio`` of ``total_steps``, then ``config.lr_scheduler``'s decay."""
    warmup = int(config.warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total_steps, warmup, config.lr_scheduler))
