"""Fine-tuning of agents for w2s-agents (installed as ``w2s_agents.trainers``).

SFT, TreeDPO and MCTS-SFT on conversational rows extracted from searched trees, on CPU (float32) or CUDA
(bfloat16), with LoRA (PEFT) or full fine-tuning, resumable from atomic checkpoints. Import this package as
``w2s_agents.trainers``, never as ``trainers``.

    from w2s_agents.trainers import TrainConfig, train_dpo, train_sft

    sft = train_sft("models/strong", "data/sft.jsonl", "runs/mcts-sft", TrainConfig(method="mcts-sft"))
    dpo = train_dpo(sft.model_dir, "data/pairs.jsonl", "runs/dpo", TrainConfig(method="dpo"),
                    reference_path="runs/weak-sft/model")
    load_model(dpo.model_dir)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import METHOD_LR, LoraOptions, SourceOptions, TrainConfig, TrainJobConfig
from .data import load_pairs, load_sft_rows, sft_row_from_trajectory, split_by_task
from .result import TrainResult

# Everything below needs torch: it is imported on first use, so that reading a config (``w2s config``, the
# experiment loader, the CLI's start-up) does not pay for importing torch.
_LAZY = {
    "latest_checkpoint": "checkpoint",
    "REFERENCE_FILE": "dpo",
    "encode_pairs": "dpo",
    "resolve_reference": "dpo",
    "train_dpo": "dpo",
    "export_model": "export",
    "TokenScorer": "logps",
    "sequence_logps": "logps",
    "token_logps": "logps",
    "NonFiniteLossError": "loop",
    "Trainer": "loop",
    "epoch_order": "loop",
    "SourceWeights": "losses",
    "dpo_loss": "losses",
    "dpo_margins": "losses",
    "ChatEncoder": "masks",
    "EncodedConversation": "masks",
    "PairPlan": "masks",
    "fit_conversation": "masks",
    "fit_pair": "masks",
    "pair_messages": "masks",
    "reference_logps": "reference",
    "encode_sft_rows": "sft",
    "train_sft": "sft",
}

if TYPE_CHECKING:
    from .checkpoint import latest_checkpoint
    from .dpo import REFERENCE_FILE, encode_pairs, resolve_reference, train_dpo
    from .export import export_model
    from .logps import TokenScorer, sequence_logps, token_logps
    from .loop import NonFiniteLossError, Trainer, epoch_order
    from .losses import SourceWeights, dpo_loss, dpo_margins
    from .masks import ChatEncoder, EncodedConversation, PairPlan, fit_conversation, fit_pair, pair_messages
    from .reference import reference_logps
    from .sft import encode_sft_rows, train_sft


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "METHOD_LR",
    "REFERENCE_FILE",
    "ChatEncoder",
    "EncodedConversation",
    "LoraOptions",
    "NonFiniteLossError",
    "PairPlan",
    "SourceOptions",
    "SourceWeights",
    "TokenScorer",
    "TrainConfig",
    "TrainJobConfig",
    "TrainResult",
    "Trainer",
    "dpo_loss",
    "dpo_margins",
    "encode_pairs",
    "encode_sft_rows",
    "epoch_order",
    "export_model",
    "fit_conversation",
    "fit_pair",
    "latest_checkpoint",
    "load_pairs",
    "load_sft_rows",
    "pair_messages",
    "reference_logps",
    "resolve_reference",
    "sequence_logps",
    "sft_row_from_trajectory",
    "split_by_task",
    "token_logps",
    "train_dpo",
    "train_sft",
]
