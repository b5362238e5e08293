"""Reference log-probabilities of preference pairs, computed with the reference model's own tokenizer.

Each pair is first cut (oldest history units, then trailing continuation units) so that it fits
``max_length`` under both the policy's and the reference's tokenizer; both models then score the same
messages. The reference model renders and tokenizes the pair with its own chat template, sums the
log-probabilities of the completion's agent tokens (observations inside a continuation excluded), and the
results are stored on the pair rows as ``ref_chosen_logp`` and ``ref_rejected_logp`` with the cut
(``truncation``) in a cached dataset file (``reference.jsonl`` beside ``reference.json``, which records the
fingerprint of the data, the reference model and the policy tokenizer). A later run with the same
fingerprint reads the file instead of loading the reference model. Weak and strong models may therefore have
different tokenizers. Agent turns with recorded token ids of the reference's tokenizer are scored on those ids,
as the policy trains on the ids of its own (:mod:`.token_ids`), and the cut fits both tokenized so.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from w2s_agents.atomic import atomic_write
from w2s_agents.errors import DataFormatError, W2SError
from w2s_agents.log import progress
from w2s_agents.tokens import tokenizer_fingerprint

from .batch import Example, collate
from .config import TrainConfig
from .data import Row, data_fingerprint, load_pairs
from .fingerprint import model_identity
from .logps import token_logps
from .masks import ChatEncoder, EncodedConversation, PairPlan, fit_pair, pair_messages, pair_recorded
from .token_ids import PairRecorded, TokenIdsUse, recorded_for_pair

__all__ = ["RefPair", "reference_logps", "score_pairs"]

logger = logging.getLogger(__name__)

_MASK_VERSION = "prefix-render/1"  # bump when the mask or truncation rules change: cached files are redone
_TOKEN_IDS_VERSION = "token-ids/1"  # the same for the rules of recorded token ids (.token_ids)


@dataclass(frozen=True)
class RefPair:
    """A pair with its cut and its reference log-probabilities."""

    row: Row
    plan: PairPlan | None  # None: the pair is used whole
    ref_chosen: float
    ref_rejected: float


def _tokenizer_identity(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    text += str(tokenizer.chat_template)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def score_pairs(
    model: torch.nn.Module,
    encoded: Sequence[tuple[EncodedConversation, EncodedConversation]],
    *,
    batch_size: int,
    device: torch.device,
    pad_id: int,
    autocast_dtype: torch.dtype | None = None,
    desc: str = "reference log-probs",
) -> list[tuple[float, float]]:
    """Summed agent-token log-probabilities of (chosen, rejected) conversations under ``model``."""
    out: list[tuple[float, float]] = []
    model.eval()
    amp = (
        torch.autocast(device_type=device.type, dtype=autocast_dtype)
        if autocast_dtype
        else contextlib.nullcontext()
    )
    with torch.no_grad(), amp:
        for i in progress(range(0, len(encoded), batch_size), desc=desc, unit="batch"):
            chunk = [Example(seqs, 1.0) for seqs in encoded[i : i + batch_size]]
            batch = collate(chunk, pad_id, device)
            sums = token_logps(model, batch.input_ids, batch.attention_mask, batch.target_mask).sum(-1)
            chosen, rejected = sums.double().cpu().chunk(2)
            out.extend(zip(chosen.tolist(), rejected.tolist(), strict=True))
    return out


def _rows_with_ref(rows: Sequence[Row]) -> list[RefPair]:
    pairs = []
    for r in rows:
        if "ref_chosen_logp" not in r.data or "ref_rejected_logp" not in r.data:
            raise DataFormatError(
                f"{r.origin}: the pair has no reference log-probs (ref_chosen_logp, ref_rejected_logp); "
                "give a reference model"
            )
        plan = (
            PairPlan.from_dict(r.data["truncation"]) if isinstance(r.data.get("truncation"), dict) else None
        )
        pairs.append(RefPair(r, plan, float(r.data["ref_chosen_logp"]), float(r.data["ref_rejected_logp"])))
    return pairs


def reference_logps(
    rows: Sequence[Row],
    *,
    reference_path: str | Path | None,
    policy_tokenizer: Any,
    config: TrainConfig,
    cache_file: Path | None,
    device: torch.device | None = None,
    write: bool = True,
) -> tuple[list[RefPair], int]:
    """Cut every pair to fit and attach its reference log-probabilities.

    Args:
        rows: preference pairs.
        reference_path: local folder of the reference model; None uses the rows' own ``ref_chosen_logp`` /
            ``ref_rejected_logp`` (and ``truncation`` when present).
        policy_tokenizer: the tokenizer of the model being trained (the cut must fit it too).
        config: ``max_length``, ``batch_size``, ``device`` and ``dtype``.
        cache_file: the cached dataset (``.jsonl``); reused when its fingerprint matches.
        device: where the reference runs (default: from ``config``).
        write: write the cache (only one process of a distributed run does).

    Returns:
        ``(pairs, skipped)``: pairs that fit, in their input order, and how many did not.
    """
    if reference_path is None:
        return _rows_with_ref(rows), 0
    from w2s_agents.agents.models import load_model, resolve_device

    identity: list[Any] = [
        data_fingerprint(rows),
        model_identity(reference_path),
        _tokenizer_identity(policy_tokenizer),
        config.max_length,
        _MASK_VERSION,
    ]
    with_ids = any(r.data.get("agent_tokens") for r in rows)
    if with_ids:
        identity.append(_TOKEN_IDS_VERSION)  # only then: caches of pairs without recorded ids stay valid
    fingerprint = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
    meta_file = cache_file.with_suffix(".json") if cache_file is not None else None
    if cache_file is not None and meta_file is not None and cache_file.is_file() and meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except ValueError:
            meta = {}
        if meta.get("fingerprint") == fingerprint:
            cached = load_pairs(cache_file) if meta.get("rows", 0) else []
            logger.info("reference log-probs read from %s (%d pairs)", cache_file, len(cached))
            return _rows_with_ref(cached), int(meta.get("skipped", 0))
    dev = device or resolve_device(config.device)
    bf16 = config.dtype == "bfloat16" or (
        config.dtype == "auto" and dev.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    ref = load_model(reference_path, device=str(dev), dtype="bfloat16" if bf16 else "float32")
    policy_enc = ChatEncoder(policy_tokenizer, name="the policy tokenizer")
    ref_enc = ChatEncoder(ref.tokenizer, name=str(reference_path))
    kept: list[tuple[Row, PairPlan]] = []
    encoded: list[tuple[EncodedConversation, EncodedConversation]] = []
    skipped = 0
    use = TokenIdsUse()  # the reference's
    # recorded ids usable by each tokenizer: the cut must fit the sequences as each scores them
    prints = (
        [tokenizer_fingerprint(policy_tokenizer), tokenizer_fingerprint(ref.tokenizer)] if with_ids else []
    )
    for row in rows:
        recorded: list[PairRecorded | None] = [None, None]
        if row.data.get("agent_tokens"):
            recorded = [recorded_for_pair(row.data, prints[0]), recorded_for_pair(row.data, prints[1], use)]
        plan = fit_pair(
            [policy_enc, ref_enc], row.data, config.max_length, origin=row.origin, recorded=recorded
        )
        if plan is None:
            skipped += 1
            continue
        chosen, rejected, score_from = pair_messages(row.data, plan)
        rec_c, rec_r = pair_recorded(row.data, plan, recorded[1]) if recorded[1] else (None, None)
        enc_c = ref_enc.encode(chosen, score_from=score_from, origin=row.origin, recorded=rec_c)
        enc_r = ref_enc.encode(rejected, score_from=score_from, origin=row.origin, recorded=rec_r)
        use.count_row((enc_c, enc_r), shared=score_from)
        kept.append((row, plan))
        encoded.append((enc_c, enc_r))
    if use.any_recorded:
        logger.info("reference %s", use.summary())
    if skipped:
        logger.warning(
            "%d of %d pairs do not fit max_length %d even cut; skipped", skipped, len(rows), config.max_length
        )
    pad_id = ref.tokenizer.pad_token_id if ref.tokenizer.pad_token_id is not None else 0
    scores = score_pairs(
        ref.model,
        encoded,
        batch_size=config.batch_size,
        device=dev,
        pad_id=pad_id,
        autocast_dtype=None,  # the reference is loaded in its compute dtype
    )
    del ref
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    pairs = []
    for (row, plan), (c, r) in zip(kept, scores, strict=True):
        if not (abs(c) < float("inf") and abs(r) < float("inf")):
            raise W2SError(f"{row.origin}: the reference model gave a non-finite log-probability ({c}, {r})")
        pairs.append(RefPair(row, plan, c, r))
    if cache_file is not None and meta_file is not None and write:
        with atomic_write(cache_file) as fh:
            for p in pairs:
                data = {
                    **p.row.data,
                    "ref_chosen_logp": p.ref_chosen,
                    "ref_rejected_logp": p.ref_rejected,
                    "truncation": p.plan.to_dict() if p.plan else None,
                    "ref_model": str(Path(reference_path).expanduser().resolve()),
                }
                fh.write(json.dumps(data, ensure_ascii=False, allow_nan=False) + "\n")
        with atomic_write(meta_file) as fh:
            fh.write(
                json.dumps(
                    {
                        "fingerprint": fingerprint,
                        "reference": str(reference_path),
                        "rows": len(pairs),
                        "skipped": skipped,
                    },
                    indent=1,
                )
                + "\n"
            )
        logger.info("reference log-probs of %d pairs cached in %s", len(pairs), cache_file)
    return pairs, skipped
