"""Sampling settings of exploration and how a choice is drawn from candidate scores."""

from __future__ import annotations

import logging
import math
import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from w2s_agents.config import check, option

if TYPE_CHECKING:
    pass

__all__ = ["Sampler", "pick", "softmax"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampler:
    """One sampling setting of exploration (one slot of the paper's tree width).

    Temperature 0 is greedy: the argmax, ties broken by the lowest index (first admissible command, lowest token
    id). Otherwise the agent samples from ``softmax(score / temperature)`` cut to the smallest set of most
    probable choices whose probability reaches ``top_p``.
    """

    name: str = option("", "name recorded in trajectories (source.sampler); empty: 'greedy' or 't<T>-p<P>'")
    temperature: float = option(0.0, "softmax temperature; 0 is greedy (argmax)")
    top_p: float = option(1.0, "nucleus: keep the most probable choices up to this cumulative probability")

    def __post_init__(self) -> None:
        check(
            math.isfinite(self.temperature) and self.temperature >= 0,
            "temperature",
            f"must be a finite number >= 0, got {self.temperature}",
        )
        check(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")
        check(
            self.name == "" or re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", self.name) is not None,
            "name",
            f"must be letters, digits, '.', '_', '+' or '-', got {self.name!r}",
        )
        if not self.name:
            auto = "greedy" if self.temperature == 0 else f"t{self.temperature:g}-p{self.top_p:g}"
            object.__setattr__(self, "name", auto)

    @property
    def greedy(self) -> bool:
        """Whether this sampler takes the argmax."""
        return self.temperature == 0


def softmax(scores: np.ndarray, temperature: float) -> np.ndarray:
    if temperature == 0:
        out = np.zeros_like(scores)
        out[int(np.argmax(scores))] = 1.0
        return out
    z = scores / temperature
    z = z - np.max(z[np.isfinite(z)])
    p = np.where(np.isfinite(z), np.exp(z), 0.0)
    return p / p.sum()


def pick(scores: np.ndarray, sampler: Sampler, rng: random.Random) -> tuple[int, float]:
    """Index chosen among candidate ``scores`` by ``sampler`` and the probability it had."""
    import torch

    from w2s_agents.agents.decoding import pick_tokens

    if sampler.greedy:
        k = int(np.argmax(scores))
        return k, 1.0
    u = rng.random()
    k = int(pick_tokens(torch.from_numpy(scores)[None, :], [sampler.temperature], [sampler.top_p], [u])[0])
    probs = softmax(scores, sampler.temperature)
    order = np.argsort(-probs, kind="stable")
    cum = np.cumsum(probs[order])
    keep = order[(cum - probs[order]) < sampler.top_p]
    if keep.size == 0:
        keep = order[:1]
    return k, float(probs[k] / probs[keep].sum())
