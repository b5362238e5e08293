"""Batched log-likelihoods and decoding for causal LMs: the numerics under :mod:`w2s_agents.agents.agent`.

Everything here works on token ids and tensors, one batched forward for many sequences:

* :func:`candidate_logprobs` scores continuations (the admissible commands of many states) after their prompts:
  the candidates of a prompt are packed behind one copy of it with a block attention mask, so one forward pass
  runs every prompt once and scores all its candidates; with a :class:`PrefixCache`, a prompt that extends a
  recent one (an agent's next step) runs only its new tokens on top of the stored keys and values;
* :func:`contrastive_token_scores` is the contrastive-decoding score of DESIGN section 6:
  ``(1 + lambda) * log p_A - lambda * log p_B`` on tokens that ``p_A`` finds plausible
  (``p_A >= alpha * max p_A``), minus infinity elsewhere;
* :func:`generate` decodes many prompts at once with a KV cache (left padding, explicit positions), calling
  back for the choice of every next token so that each sequence keeps its own sampler and random stream;
* :func:`pick_tokens` is that choice: greedy argmax (ties to the lowest index) or nucleus sampling by the
  inverse of the cumulative distribution at a given uniform draw, in float64, ties in index order.

Batching changes floating-point rounding, not the mathematics: a row's numbers equal those computed alone up to
rounding (~1e-6), which tests check.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .prefix_cache import PrefixCache

__all__ = [
    "CandidateLogprobs",
    "PrefixCache",
    "candidate_logprobs",
    "contrastive_token_scores",
    "generate",
    "pick_tokens",
]


@dataclass(frozen=True)
class CandidateLogprobs:
    """Per-token log-probabilities of one candidate continuation under one model."""

    token: torch.Tensor
    """``log p(y_t | prompt, y_<t)`` for each candidate token, float32, shape ``[len]``."""
    best: torch.Tensor
    """``max_v log p(v | prompt, y_<t)`` at each of those positions (for the plausibility mask), ``[len]``; NaN
    from a backend that does not compute it (vLLM, which does no contrastive decoding)."""


# ------------------------------------------------------------------------------------------- model calls


def _cache_kwarg(model: Any) -> str:
    """Name of the forward argument taking a KV cache: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _forward(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache: Any = None,
    *,
    last_only: bool = False,
) -> tuple[torch.Tensor, Any]:
    """One forward pass; returns (logits as float32, the updated cache)."""
    kwargs: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "use_cache": True,
    }
    if cache is not None:
        kwargs[_cache_kwarg(model)] = cache
    if last_only:
        kwargs["logits_to_keep"] = 1
    out = model(**kwargs)
    new_cache = out.get("cache")
    if new_cache is None:
        new_cache = out.get("past_key_values")
    return out.logits.float(), new_cache


def _left_pad(
    seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ids ``[B, L]``, attention mask, position ids (0 at each row's first real token), lengths."""
    if any(len(s) == 0 for s in seqs):
        raise ValueError("cannot run an empty prompt")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
        mask[i, width - len(s) :] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    lengths = mask.sum(1)
    return ids.to(device), mask.to(device), positions.to(device), lengths.to(device)


def _select_cache(cache: Any, index: torch.Tensor) -> Any:
    """A new KV cache holding the rows ``index`` of ``cache`` (rows may repeat), or None when the cache type
    cannot be split by rows (sliding-window, recurrent or quantised layers)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    if any(getattr(layer, "keys", None) is None for layer in layers):
        return None
    data = [(layer.keys.index_select(0, index), layer.values.index_select(0, index)) for layer in layers]
    return DynamicCache(ddp_cache_data=data)


def _padded_past(
    per_row: Sequence[list[tuple[torch.Tensor, torch.Tensor]] | None], width: int, device: torch.device
) -> Any:
    """A ``DynamicCache`` of the rows' stored prefixes (per layer ``[heads, n, head_dim]``, None for a row
    without one), each right-aligned in ``width`` columns with zeros before."""
    from transformers import DynamicCache

    sample = next(p for p in per_row if p is not None)
    data = []
    for li, (k0, v0) in enumerate(sample):
        heads, _, dim = k0.shape
        keys = torch.zeros((len(per_row), heads, width, dim), dtype=k0.dtype, device=device)
        values = torch.zeros((len(per_row), v0.shape[0], width, v0.shape[2]), dtype=v0.dtype, device=device)
        for r, layers in enumerate(per_row):
            if layers is not None:
                k, v = layers[li]
                keys[r, :, width - k.shape[1] :] = k
                values[r, :, width - v.shape[1] :] = v
        data.append((keys, values))
    return DynamicCache(ddp_cache_data=data)


# ------------------------------------------------------------------------------------------- scoring


def candidate_logprobs(
    model: Any,
    prompts: Sequence[Sequence[int]],
    candidates: Sequence[Sequence[Sequence[int]]],
    *,
    pad_id: int,
    batch_rows: int = 16,
    block_tokens: int = 256,
    share_prompt: bool = True,
    prefix: PrefixCache | None = None,
) -> list[list[CandidateLogprobs]]:
    """Per-token log-probabilities of every candidate continuation after its prompt.

    With ``share_prompt`` (the default), the candidates of a prompt are packed behind one copy of it in a single
    row: each candidate's tokens see the prompt and their own earlier tokens only (a block attention mask) and
    continue the prompt's positions, so one forward pass scores many candidates and runs the prompt once. A
    row holds at most ``block_tokens`` candidate tokens; a prompt with more candidates gets several rows.
    Without it (or for attention implementations that take no custom mask, such as flash attention), every
    candidate is a row ``prompt + candidate`` of its own.

    Args:
        model: a causal LM (``transformers`` ``PreTrainedModel``) in eval mode.
        prompts: token ids of each prompt (non-empty).
        candidates: for each prompt, the token ids of its candidates (each non-empty).
        pad_id: id used for padding (never attended to).
        batch_rows: most rows per forward pass.
        block_tokens: most candidate tokens packed behind one prompt copy (bounds the logits kept per row).
        share_prompt: pack candidates behind their prompt (see above).
        prefix: keys and values of earlier prompts of this model: each prompt runs only the tokens after the
            longest stored prefix it shares, and is stored in turn (packed scoring only).

    Returns:
        ``out[i][j]``: the log-probabilities of candidate ``j`` of prompt ``i``.
    """
    if len(prompts) != len(candidates):
        raise ValueError(f"{len(prompts)} prompts but {len(candidates)} candidate lists")
    if batch_rows < 1 or block_tokens < 1:
        raise ValueError(f"batch_rows and block_tokens must be >= 1, got {batch_rows} and {block_tokens}")
    for cands in candidates:
        if any(len(c) == 0 for c in cands):
            raise ValueError("cannot score an empty candidate")
    if not prompts:
        return []
    device = next(model.parameters()).device
    attn = getattr(model.config, "_attn_implementation", None) or "eager"
    with torch.inference_mode():
        if share_prompt and attn in ("sdpa", "eager"):
            return _packed_logprobs(
                model,
                prompts,
                candidates,
                pad_id,
                batch_rows,
                block_tokens,
                device,
                float_mask=attn == "eager",
                prefix=prefix,
            )
        return _whole_sequence_logprobs(model, prompts, candidates, pad_id, batch_rows, device)


def _packed_logprobs(
    model: Any,
    prompts: Sequence[Sequence[int]],
    candidates: Sequence[Sequence[Sequence[int]]],
    pad_id: int,
    batch_rows: int,
    block_tokens: int,
    device: torch.device,
    *,
    float_mask: bool,
    prefix: PrefixCache | None = None,
) -> list[list[CandidateLogprobs]]:
    # the stored prefix each prompt continues: (tokens reused, entry); its tensors are taken now, since
    # storing a chunk's prompts may drop entries that later chunks continue
    past: list[tuple[int, bytes | None]] = [
        prefix.lookup(p) if prefix is not None else (0, None) for p in prompts
    ]
    past_layers = [prefix.layers(key, n) if key is not None else None for n, key in past]  # type: ignore[union-attr]
    # rows: (prompt index, candidate indices packed behind it)
    rows: list[tuple[int, list[int]]] = []
    for e, cands in enumerate(candidates):
        group: list[int] = []
        size = 0
        for j, cand in enumerate(cands):
            n = len(cand) - 1  # the last token is predicted, never fed
            if group and size + n > block_tokens:
                rows.append((e, group))
                group, size = [], 0
            group.append(j)
            size += n
        if group:
            rows.append((e, group))

    def fed(e: int) -> int:
        return len(prompts[e]) - past[e][0]

    # rows of similar length share a forward pass: less padding
    rows.sort(key=lambda r: (fed(r[0]) + sum(len(candidates[r[0]][j]) for j in r[1]), past[r[0]][0]))
    out: dict[tuple[int, int], CandidateLogprobs] = {}
    stored: set[int] = set()
    for start in range(0, len(rows), batch_rows):
        chunk = rows[start : start + batch_rows]
        seqs: list[list[int]] = []
        blocks: list[list[int]] = []  # -1 prompt, j >= 0 candidate j's block
        poss: list[list[int]] = []
        for e, group in chunk:
            reused = past[e][0]
            prompt = list(prompts[e][reused:])
            seq, blk = list(prompt), [-1] * len(prompt)
            pos = list(range(reused, len(prompts[e])))
            for j in group:
                fed_ids = list(candidates[e][j][:-1])
                seq += fed_ids
                blk += [j] * len(fed_ids)
                pos += range(len(prompts[e]), len(prompts[e]) + len(fed_ids))
            seqs.append(seq)
            blocks.append(blk)
            poss.append(pos)
        width = max(len(s) for s in seqs)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        blk_t = torch.full((len(chunk), width), -2, dtype=torch.long)  # -2: padding
        pos_t = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (seq, blk, pos) in enumerate(zip(seqs, blocks, poss, strict=True)):
            off = width - len(seq)  # right-aligned, so the candidate region is the last columns of every row
            ids[r, off:] = torch.tensor(seq, dtype=torch.long)
            blk_t[r, off:] = torch.tensor(blk, dtype=torch.long)
            pos_t[r, off:] = torch.tensor(pos, dtype=torch.long)
        # a token sees earlier prompt tokens and earlier tokens of its own candidate; padding sees itself only
        q, k = blk_t[:, :, None], blk_t[:, None, :]
        causal = torch.ones((width, width), dtype=torch.bool).tril()
        allowed = causal[None] & ((k == -1) | ((k == q) & (k >= 0)))
        allowed |= torch.eye(width, dtype=torch.bool)[None] & (q == -2)
        # the stored prefixes, right-aligned in `held` columns before the fed tokens: every real token sees
        # its own row's prefix
        held = max(past[e][0] for e, _ in chunk)
        kv = None
        if held:
            starts = torch.tensor([held - past[e][0] for e, _ in chunk], dtype=torch.long)
            seen = torch.arange(held)[None, None, :] >= starts[:, None, None]
            allowed = torch.cat([seen & (q != -2), allowed], dim=2)
            kv = _padded_past([past_layers[e] for e, _ in chunk], held, device)
        elif prefix is not None:
            from transformers import DynamicCache

            kv = DynamicCache()
        mask = allowed[:, None]  # [rows, 1, width, held + width]
        if float_mask:
            dtype = next(model.parameters()).dtype
            mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
        keep = max(len(s) - fed(e) for s, (e, _) in zip(seqs, chunk, strict=True)) + 1
        kwargs: dict[str, Any] = {_cache_kwarg(model): kv, "use_cache": True} if kv is not None else {}
        result = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=pos_t.to(device),
            logits_to_keep=keep,
            **({"use_cache": False} | kwargs),
        )
        out_logits = result.logits  # [rows, keep, V]: the last `keep` columns
        layers = (result.get("cache") or result.get("past_key_values")) if prefix is not None else None
        if layers is not None:  # the keys and values of each prompt, for its next step
            for r, (e, _) in enumerate(chunk):
                if e in stored:
                    continue  # a prompt whose candidates fill several rows is stored once
                stored.add(e)
                reused, key = past[e]
                col = held + width - len(seqs[r])  # first fed column of the row in the cache
                prompt_layers = [
                    (
                        torch.cat(
                            [layer.keys[r, :, held - reused : held], layer.keys[r, :, col : col + fed(e)]], 1
                        ),
                        torch.cat(
                            [
                                layer.values[r, :, held - reused : held],
                                layer.values[r, :, col : col + fed(e)],
                            ],
                            1,
                        ),
                    )
                    for layer in layers.layers
                ]
                prefix.store(prompts[e], prompt_layers, key)
                prefix.reused_tokens += reused
                prefix.fed_tokens += fed(e)
        for r, (e, group) in enumerate(chunk):
            # one row at a time bounds the float copy of the logits to keep x vocabulary
            lsm = torch.log_softmax(out_logits[r].float(), dim=-1)
            best = lsm.max(dim=-1).values.cpu()
            first = keep - (len(seqs[r]) - fed(e)) - 1  # column of the prompt's last token
            cols: list[int] = []
            targets: list[int] = []
            col = first + 1
            for j in group:
                cand = candidates[e][j]
                # token 0 is predicted at the prompt's last token, token t at the candidate's token t - 1
                cols += [first, *range(col, col + len(cand) - 1)]
                targets += list(cand)
                col += len(cand) - 1
            idx = torch.tensor(cols, device=lsm.device)
            tok = lsm[idx, torch.tensor(targets, device=lsm.device)].cpu()
            best_sel = best[idx.cpu()]
            at = 0
            for j in group:
                n = len(candidates[e][j])
                out[e, j] = CandidateLogprobs(tok[at : at + n], best_sel[at : at + n])
                at += n
    return [[out[e, j] for j in range(len(cands))] for e, cands in enumerate(candidates)]


def _whole_sequence_logprobs(
    model: Any,
    prompts: Sequence[Sequence[int]],
    candidates: Sequence[Sequence[Sequence[int]]],
    pad_id: int,
    batch_rows: int,
    device: torch.device,
) -> list[list[CandidateLogprobs]]:
    rows = [(e, j) for e, cands in enumerate(candidates) for j in range(len(cands))]
    out: dict[tuple[int, int], CandidateLogprobs] = {}
    for start in range(0, len(rows), batch_rows):
        chunk = rows[start : start + batch_rows]
        seqs = [list(prompts[e]) + list(candidates[e][j]) for e, j in chunk]
        ids, mask, positions, _ = _left_pad(seqs, pad_id, device)
        logits, _ = _forward(model, ids, mask, positions)
        lsm = torch.log_softmax(logits, dim=-1)
        width = ids.shape[1]
        for r, (e, j) in enumerate(chunk):
            n = len(candidates[e][j])
            # candidate tokens sit in the last n columns; column c is predicted at column c - 1
            cols = torch.arange(width - n, width, device=device)
            rows_lp = lsm[r, cols - 1]
            tok = rows_lp.gather(-1, ids[r, cols][:, None]).squeeze(-1)
            out[e, j] = CandidateLogprobs(tok.cpu(), rows_lp.max(dim=-1).values.cpu())
    return [[out[e, j] for j in range(len(cands))] for e, cands in enumerate(candidates)]


def contrastive_token_scores(
    expert: torch.Tensor, expert_best: torch.Tensor, amateur: torch.Tensor, *, lam: float, alpha: float
) -> torch.Tensor:
    """Contrastive-decoding scores of tokens (DESIGN section 6; ConG, EpiCoDe).

    ``s = (1 + lam) * l_A - lam * l_B`` where ``l_A`` and ``l_B`` are the expert's and the amateur's
    log-probabilities of the token; a token the expert finds implausible, ``p_A < alpha * max p_A`` (that is
    ``l_A < log(alpha) + max l_A``), scores minus infinity.

    Args:
        expert: ``l_A`` of the tokens (any shape).
        expert_best: ``max_v l_A(v)`` at the same positions (same shape, or broadcastable).
        amateur: ``l_B`` of the tokens (same shape).
        lam: contrast strength lambda >= 0 (0 gives the expert's log-probabilities, masked).
        alpha: plausibility threshold in [0, 1] (0 keeps every token).
    """
    scores = (1.0 + lam) * expert - lam * amateur
    if alpha > 0:
        plausible = expert >= expert_best + math.log(alpha)
        scores = torch.where(plausible, scores, torch.full_like(scores, -math.inf))
    return scores


# ------------------------------------------------------------------------------------------- sampling


def pick_tokens(
    scores: torch.Tensor,
    temperatures: Sequence[float],
    top_ps: Sequence[float],
    uniforms: Sequence[float | None],
) -> torch.Tensor:
    """Choose one index per row of ``scores`` (logits or log-probabilities; minus infinity excludes an index).

    Row ``i`` with ``temperatures[i] == 0`` takes the argmax (ties: the lowest index). Otherwise the row's
    distribution is ``softmax(scores / T)`` cut to its nucleus (the most probable indices whose cumulative
    probability first reaches ``top_p``; ties in index order) and renormalised, and the index is the inverse
    of its cumulative distribution at ``uniforms[i]`` in [0, 1). Computed in float64 on the scores' device
    (CPU for MPS), so a row's choice depends only on its scores and its draw.

    Returns:
        A long tensor of shape ``[rows]`` on the CPU.

    Raises:
        ValueError: a row has no finite score, or a sampled row has no draw in [0, 1).
    """
    rows = scores.shape[0]
    if not (len(temperatures) == len(top_ps) == len(uniforms) == rows):
        raise ValueError("pick_tokens needs one temperature, top_p and draw per row")
    if scores.device.type == "mps":  # no float64 there
        scores = scores.cpu()
    scores = scores.detach()
    finite = torch.isfinite(scores).any(dim=-1)
    if not bool(finite.all()):
        raise ValueError(f"row {int((~finite).nonzero()[0])} has no finite score to choose from")
    out = torch.argmax(scores, dim=-1).cpu()  # greedy rows; replaced below for sampled ones
    sampled = [i for i, t in enumerate(temperatures) if float(t) != 0.0]
    if not sampled:
        return out
    for i in sampled:
        u = uniforms[i]
        if u is None or not 0.0 <= u < 1.0:
            raise ValueError(
                f"row {i} samples (temperature {temperatures[i]}) but has no uniform draw in [0, 1): {u!r}"
            )
    dev = scores.device
    f64 = torch.float64
    sel = torch.tensor(sampled, dtype=torch.long, device=dev)
    temp = torch.tensor([float(temperatures[i]) for i in sampled], dtype=f64, device=dev)
    top_p = torch.tensor([float(top_ps[i]) for i in sampled], dtype=f64, device=dev)
    u = torch.tensor([float(uniforms[i]) for i in sampled], dtype=f64, device=dev)  # type: ignore[arg-type]
    probs = torch.softmax(scores.index_select(0, sel).to(f64) / temp[:, None], dim=-1)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    keep = (sorted_p.cumsum(dim=-1) - sorted_p) < top_p[:, None]
    keep[:, 0] = True
    cdf = (sorted_p * keep).cumsum(dim=-1)
    k = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)
    k = torch.minimum(k, keep.sum(dim=-1, keepdim=True) - 1)  # u * total rounding up to the total
    out[sel.cpu()] = order.gather(1, k).squeeze(1).cpu()
    return out


# ------------------------------------------------------------------------------------------- generation


ChooseNext = Callable[[list[int], torch.Tensor, torch.Tensor | None], torch.Tensor]
"""``choose(rows, logp_expert [n, V], logp_amateur [n, V] or None) -> next ids [n]`` for the listed rows."""

StopCheck = Callable[[int, list[int]], bool]
"""``stop(row, generated ids so far) -> bool``: end that row's output early (after a complete action line)."""


def generate(
    model: Any,
    prompts: Sequence[Sequence[int]],
    choose: ChooseNext,
    *,
    pad_id: int,
    stop_ids: Sequence[int],
    max_new_tokens: int,
    amateur: Any = None,
    stop: StopCheck | None = None,
) -> list[list[int]]:
    """Decode every prompt at once with a KV cache until a stop token, ``stop`` or ``max_new_tokens``.

    Finished rows leave the batch (their cache rows are dropped) where the cache type allows it.

    Args:
        model: the causal LM.
        prompts: token ids of each prompt.
        choose: picks the next token of the still-running rows from their next-token log-probabilities
            (and the amateur's, for contrastive decoding).
        pad_id: padding id.
        stop_ids: tokens that end an output (kept in the returned ids).
        max_new_tokens: longest output.
        amateur: a second causal LM with the same vocabulary, run in lockstep (contrastive decoding).
        stop: optional early stop per row.

    Returns:
        The generated ids of every prompt (stop token included when one was produced).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    n = len(prompts)
    if n == 0:
        return []
    device = next(model.parameters()).device
    stops = set(stop_ids)
    outputs: list[list[int]] = [[] for _ in range(n)]
    with torch.inference_mode():
        ids, mask, positions, lengths = _left_pad(prompts, pad_id, device)
        logits, cache = _forward(model, ids, mask, positions, last_only=True)
        logp = torch.log_softmax(logits[:, -1, :], dim=-1)
        logp_b = cache_b = None
        if amateur is not None:
            logits_b, cache_b = _forward(amateur, ids, mask, positions, last_only=True)
            logp_b = torch.log_softmax(logits_b[:, -1, :], dim=-1)
        batch_rows = list(range(n))  # original row of each batch position
        active = [True] * n
        next_pos = lengths.clone()
        for step in range(max_new_tokens):
            positions_now = [b for b in range(len(batch_rows)) if active[b]]
            sel = torch.tensor(positions_now, dtype=torch.long, device=device)
            chosen = choose(
                [batch_rows[b] for b in positions_now],
                logp.index_select(0, sel),
                logp_b.index_select(0, sel) if logp_b is not None else None,
            )
            next_ids = torch.full((len(batch_rows),), pad_id, dtype=torch.long, device=device)
            next_ids[sel] = chosen.to(device)
            for k, b in enumerate(positions_now):
                row = batch_rows[b]
                tok = int(chosen[k])
                outputs[row].append(tok)
                if tok in stops or (stop is not None and stop(row, outputs[row])):
                    active[b] = False
            if not any(active) or step == max_new_tokens - 1:
                break
            if not all(active):
                keep = torch.tensor([b for b, a in enumerate(active) if a], dtype=torch.long, device=device)
                smaller = _select_cache(cache, keep)
                smaller_b = _select_cache(cache_b, keep) if cache_b is not None else None
                if smaller is not None and (cache_b is None or smaller_b is not None):
                    # finished rows leave the batch; a cache that cannot be split keeps them, fed padding
                    cache, cache_b = smaller, smaller_b
                    batch_rows = [batch_rows[int(b)] for b in keep]
                    active = [True] * len(batch_rows)
                    mask, next_pos, next_ids = mask[keep], next_pos[keep], next_ids[keep]
            mask = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=mask.dtype, device=device)], dim=1)
            logits, cache = _forward(model, next_ids[:, None], mask, next_pos[:, None], cache)
            logp = torch.log_softmax(logits[:, -1, :], dim=-1)
            if amateur is not None:
                logits_b, cache_b = _forward(amateur, next_ids[:, None], mask, next_pos[:, None], cache_b)
                logp_b = torch.log_softmax(logits_b[:, -1, :], dim=-1)
            next_pos = next_pos + 1
    return outputs
