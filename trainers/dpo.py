"""TreeDPO: sigmoid DPO on preference pairs taken where the branches of a searched tree diverge.

From pairs to gradient, top to bottom (:func:`train_dpo` runs the steps in this order):

1. **Load pairs** (:func:`.data.load_pairs`): ``{"prompt", "chosen", "rejected", ...}`` rows, checked with
   ``file:line``; without validation pairs or ``valid_fn`` a share of the tasks is held out.
2. **Reference log-probs** (:func:`.reference.reference_logps`): each pair is cut to fit ``max_length``
   under both the policy's and the reference's tokenizer, then the reference (the weak SFT agent by default,
   as in the paper; :func:`resolve_reference`) renders it with its own chat template and scores it once:
   ``log pi_ref(y|x)`` summed over the completion's agent tokens. The results are cached in the run's
   ``reference.jsonl``, so weak and strong models need not share a tokenizer.
3. **Encode** (:func:`encode_pairs`): the same cut messages tokenized with the policy's tokenizer; one
   :class:`~.batch.Example` per pair (chosen and rejected conversation, one loss unit, the two reference
   log-probs). Step-level pairs compare one agent turn; continuation-level pairs compare agent turns
   interleaved with observations, and only the agent turns carry loss. Agent turns with recorded token ids
   of the scoring model's tokenizer (pairs of trees built with ``agent.record_tokens``) are tokenized from
   those ids, by the policy here and by the reference in step 2 (:mod:`.token_ids`).
4. **Objective** (:class:`DPOObjective`): with ``log pi(y|x)`` summed over the agent tokens of a completion,

       r+ = beta * (log pi(y+|x) - log pi_ref(y+|x))        r- = beta * (log pi(y-|x) - log pi_ref(y-|x))
       L  = -log sigmoid(r+ - r-)  [ + w * (-log pi(y+|x) / |y+|)  with sft_weight w > 0 (RPO) ]

   averaged over the pairs of an optimizer step. Metrics per step (TRL's names, means over the step's
   pairs): ``rewards/chosen`` (r+), ``rewards/rejected`` (r-), ``rewards/margins`` (r+ - r-),
   ``rewards/accuracies`` (share with r+ > r-), ``logps/chosen`` and ``logps/rejected`` (log pi(y|x)).
5. **Train** (:class:`.loop.Trainer`): micro-batches collated chosen-first, the loss accumulated, clipped,
   AdamW; the metrics go to the metrics curve (``curves.json``, ``result.json``) and the log.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from w2s_agents.errors import ConfigError
from w2s_agents.tokens import tokenizer_fingerprint

from .batch import Batch, Example, ObjectiveOutput
from .config import TrainConfig
from .data import RowsInput, data_fingerprint, load_pairs, train_and_valid_rows
from .fingerprint import model_identity, reuse_finished, run_fingerprint
from .loop import Trainer, ValidFn
from .losses import dpo_loss, dpo_margins
from .masks import ChatEncoder, EncodedConversation, pair_messages, pair_recorded
from .model import load_tokenizer
from .reference import RefPair, reference_logps
from .result import TrainResult
from .token_ids import TokenIdsUse, recorded_for_pair, with_token_ids_use
from .tracking import TrackingSpec

__all__ = [
    "REFERENCE_FILE",
    "DPOObjective",
    "encode_pairs",
    "prompt_tokens",
    "resolve_reference",
    "train_dpo",
]

logger = logging.getLogger(__name__)

REFERENCE_FILE = "reference.jsonl"
"""The cached pairs with their reference log-probs, in the run's folder (``reference-valid.jsonl`` for the
validation pairs)."""


def resolve_reference(
    reference: str, *, weak: str | os.PathLike[str] | None, strong: str | os.PathLike[str] | None
) -> str:
    """The model folder that ``TrainConfig.reference`` names: ``weak``, ``strong`` or a path.

    Raises:
        ConfigError: ``weak`` or ``strong`` is asked for but that model is not given.
    """
    if reference == "weak":
        if weak is None:
            raise ConfigError("'reference' is weak but no weak model folder is given")
        return str(weak)
    if reference == "strong":
        if strong is None:
            raise ConfigError("'reference' is strong but no strong model folder is given")
        return str(strong)
    return reference


def encode_pairs(
    pairs: Sequence[RefPair],
    encoder: ChatEncoder,
    config: TrainConfig,
    source_index: dict[str, int],
    use: TokenIdsUse | None = None,
) -> tuple[list[Example], int]:
    """Tokenize each pair's chosen and rejected conversation with the policy's tokenizer (cut as planned).

    Agent turns with recorded token ids of the encoder's tokenizer are tokenized from those ids where they
    spell the turn's text (:mod:`.token_ids`); ``use`` counts which pairs and turns did (a prompt's turns once).
    Both sides take the prompt's ids from one list and the rules decide a prompt turn on the prompt's text
    alone, so chosen and rejected keep the same prompt tokens, as the DPO loss assumes (a pair whose sides
    tokenize their prompt differently, possible only where the template's text merges across the end of the
    prompt, is counted in a warning).

    Returns ``(examples, skipped)``; a pair is skipped when it is longer than ``max_length`` (possible only
    for pairs whose reference log-probs came with the rows, uncut) or when a side has no agent token.
    """
    out: list[Example] = []
    skipped = split_prompts = 0
    fingerprint: str | None = None
    for p in pairs:
        chosen, rejected, score_from = pair_messages(p.row.data, p.plan)
        rec_c = rec_r = None
        if p.row.data.get("agent_tokens"):
            fingerprint = fingerprint or tokenizer_fingerprint(encoder.tokenizer)
            recorded = recorded_for_pair(p.row.data, fingerprint, use)
            if recorded is not None:
                rec_c, rec_r = pair_recorded(p.row.data, p.plan, recorded)
        enc_c = encoder.encode(chosen, score_from=score_from, origin=p.row.origin, recorded=rec_c)
        enc_r = encoder.encode(rejected, score_from=score_from, origin=p.row.origin, recorded=rec_r)
        too_long = max(len(enc_c), len(enc_r)) > config.max_length
        if too_long or not enc_c.n_loss_tokens or not enc_r.n_loss_tokens:
            skipped += 1
            continue
        split_prompts += prompt_tokens(enc_c) != prompt_tokens(enc_r)
        if use is not None:
            use.count_row((enc_c, enc_r), shared=score_from)
        sources = tuple(source_index[s] for s in p.row.sources if s in source_index)
        out.append(Example((enc_c, enc_r), 1.0, sources, p.row.easy, (p.ref_chosen, p.ref_rejected)))
    if skipped:
        logger.warning("%d pairs longer than max_length %d (uncut rows); skipped", skipped, config.max_length)
    if split_prompts:
        logger.warning(
            "%d pairs tokenize their prompt differently on the chosen and the rejected side (the chat template's "
            "text merges into tokens across the end of the prompt)",
            split_prompts,
        )
    return out, skipped


def prompt_tokens(encoded: EncodedConversation) -> list[int]:
    """The tokens of a pair's side before its first scored token: the prompt and the generation prompt."""
    first = encoded.loss_mask.index(1) if encoded.n_loss_tokens else len(encoded)
    return encoded.input_ids[:first]


@dataclass(frozen=True)
class DPOObjective:
    """The sigmoid DPO loss of each pair, plus ``sft_weight`` times the chosen side's mean agent-token NLL
    (RPO), and the pairs' rewards and log-probs as metrics (an :class:`~.batch.Objective`; the equations are
    in the module docstring). A batch holds the chosen sequences first, then the rejected."""

    beta: float  # temperature of the sigmoid loss
    sft_weight: float = 0.0  # weight of the RPO term; 0 is plain DPO

    def __call__(self, scorer: nn.Module, batch: Batch) -> ObjectiveOutput:
        """Per-pair losses ``(B,)`` and per-pair metrics of a pair batch.

        Raises:
            ValueError: the batch has no reference log-probs.
        """
        if batch.ref_chosen is None or batch.ref_rejected is None:
            raise ValueError("a DPO batch needs the reference log-probs of its pairs")
        token = scorer(batch.input_ids, batch.attention_mask, batch.target_mask)  # (2B, T)
        chosen, rejected = token.sum(dim=-1).chunk(2)  # (B,) each: log pi(y+|x), log pi(y-|x)
        losses = dpo_loss(chosen, rejected, batch.ref_chosen, batch.ref_rejected, self.beta)
        if self.sft_weight:
            n_chosen = batch.target_mask.chunk(2)[0].sum(dim=-1).clamp(min=1)
            losses = losses - self.sft_weight * chosen / n_chosen
        chosen, rejected = chosen.detach(), rejected.detach()
        ref_chosen, ref_rejected = batch.ref_chosen, batch.ref_rejected
        reward_chosen = self.beta * (chosen - ref_chosen)  # r+
        reward_rejected = self.beta * (rejected - ref_rejected)  # r-
        metrics = {  # TRL's names
            "rewards/chosen": reward_chosen,
            "rewards/rejected": reward_rejected,
            "rewards/margins": self.beta * dpo_margins(chosen, rejected, ref_chosen, ref_rejected),
            "rewards/accuracies": (reward_chosen > reward_rejected).float(),
            "logps/chosen": chosen,
            "logps/rejected": rejected,
        }
        return ObjectiveOutput(losses, metrics)


def _reference_device(config: TrainConfig) -> torch.device:
    from w2s_agents.agents.models import resolve_device

    dev = resolve_device(config.device)
    local = os.environ.get("LOCAL_RANK")
    if dev.type == "cuda" and local is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return torch.device("cuda", int(local))
    return dev


def train_dpo(
    model_path: str | os.PathLike[str],
    pairs_or_path: RowsInput,
    out_dir: str | os.PathLike[str],
    config: TrainConfig | None = None,
    *,
    reference_path: str | os.PathLike[str] | None,
    valid_fn: ValidFn | None = None,
    valid_pairs_or_path: RowsInput | None = None,
    resume: bool = True,
    tracking: TrackingSpec | None = None,
) -> TrainResult:
    """Train the model in ``model_path`` with TreeDPO on preference pairs.

    Args:
        model_path: local folder of the initial policy (usually the strong SFT agent).
        pairs_or_path: ``{"prompt", "chosen", "rejected", ...}`` rows or ``.jsonl`` file(s) of them.
        out_dir: the run's folder (``reference.jsonl`` cache, checkpoints, curves, ``model/``).
        config: hyperparameters (default ``TrainConfig(method="dpo")``); ``method`` must be dpo.
        reference_path: local folder of the reference model (resolve ``config.reference`` with
            :func:`resolve_reference`); None uses ``ref_chosen_logp`` / ``ref_rejected_logp`` already on the
            rows.
        valid_fn: ``valid_fn(model, tokenizer) -> score`` (higher is better) run each epoch.
        valid_pairs_or_path: validation pairs for the validation DPO loss (used without ``valid_fn``);
            without either, ``config.valid_fraction`` of the tasks is held out.
        tracking: where the run's numbers are tracked (``w2s run``: under the run's name); None: the trackers
            of ``config.report_to`` in ``out_dir`` (``tb/``, ``wandb/``).
        resume: continue from the newest checkpoint of this run in ``out_dir``.

    Raises:
        DataFormatError: a malformed pair (``file:line``).
        ModelLoadError: a model folder cannot be loaded.
        NonFiniteLossError: the loss became NaN or infinite (the last good checkpoint is kept).
        W2SError: ``out_dir`` holds another run's checkpoints.
    """
    cfg = config or TrainConfig(method="dpo")
    if not cfg.is_dpo:
        raise ConfigError(f"train_dpo trains method dpo, got method {cfg.method} (use train_sft)")
    rows, valid_rows = train_and_valid_rows(
        load_pairs,
        pairs_or_path,
        valid_pairs_or_path,
        hold_out=valid_fn is None,
        fraction=cfg.valid_fraction,
        seed=cfg.seed,
    )
    out = Path(out_dir)
    ref_id = model_identity(reference_path) if reference_path is not None else "rows"
    fingerprint = run_fingerprint(
        cfg, model_path, data_fingerprint(rows), data_fingerprint(valid_rows), ref_id
    )
    if (done := reuse_finished(out, fingerprint, resume=resume)) is not None:
        return done
    tokenizer = load_tokenizer(model_path)
    main = int(os.environ.get("RANK", "0")) == 0
    device = _reference_device(cfg)
    pairs, skipped = reference_logps(
        rows,
        reference_path=reference_path,
        policy_tokenizer=tokenizer,
        config=cfg,
        cache_file=out / REFERENCE_FILE,
        device=device,
        write=main,
    )
    valid_pairs: list[RefPair] = []
    if valid_rows:
        valid_pairs, _ = reference_logps(
            valid_rows,
            reference_path=reference_path,
            policy_tokenizer=tokenizer,
            config=cfg,
            cache_file=out / "reference-valid.jsonl",
            device=device,
            write=main,
        )
    encoder = ChatEncoder(tokenizer, name=str(model_path))
    names = sorted({s for p in pairs for s in p.row.sources})
    use = TokenIdsUse()
    examples, more_skipped = encode_pairs(pairs, encoder, cfg, {n: i for i, n in enumerate(names)}, use)
    logger.info("%s", use.summary())
    valid_examples, _ = encode_pairs(valid_pairs, encoder, cfg, {})
    trainer = Trainer(
        method=cfg.method,
        model_path=model_path,
        out_dir=out,
        config=cfg,
        objective=DPOObjective(cfg.beta, cfg.sft_weight),
        examples=examples,
        valid_examples=valid_examples,
        valid_fn=valid_fn,
        fingerprint=fingerprint,
        source_names=names,
        resume=resume,
        skipped_rows=skipped + more_skipped,
        tracking=tracking,
    )
    return with_token_ids_use(trainer.run(), use, save=trainer.procs.is_main)
