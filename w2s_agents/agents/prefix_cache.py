"""The prefix KV cache of choose mode: keys and values of recent prompts, reused by prompts that extend them."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["PrefixCache"]


class PrefixCache:
    """Keys and values of recent prompts of one model, reused by prompts that extend them.

    An agent's prompt at step ``t + 1`` is mostly its prompt at step ``t`` followed by one action and one
    observation; with this cache :func:`candidate_logprobs` runs only the new tokens. Entries are found by
    content: a prompt reuses the stored prompt it shares the longest token prefix with (at least ``min_reuse``
    tokens, and never its own last token, whose logits are needed). The keys and values of a prefix are the
    ones a full forward pass computes (a causal model's prefix does not see what follows it), so scores equal
    the uncached ones up to floating-point rounding.

    At most ``capacity`` prompts are kept, the least recently used dropped first; a stored prompt that a longer
    prompt extended is replaced by it. The cache belongs to the weights it was filled with: it empties itself
    when the model's parameters are changed in place (their version counters move, as an optimizer step does).
    Models whose cache layers are not plain full-attention layers (sliding windows, recurrent state) are not
    cached: :meth:`supported` tells.

    Args:
        model: the causal LM whose keys and values are kept.
        capacity: most prompts kept (at least the number of episodes scored together, for every one to reuse).
        min_reuse: shortest shared prefix worth reusing.
    """

    def __init__(self, model: Any, capacity: int = 32, *, min_reuse: int = 16) -> None:
        if capacity < 1 or min_reuse < 1:
            raise ValueError(f"capacity and min_reuse must be >= 1, got {capacity} and {min_reuse}")
        self.model = model
        self.capacity = capacity
        self.min_reuse = min_reuse
        self._params = list(model.parameters())  # walking the module tree at every lookup costs more
        self._entries: OrderedDict[bytes, tuple[np.ndarray, list[tuple[torch.Tensor, torch.Tensor]]]] = (
            OrderedDict()
        )
        self._version = self._weights_version()
        self.reused_tokens = 0
        """Prompt tokens taken from the cache instead of being run (a running count)."""
        self.fed_tokens = 0
        """Prompt tokens run through the model while this cache was in use (a running count)."""

    def __len__(self) -> int:
        return len(self._entries)

    def _weights_version(self) -> int:
        return sum(p._version for p in self._params)

    def clear(self) -> None:
        """Drop every stored prompt."""
        self._entries.clear()

    def _check_weights(self) -> None:
        version = self._weights_version()
        if version != self._version:
            self._entries.clear()
            self._version = version

    def lookup(self, ids: Sequence[int]) -> tuple[int, bytes | None]:
        """``(n, key)``: the stored prompt ``key`` whose first ``n`` tokens equal those of ``ids``, for the
        largest such ``n`` below ``len(ids)``; ``(0, None)`` when none shares ``min_reuse`` tokens."""
        self._check_weights()
        a = np.asarray(ids, dtype=np.int64)
        best_key, best_n = None, 0
        for key, (stored, _) in self._entries.items():
            m = min(len(a), len(stored))
            if m <= best_n:
                continue
            diff = np.flatnonzero(a[:m] != stored[:m])
            n = int(diff[0]) if len(diff) else m
            if n > best_n:
                best_key, best_n = key, n
        n = min(best_n, len(a) - 1)
        if best_key is None or n < self.min_reuse:
            return 0, None
        self._entries.move_to_end(best_key)
        return n, best_key

    def layers(self, key: bytes, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values ``[heads, n, head_dim]`` of every layer for the first ``n`` tokens of ``key``."""
        return [(k[:, :n], v[:, :n]) for k, v in self._entries[key][1]]

    def store(
        self, ids: Sequence[int], layers: list[tuple[torch.Tensor, torch.Tensor]], replaces: bytes | None
    ) -> None:
        """Keep the keys and values ``[heads, len(ids), head_dim]`` of the prompt ``ids``; ``replaces`` (the
        entry it was built on) is dropped when ``ids`` extends it."""
        a = np.asarray(ids, dtype=np.int64)
        if replaces is not None and replaces in self._entries:
            stored = self._entries[replaces][0]
            if len(stored) <= len(a) and np.array_equal(stored, a[: len(stored)]):
                del self._entries[replaces]
        key = a.tobytes()
        self._entries[key] = (a, layers)
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    @staticmethod
    def supported(model: Any) -> bool:
        """Whether ``model``'s cache is made of plain full-attention layers that can be stored per prompt."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        try:
            cache = DynamicCache(config=model.config)
        except Exception:  # a config this cache cannot read: treat as unsupported
            return False
        layers = getattr(cache, "layers", None)
        return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)
