"""Tokenizer fingerprints: which tokenizer recorded token ids belong to.

An agent with ``agent.record_tokens`` stores the token ids of its answers in the trajectory
(:class:`~w2s_agents.types.Step` ``token_ids``) together with the fingerprint of its tokenizer; a trainer uses
those ids instead of re-tokenising the rendered text only when its own tokenizer has the same fingerprint.

The fingerprint hashes what decides both the meaning of an id and how a conversation is rendered: the
vocabulary (every token and its id, added tokens included), the special tokens and the chat template. Two
tokenizers with the same fingerprint map every id to the same token and render a conversation the same way.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

__all__ = ["recorded_token_ids", "tokenizer_fingerprint"]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A 16-hex-digit hash of a Hugging Face tokenizer's vocabulary, special tokens and chat template.

    It reads the whole vocabulary (a fraction of a second for 150k tokens): callers compute it once and keep it.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    special = sorted(
        {
            str(t): int(i)
            for t, i in zip(tokenizer.all_special_tokens, tokenizer.all_special_ids, strict=False)
        }.items()
    )
    template = getattr(tokenizer, "chat_template", None)
    text = json.dumps(
        {
            "vocab": vocab,
            "special": special,
            "chat_template": template if isinstance(template, str) else None,
        },
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def recorded_token_ids(value: Any) -> tuple[list[int], str] | None:
    """``(ids, fingerprint)`` of a record of recorded token ids, ``{"ids": [token ids], "tokenizer":
    fingerprint}`` with a non-empty list of non-negative integers and a non-empty string; None when ``value`` is
    not such a record (callers say where in their error message)."""
    ids = value.get("ids") if isinstance(value, Mapping) else None
    fp = value.get("tokenizer") if isinstance(value, Mapping) else None
    if (
        not isinstance(ids, list)
        or not ids
        or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)
        or not isinstance(fp, str)
        or not fp
    ):
        return None
    return ids, fp
