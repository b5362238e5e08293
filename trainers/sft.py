"""SFT and MCTS-SFT: supervised fine-tuning on agent conversations, loss on the agent's tokens only.

``train_sft`` serves the weak and strong SFT baselines (expert demos, as SFT rows or trajectory files) and
MCTS-SFT (best-path rows of searched trees, ``method: mcts-sft``); both run the same code, named by their
method in outputs and logs. From rows to gradient, top to bottom:

1. **Load rows** (:func:`.data.load_sft_rows`): ``{"messages": [...]}`` rows or trajectory files, checked
   with ``file:line``; without validation data or ``valid_fn`` a share of the tasks is held out.
2. **Encode** (:func:`encode_sft_rows`): each conversation rendered with the policy's chat template, its
   agent tokens masked in (:mod:`.masks`; agent turns with recorded token ids of the same tokenizer take
   those ids, :mod:`.token_ids`), the oldest history cut to ``max_length``: one
   :class:`~.batch.Example` per row whose loss units are its agent tokens (``loss_reduction: token``) or its
   agent turns (``turn``).
3. **Objective** (:func:`sft_objective`): each row's summed negative log-likelihood of its agent tokens,

       L = -(1 / N) * sum over the step's rows of sum_t log pi(a_t | context_t),

   N the agent tokens (or turns) of the optimizer step, so ``turn`` gives DESIGN's
   ``L = -mean_t log pi(a*_t | context*_t)`` with each turn's log-probability summed over its tokens.
4. **Train** (:class:`.loop.Trainer`): seeded micro-batches, the normalised loss accumulated, clipped,
   AdamW; each step's loss, gradient norm and learning rate go to the metrics curve.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from w2s_agents.errors import ConfigError
from w2s_agents.tokens import tokenizer_fingerprint

from .batch import Batch, Example, ObjectiveOutput
from .config import TrainConfig
from .data import Row, RowsInput, data_fingerprint, load_sft_rows, train_and_valid_rows
from .fingerprint import reuse_finished, run_fingerprint
from .loop import Trainer, ValidFn
from .masks import ChatEncoder, fit_conversation
from .model import load_tokenizer
from .result import TrainResult
from .token_ids import TokenIdsUse, recorded_for_messages, with_token_ids_use
from .tracking import TrackingSpec

__all__ = ["encode_sft_rows", "sft_objective", "train_sft"]

logger = logging.getLogger(__name__)


def encode_sft_rows(
    rows: Sequence[Row],
    encoder: ChatEncoder,
    config: TrainConfig,
    source_index: dict[str, int],
    use: TokenIdsUse | None = None,
) -> tuple[list[Example], int]:
    """Tokenize SFT rows with agent-token masks, cutting history to ``max_length``.

    Agent turns that carry recorded token ids of the encoder's tokenizer are tokenized from those ids where
    they spell the turn's text (:mod:`.token_ids`); ``use`` counts which rows and turns did.

    Returns ``(examples, skipped)``: rows that do not fit even with their history cut, or whose agent
    tokens were all cut, are skipped (and logged).
    """
    out: list[Example] = []
    skipped = 0
    fingerprint: str | None = None
    for row in rows:
        messages, recorded = row.data["messages"], None
        if row.data.get("agent_tokens"):
            fingerprint = fingerprint or tokenizer_fingerprint(encoder.tokenizer)
            recorded = recorded_for_messages(messages, row.data["agent_tokens"], fingerprint, use)
        fitted = fit_conversation(encoder, messages, config.max_length, origin=row.origin, recorded=recorded)
        if fitted is None or fitted[0].n_loss_tokens == 0:
            skipped += 1
            logger.debug("%s: too long for max_length %d; skipped", row.origin, config.max_length)
            continue
        enc, _ = fitted
        if use is not None:
            use.count_row((enc,))
        units = enc.n_loss_tokens if config.loss_reduction == "token" else enc.n_turns
        sources = tuple(source_index[s] for s in row.sources if s in source_index)
        out.append(Example((enc,), float(units), sources, row.easy))
    if skipped:
        logger.warning(
            "%d of %d rows do not fit max_length %d even with their history cut; skipped",
            skipped,
            len(rows),
            config.max_length,
        )
    return out, skipped


def sft_objective(scorer: nn.Module, batch: Batch) -> ObjectiveOutput:
    """Each row's negative log-likelihood of its agent tokens, summed over the row; no metrics beyond the
    loss the loop records (an :class:`~.batch.Objective`)."""
    token = scorer(batch.input_ids, batch.attention_mask, batch.target_mask)  # (B, T), 0 off the agent tokens
    return ObjectiveOutput(-token.sum(dim=-1), {})


def train_sft(
    model_path: str | os.PathLike[str],
    rows_or_path: RowsInput,
    out_dir: str | os.PathLike[str],
    config: TrainConfig | None = None,
    *,
    valid_fn: ValidFn | None = None,
    valid_rows_or_path: RowsInput | None = None,
    resume: bool = True,
    tracking: TrackingSpec | None = None,
) -> TrainResult:
    """Fine-tune the model in ``model_path`` on SFT rows (method ``sft`` or ``mcts-sft``).

    Args:
        model_path: local folder of the model to train.
        rows_or_path: ``{"messages": [...]}`` rows, trajectory records, or ``.jsonl`` file(s) of them.
        out_dir: the run's folder (checkpoints, curves, ``model/`` export, ``result.json``).
        config: hyperparameters (default: ``TrainConfig(method="sft")``).
        valid_fn: ``valid_fn(model, tokenizer) -> score`` (higher is better) run each epoch; the best
            epoch's weights are exported.
        valid_rows_or_path: validation rows for the validation loss (used without ``valid_fn``); without
            either, ``config.valid_fraction`` of the tasks is held out.
        tracking: where the run's numbers are tracked (``w2s run``: under the run's name); None: the trackers
            of ``config.report_to`` in ``out_dir`` (``tb/``, ``wandb/``).
        resume: continue from the newest checkpoint of this run in ``out_dir``; a finished run with the
            same config, data and model is returned as it is.

    Raises:
        DataFormatError: a malformed row (``file:line``).
        ModelLoadError: the model folder cannot be loaded.
        NonFiniteLossError: the loss became NaN or infinite (the last good checkpoint is kept).
        W2SError: ``out_dir`` holds another run's checkpoints.
    """
    cfg = config or TrainConfig(method="sft")
    if cfg.is_dpo:
        raise ConfigError("train_sft trains method sft or mcts-sft, got method dpo (use train_dpo)")
    rows, valid_rows = train_and_valid_rows(
        lambda source: load_sft_rows(source, success_only=cfg.success_only),
        rows_or_path,
        valid_rows_or_path,
        hold_out=valid_fn is None,
        fraction=cfg.valid_fraction,
        seed=cfg.seed,
    )
    if valid_rows_or_path is None and valid_rows:
        logger.info("holding out %d rows of %d tasks for the validation loss", len(valid_rows),
                    len({r.data.get("task_id", r.origin) for r in valid_rows}))  # fmt: skip
    out = Path(out_dir)
    fingerprint = run_fingerprint(cfg, model_path, data_fingerprint(rows), data_fingerprint(valid_rows))
    if (done := reuse_finished(out, fingerprint, resume=resume)) is not None:
        return done
    tokenizer = load_tokenizer(model_path)
    encoder = ChatEncoder(tokenizer, name=str(model_path))
    names = sorted({s for r in rows for s in r.sources})
    use = TokenIdsUse()
    examples, skipped = encode_sft_rows(rows, encoder, cfg, {n: i for i, n in enumerate(names)}, use)
    logger.info("%s", use.summary())
    valid_examples, _ = encode_sft_rows(valid_rows, encoder, cfg, {}) if valid_rows else ([], 0)
    trainer = Trainer(
        method=cfg.method,
        model_path=model_path,
        out_dir=out,
        config=cfg,
        objective=sft_objective,
        examples=examples,
        valid_examples=valid_examples,
        valid_fn=valid_fn,
        fingerprint=fingerprint,
        source_names=names,
        resume=resume,
        skipped_rows=skipped,
        tracking=tracking,
    )
    return with_token_ids_use(trainer.run(), use, save=trainer.procs.is_main)
