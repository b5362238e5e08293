"""Policy gradient (pg): clipped-ratio (PPO/GRPO) or REINFORCE on the agent tokens of steps with advantages.

From rows to gradient, top to bottom (:func:`train_pg` runs the steps in this order):

1. **Load rows** (:func:`load_pg_rows`): ``{"messages", "advantage", ...}`` rows
   (:class:`~w2s_agents.search.advantages.PGRow`, made from searched trees by
   :func:`~w2s_agents.search.advantages.pg_rows`), checked with ``file:line``; without validation rows or
   ``valid_fn`` a share of the tasks is held out.
2. **Encode** (:func:`encode_pg_rows`): each conversation rendered with the policy's chat template, the oldest
   history cut to ``max_length``; only the last assistant turn (the step's action) carries loss; agent turns
   with recorded token ids of the policy's tokenizer are tokenized from those ids (:mod:`.token_ids`), so the
   policy, start and reference log-probs are those of the tokens the acting model produced. One
   :class:`~.batch.Example` per row with its advantage; its loss units are its agent tokens
   (``pg.aggregation: token``) or 1 (``sequence``).
3. **Objective** (:class:`PGObjective`). Per agent token t of a row with advantage A, ``l_t = log pi(a_t|s_t)``
   under the policy being trained, ``l0_t`` under the start policy (the model the run starts from, frozen) and
   ``lr_t`` under the reference model (frozen):

       clip:       r_t = exp(l_t - l0_t),   L_t = -min(r_t A, clip(r_t, 1 - eps, 1 + eps) A)
       reinforce:  L_t = -A l_t
       KL (k3):    k_t = exp(lr_t - l_t) - (lr_t - l_t) - 1 >= 0,   L_t += kl_coef * k_t

   A positive advantage raises the action's probability, a negative one lowers it. ``token`` aggregation
   averages ``L_t`` over the agent tokens of an optimizer step; ``sequence`` averages each row's tokens, then
   the rows. The ratio's denominator is the start policy: trajectories do not record the token log-probs of
   the policy that produced them, and in an on-policy round that policy is the start policy. At the first
   step ``r_t = 1`` and the clipped loss has the gradient of REINFORCE. k3 (Schulman's estimator, as in GRPO)
   is an unbiased, non-negative estimate of KL(pi || pi_ref) on tokens sampled from pi.
   Metrics per step (means over the step's rows): ``pg/advantage`` (A), ``pg/kl`` (mean k_t; 0 without the
   KL term), ``pg/clip_fraction`` (share of agent tokens whose ratio was clipped: r > 1 + eps with A > 0 or
   r < 1 - eps with A < 0), ``pg/ratio`` (mean r_t), ``pg/entropy`` (mean -l_t: the sampled-token estimate
   of the policy's entropy on the rows' tokens).
4. **Train** (:class:`.loop.Trainer`): the loop of every method (checkpoints, resume, export, tracking).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from w2s_agents.errors import ConfigError, DataFormatError
from w2s_agents.messages import Message
from w2s_agents.search.advantages import read_pg_rows
from w2s_agents.search.rows import RowsInput, describe
from w2s_agents.tokens import tokenizer_fingerprint

from .batch import Batch, Example, ObjectiveOutput
from .config import PGOptions, TrainConfig
from .data import Row, data_fingerprint, train_and_valid_rows
from .dpo import _reference_device
from .fingerprint import model_identity, reuse_finished, run_fingerprint
from .logps import token_logps
from .loop import Trainer, ValidFn
from .masks import ChatEncoder, EncodedConversation, conversation_units
from .model import load_tokenizer
from .result import TrainResult
from .token_ids import TokenIdsUse, recorded_for_messages, with_token_ids_use
from .tracking import TrackingSpec

__all__ = ["PGObjective", "encode_pg_rows", "load_pg_rows", "train_pg"]

logger = logging.getLogger(__name__)


def load_pg_rows(rows_or_path: RowsInput) -> list[Row]:
    """Policy-gradient rows from ``.jsonl`` files or memory, checked (:func:`read_pg_rows`).

    Raises:
        DataFormatError: a malformed row, with ``file:line`` (or ``rows[i]``) and what is wrong, or no rows.
    """
    return [Row(r.to_dict(), r.origin, *r.supervision()) for r in read_pg_rows(rows_or_path)]


def encode_pg_rows(
    rows: Sequence[Row],
    encoder: ChatEncoder,
    config: TrainConfig,
    source_index: dict[str, int],
    use: TokenIdsUse | None = None,
) -> tuple[list[Example], int]:
    """Tokenize policy-gradient rows, loss on the last assistant turn only, history cut to ``max_length``.

    Agent turns that carry recorded token ids of the encoder's tokenizer are tokenized from those ids where
    they spell the turn's text (:mod:`.token_ids`, as SFT does); ``use`` counts which rows and turns did.

    Returns ``(examples, skipped)``: rows that do not fit even with their history cut are skipped (and logged).
    """
    out: list[Example] = []
    skipped = 0
    fingerprint: str | None = None
    for row in rows:
        messages, recorded = row.data["messages"], None
        if row.data.get("agent_tokens"):
            fingerprint = fingerprint or tokenizer_fingerprint(encoder.tokenizer)
            recorded = recorded_for_messages(messages, row.data["agent_tokens"], fingerprint, use)
        enc = _fit_step(encoder, messages, config.max_length, row.origin, recorded)
        if enc is None or enc.n_loss_tokens == 0:
            skipped += 1
            continue
        if use is not None:
            use.count_row((enc,))
        units = float(enc.n_loss_tokens) if config.pg.aggregation == "token" else 1.0
        sources = tuple(source_index[s] for s in row.sources if s in source_index)
        out.append(Example((enc,), units, sources, row.easy, advantage=float(row.data["advantage"])))
    if skipped:
        logger.warning(
            "%d of %d rows do not fit max_length %d even with their history cut; skipped",
            skipped,
            len(rows),
            config.max_length,
        )
    return out, skipped


def _fit_step(
    encoder: ChatEncoder,
    messages: Sequence[Message],
    max_length: int,
    origin: str,
    recorded: Sequence[Sequence[int] | None] | None = None,
) -> EncodedConversation | None:
    """The conversation encoded with the loss on its last assistant turn, its oldest units (an agent turn and
    the observation after it) dropped until it fits ``max_length``; the system and task turns, the last unit
    before the step and the step are kept; ``recorded`` (one entry per message) are dropped with their
    messages. None when even that is too long."""
    head = next((i + 1 for i, m in enumerate(messages) if m["role"] == "user"), 0)
    units = conversation_units(messages, head)

    def cut(items: Sequence[Any], n: int) -> list[Any]:
        return list(items) if n == 0 else [*items[:head], *items[units[n - 1][1] :]]

    for n in range(max(len(units) - 1, 1)):
        kept = cut(messages, n)
        rec = cut(recorded, n) if recorded is not None else None
        enc = encoder.encode(kept, score_from=len(kept) - 1, origin=origin, recorded=rec)
        if len(enc) <= max_length:
            return enc
    return None


class PGObjective:
    """The policy-gradient loss of each row and its metrics (an :class:`~.batch.Objective`; the equations are
    in the module docstring). The frozen start and reference models are loaded by :meth:`preload` or on the
    first batch, on its device, and only when the loss needs them (one model when both are the same folder).

    Args:
        options: the ``pg`` section of the config.
        start_path: the folder the run starts from (the ratio's denominator; loaded for ``loss: clip``).
        reference_path: the KL reference (loaded when ``kl_coef > 0``).
    """

    def __init__(
        self,
        options: PGOptions,
        *,
        start_path: str | os.PathLike[str],
        reference_path: str | os.PathLike[str] | None = None,
    ) -> None:
        if options.kl_coef > 0 and reference_path is None:
            raise ConfigError("pg.kl_coef > 0 needs a reference model ('reference')")
        self.options = options
        self.start_path = Path(start_path).expanduser().resolve()
        self.reference_path = (
            Path(reference_path).expanduser().resolve() if reference_path is not None else None
        )
        self._frozen: dict[Path, nn.Module] = {}

    def frozen(self, path: Path, device: torch.device) -> nn.Module:
        """The frozen model of folder ``path`` on ``device`` (loaded once, float32, eval mode, no gradients)."""
        model = self._frozen.get(path)
        if model is None:
            from w2s_agents.agents.models import load_model

            model = load_model(path, device=str(device), dtype="float32").model
            model.requires_grad_(False)
            model.eval()
            self._frozen[path] = model
        return model

    def preload(self, device: torch.device) -> None:
        """Load the frozen models the loss needs on ``device`` now (else on the first batch)."""
        if self.options.loss == "clip":
            self.frozen(self.start_path, device)
        if self.options.kl_coef > 0 and self.reference_path is not None:
            self.frozen(self.reference_path, device)

    def _logps(self, path: Path, batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            model = self.frozen(path, batch.input_ids.device)
            return token_logps(model, batch.input_ids, batch.attention_mask, batch.target_mask)

    def __call__(self, scorer: nn.Module, batch: Batch) -> ObjectiveOutput:
        """Per-row losses ``(B,)`` and per-row metrics of a batch of policy-gradient rows.

        Raises:
            ValueError: the batch has no advantages.
        """
        if batch.advantages is None:
            raise ValueError("a policy-gradient batch needs the advantages of its rows")
        opt = self.options
        mask = batch.target_mask.float()  # (B, T), 1 on the step's agent tokens
        n_tokens = mask.sum(dim=-1).clamp(min=1)  # (B,)
        adv = batch.advantages[:, None]  # (B, 1), broadcast over the tokens
        logp = scorer(batch.input_ids, batch.attention_mask, batch.target_mask)  # (B, T), 0 off the mask
        zeros = torch.zeros_like(mask)
        if opt.loss == "clip":
            start = self._logps(self.start_path, batch)
            ratio = torch.exp(logp - start)  # 1 off the mask (both log-probs are 0 there)
            clipped = ratio.clamp(1 - opt.clip_eps, 1 + opt.clip_eps)
            per_token = -torch.minimum(ratio * adv, clipped * adv)
            was_clipped = ((ratio > 1 + opt.clip_eps) & (adv > 0)) | ((ratio < 1 - opt.clip_eps) & (adv < 0))
            clip_fraction = (was_clipped.float() * mask).sum(dim=-1) / n_tokens
            ratio_mean = (ratio.detach() * mask).sum(dim=-1) / n_tokens
        else:
            per_token = -adv * logp
            clip_fraction = zeros.sum(dim=-1)
            ratio_mean = torch.ones_like(n_tokens)
        kl = zeros
        if opt.kl_coef > 0 and self.reference_path is not None:
            delta = self._logps(self.reference_path, batch) - logp  # log pi_ref - log pi, 0 off the mask
            kl = torch.exp(delta) - delta - 1  # k3 >= 0
            per_token = per_token + opt.kl_coef * kl
        losses = (per_token * mask).sum(dim=-1)  # (B,)
        if opt.aggregation == "sequence":
            losses = losses / n_tokens
        metrics = {
            "pg/advantage": batch.advantages,
            "pg/kl": (kl.detach() * mask).sum(dim=-1) / n_tokens,
            "pg/clip_fraction": clip_fraction.detach(),
            "pg/ratio": ratio_mean.detach(),
            "pg/entropy": (-logp.detach() * mask).sum(dim=-1) / n_tokens,
        }
        return ObjectiveOutput(losses, metrics)


def _check_vocab(policy_tokenizer: Any, reference_path: str | os.PathLike[str]) -> None:
    if load_tokenizer(reference_path).get_vocab() != policy_tokenizer.get_vocab():
        raise ConfigError(
            f"pg.kl_coef > 0: the reference model {reference_path} has another vocabulary than the policy; the "
            "per-token KL needs the policy's tokenizer (set 'reference' to strong or to a model sharing it)"
        )


def train_pg(
    model_path: str | os.PathLike[str],
    rows_or_path: RowsInput,
    out_dir: str | os.PathLike[str],
    config: TrainConfig | None = None,
    *,
    reference_path: str | os.PathLike[str] | None = None,
    valid_fn: ValidFn | None = None,
    valid_rows_or_path: RowsInput | None = None,
    resume: bool = True,
    tracking: TrackingSpec | None = None,
) -> TrainResult:
    """Train the model in ``model_path`` by policy gradient on rows with advantages.

    Args:
        model_path: local folder of the initial policy (also the start policy of the clipped ratio).
        rows_or_path: ``{"messages", "advantage", ...}`` rows or ``.jsonl`` file(s) of them.
        out_dir: the run's folder (checkpoints, curves, ``model/`` export, ``result.json``).
        config: hyperparameters (default ``TrainConfig(method="pg")``); ``method`` must be pg.
        reference_path: the KL reference's folder (needed when ``pg.kl_coef > 0``; it must share the
            policy's vocabulary); None: the initial policy.
        valid_fn: ``valid_fn(model, tokenizer) -> score`` (higher is better) run each epoch.
        valid_rows_or_path: validation rows for the validation loss (used without ``valid_fn``); without
            either, ``config.valid_fraction`` of the tasks is held out.
        resume: continue from the newest checkpoint of this run in ``out_dir``.
        tracking: where the run's numbers are tracked; None: ``config.report_to`` in ``out_dir``.

    Raises:
        ConfigError: ``method`` is not pg, or the KL reference has another vocabulary.
        DataFormatError: a malformed row (``file:line``), or no rows.
        ModelLoadError: a model folder cannot be loaded.
        NonFiniteLossError: the loss became NaN or infinite (the last good checkpoint is kept).
        W2SError: ``out_dir`` holds another run's checkpoints.
    """
    cfg = config or TrainConfig(method="pg")
    if cfg.method != "pg":
        raise ConfigError(f"train_pg trains method pg, got method {cfg.method} (use train_sft or train_dpo)")
    rows, valid_rows = train_and_valid_rows(
        load_pg_rows,
        rows_or_path,
        valid_rows_or_path,
        hold_out=valid_fn is None,
        fraction=cfg.valid_fraction,
        seed=cfg.seed,
    )
    if not rows:
        raise DataFormatError(f"no policy-gradient rows left for training in {describe(rows_or_path)}")
    reference = reference_path if reference_path is not None else model_path
    uses_reference = cfg.pg.kl_coef > 0
    ref_id = model_identity(reference) if uses_reference else "none"
    out = Path(out_dir)
    fingerprint = run_fingerprint(
        cfg, model_path, data_fingerprint(rows), data_fingerprint(valid_rows), ref_id
    )
    if (done := reuse_finished(out, fingerprint, resume=resume)) is not None:
        return done
    tokenizer = load_tokenizer(model_path)
    if uses_reference:
        _check_vocab(tokenizer, reference)
    encoder = ChatEncoder(tokenizer, name=str(model_path))
    names = sorted({s for r in rows for s in r.sources})
    use = TokenIdsUse()
    examples, skipped = encode_pg_rows(rows, encoder, cfg, {n: i for i, n in enumerate(names)}, use)
    logger.info("%s", use.summary())
    valid_examples, _ = encode_pg_rows(valid_rows, encoder, cfg, {}) if valid_rows else ([], 0)
    objective = PGObjective(
        cfg.pg, start_path=model_path, reference_path=reference if uses_reference else None
    )
    objective.preload(_reference_device(cfg))  # before the timed steps, as DPO's reference pass
    trainer = Trainer(
        method=cfg.method,
        model_path=model_path,
        out_dir=out,
        config=cfg,
        objective=objective,
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
