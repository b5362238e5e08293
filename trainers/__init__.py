"""Fine-tuning of agents for w2s-agents (installed as ``w2s_agents.trainers``).

SFT, TreeDPO, MCTS-SFT and policy gradient (pg) on conversational rows extracted from searched trees, on CPU
(float32) or CUDA (bfloat16), with LoRA (PEFT) or full fine-tuning, resumable from atomic checkpoints. Import
this package as ``w2s_agents.trainers``, never as ``trainers``.

    from w2s_agents.trainers import TrainConfig, train_dpo, train_sft

    sft = train_sft("models/strong", "data/sft.jsonl", "runs/mcts-sft", TrainConfig(method="mcts-sft"))
    dpo = train_dpo(sft.model_dir, "data/pairs.jsonl", "runs/dpo", TrainConfig(method="dpo"),
                    reference_path="runs/weak-sft/model")
    load_model(dpo.model_dir)

=================  =====================================================================================
``config``         :class:`TrainConfig` (hyperparameters), :class:`TrainJobConfig` (a ``w2s train`` run)
``data``           reading, checking and splitting SFT rows and preference pairs
``masks``          chat-template rendering, agent-token masks, history cuts (:class:`ChatEncoder`)
``batch``          :class:`Example` (a tokenized row), :class:`Batch`, :func:`collate`, :class:`Objective`
``sft``            SFT / MCTS-SFT: :func:`sft_objective`, :func:`train_sft`
``dpo``            TreeDPO: :class:`DPOObjective` (loss and metrics), :func:`train_dpo`
``pg``             policy gradient: :class:`PGObjective` (clipped ratio or REINFORCE, KL), :func:`train_pg`
``reference``      reference log-probs with the reference model's own tokenizer, cached per run
``losses``         the DPO loss and margins as functions; per-source weights (:class:`SourceWeights`)
``loop``           :class:`Trainer`: the training loop shared by every method
``logps``          agent-token log-probs without materialising every logit
``model``          the policy, its tokenizer, AdamW and the learning-rate schedule
``distributed``    the processes of a run (accelerate / torchrun, DDP)
``checkpoint``     atomic checkpoints: trainable weights, optimizer, schedule, random states, loop state
``state_files``    the files of a checkpoint, each written and read without pickle (weights, states, RNG)
``resume``         which checkpoint a run resumes from: the newest intact one; damaged ones set aside
``export``         the exported model (LoRA merged) in ``out_dir/model``
``result``         :class:`TrainResult`, saved as ``result.json``
``fingerprint``    a run's identity, the reuse of finished runs
``tracking``       experiment trackers (``report_to``): TensorBoard, Weights & Biases, :class:`TrackingSpec`
``reporting``      what the loop reports to the log and the trackers, under TRL's names
=================  =====================================================================================
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import METHOD_LR, LoraOptions, PGOptions, SourceOptions, TrainConfig, TrainJobConfig
from .data import load_pairs, load_sft_rows, split_by_task
from .result import TrainResult

# Everything below needs torch: it is imported on first use, so that reading a config (``w2s config``, the
# experiment loader, the CLI's start-up) does not pay for importing torch.
_LAZY = {
    "Batch": "batch",
    "Example": "batch",
    "Objective": "batch",
    "ObjectiveOutput": "batch",
    "collate": "batch",
    "latest_checkpoint": "checkpoint",
    "DPOObjective": "dpo",
    "REFERENCE_FILE": "dpo",
    "encode_pairs": "dpo",
    "resolve_reference": "dpo",
    "train_dpo": "dpo",
    "export_model": "export",
    "model_identity": "fingerprint",
    "run_fingerprint": "fingerprint",
    "TokenScorer": "logps",
    "sequence_logps": "logps",
    "token_logps": "logps",
    "NonFiniteLossError": "loop",
    "Trainer": "loop",
    "epoch_order": "loop",
    "SourceWeights": "losses",
    "dpo_loss": "losses",
    "dpo_margins": "losses",
    "PGObjective": "pg",
    "encode_pg_rows": "pg",
    "load_pg_rows": "pg",
    "train_pg": "pg",
    "ChatEncoder": "masks",
    "EncodedConversation": "masks",
    "PairPlan": "masks",
    "fit_conversation": "masks",
    "fit_pair": "masks",
    "pair_messages": "masks",
    "load_tokenizer": "model",
    "reference_logps": "reference",
    "encode_sft_rows": "sft",
    "sft_objective": "sft",
    "train_sft": "sft",
    "TrackingSpec": "tracking",
    "check_backends": "tracking",
}

if TYPE_CHECKING:
    from .batch import Batch, Example, Objective, ObjectiveOutput, collate
    from .checkpoint import latest_checkpoint
    from .dpo import REFERENCE_FILE, DPOObjective, encode_pairs, resolve_reference, train_dpo
    from .export import export_model
    from .fingerprint import model_identity, run_fingerprint
    from .logps import TokenScorer, sequence_logps, token_logps
    from .loop import NonFiniteLossError, Trainer, epoch_order
    from .losses import SourceWeights, dpo_loss, dpo_margins
    from .masks import ChatEncoder, EncodedConversation, PairPlan, fit_conversation, fit_pair, pair_messages
    from .model import load_tokenizer
    from .pg import PGObjective, encode_pg_rows, load_pg_rows, train_pg
    from .reference import reference_logps
    from .sft import encode_sft_rows, sft_objective, train_sft
    from .tracking import TrackingSpec, check_backends


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
    "Batch",
    "ChatEncoder",
    "DPOObjective",
    "EncodedConversation",
    "Example",
    "LoraOptions",
    "NonFiniteLossError",
    "Objective",
    "ObjectiveOutput",
    "PGObjective",
    "PGOptions",
    "PairPlan",
    "SourceOptions",
    "SourceWeights",
    "TokenScorer",
    "TrackingSpec",
    "TrainConfig",
    "TrainJobConfig",
    "TrainResult",
    "Trainer",
    "check_backends",
    "collate",
    "dpo_loss",
    "dpo_margins",
    "encode_pairs",
    "encode_pg_rows",
    "encode_sft_rows",
    "epoch_order",
    "export_model",
    "fit_conversation",
    "fit_pair",
    "latest_checkpoint",
    "load_pairs",
    "load_pg_rows",
    "load_sft_rows",
    "load_tokenizer",
    "model_identity",
    "pair_messages",
    "reference_logps",
    "resolve_reference",
    "run_fingerprint",
    "sequence_logps",
    "sft_objective",
    "split_by_task",
    "token_logps",
    "train_dpo",
    "train_pg",
    "train_sft",
]
