"""Per-token log-probabilities of the tokens that carry loss, without materialising every logit.

The output head (and its softmax) runs only on the positions whose next token is scored, which saves much
memory and time when observations make up most of a conversation or the vocabulary is large (150k for Qwen2).
Models whose logits are post-processed (soft-capping, scaling) fall back to the model's own full forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["TokenScorer", "sequence_logps", "token_logps"]

# Above this many (tokens x vocabulary) logits the head runs in chunks that are recomputed in the backward
# pass, so that at most one chunk's logits are alive at a time.
_CHUNK_ELEMENTS = 1 << 27


def _base_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a PEFT wrapper (with its adapters injected), or ``model`` itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _supports_selected_head(hf: nn.Module) -> bool:
    config = getattr(hf, "config", None)
    if config is None or not hasattr(hf, "get_output_embeddings") or hf.get_output_embeddings() is None:
        return False
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier", "logits_scaling"):
        if getattr(text, attr, None) not in (None, 1.0):
            return False
    prefix = getattr(hf, "base_model_prefix", "")
    return bool(prefix) and isinstance(getattr(hf, prefix, None), nn.Module)


def _head_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return -F.cross_entropy(logits, targets, reduction="none")


def token_logps(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_mask: torch.Tensor
) -> torch.Tensor:
    """``log p(x_t | x_<t)`` at every position ``t`` where ``target_mask`` is set, 0 elsewhere.

    Args:
        model: a causal LM (Hugging Face, optionally wrapped by PEFT).
        input_ids: ``(B, T)`` token ids, right-padded.
        attention_mask: ``(B, T)``, 1 on real tokens.
        target_mask: ``(B, T)``, 1 on tokens whose log-probability is wanted (never position 0).

    Returns:
        ``(B, T)`` float32 tensor.
    """
    hf = _base_model(model)
    mask = target_mask[:, 1:].bool()  # position t+1 is predicted from the hidden state at t
    targets = input_ids[:, 1:][mask]
    if _supports_selected_head(hf):
        backbone = getattr(hf, hf.base_model_prefix)
        hidden = backbone(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        selected = hidden[:, :-1][mask]  # (N, H): only the positions that predict a scored token
        head = hf.get_output_embeddings()
        chunk = max(1, _CHUNK_ELEMENTS // head.weight.shape[0])
        recompute = torch.is_grad_enabled() and selected.shape[0] > chunk
        pieces = []
        for i in range(0, max(selected.shape[0], 1), chunk):  # one (empty) chunk keeps the graph connected
            args = (head, selected[i : i + chunk], targets[i : i + chunk])
            pieces.append(
                checkpoint(_head_logps, *args, use_reentrant=False) if recompute else _head_logps(*args)
            )
        logp = torch.cat(pieces)
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        logp = -F.cross_entropy(logits[:, :-1][mask].float(), targets, reduction="none")
    shifted = torch.zeros(mask.shape, dtype=torch.float32, device=input_ids.device).masked_scatter(mask, logp)
    return F.pad(shifted, (1, 0))  # (B, T): position 0 is never predicted


def sequence_logps(token_logprobs: torch.Tensor) -> torch.Tensor:
    """Sum over each sequence of :func:`token_logps`' output: ``log p(scored tokens | the rest before them)``."""
    return token_logprobs.sum(dim=-1)


class TokenScorer(nn.Module):
    """An ``nn.Module`` around a causal LM whose forward is :func:`token_logps`.

    Training calls the model through this wrapper so that a distributed wrapper (DDP through accelerate)
    around it sees every forward pass.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_mask: torch.Tensor
    ) -> torch.Tensor:
        """See :func:`token_logps`."""
        return token_logps(self.model, input_ids, attention_mask, target_mask)
