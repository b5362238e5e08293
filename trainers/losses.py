"""The DPO loss as plain functions of log-probabilities, and the per-source weights of several weak supervisors.

* Sigmoid DPO (used by :class:`.dpo.DPOObjective`, which holds the whole TreeDPO objective and its metrics):
  L = -log sigmoid(beta * [(log pi(y+|x) - log pi_ref(y+|x)) - (log pi(y-|x) - log pi_ref(y-|x))]), the
  log-probabilities summed over the agent tokens of each completion; :func:`dpo_margins` is the bracket.
  The SFT / MCTS-SFT objective is :func:`.sft.sft_objective`.
* Source weights (RAVEN): one weight alpha_s per weak model on the simplex. A row with sources S is weighted
  w = K * mean_{s in S} alpha_s (w = 1 for uniform weights; rows without sources keep w = 1). After each
  optimizer step the weights take a gradient step on the weighted loss, dL/dalpha_s = sum over rows with s in
  S of loss_row * K / |S| / N, and are clipped at ``min_weight`` and renormalised.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["SourceWeights", "dpo_loss", "dpo_margins"]


def dpo_margins(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
) -> torch.Tensor:
    """``(log pi(y+) - log pi_ref(y+)) - (log pi(y-) - log pi_ref(y-))`` per pair."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """The sigmoid DPO loss of each pair (not averaged): ``-log sigmoid(beta * margin)``."""
    return -F.logsigmoid(beta * dpo_margins(policy_chosen, policy_rejected, ref_chosen, ref_rejected))


class SourceWeights:
    """Per-source weights on the simplex, learned jointly with the model (see the module docstring).

    Args:
        names: the sources (weak model names) in a fixed order.
        lr: step size of the weights' gradient step.
        min_weight: weights are clipped at this value before renormalising.
    """

    def __init__(self, names: Sequence[str], *, lr: float, min_weight: float = 1e-6) -> None:
        if not names:
            raise ValueError("SourceWeights needs at least one source")
        self.names = list(names)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.lr = lr
        self.min_weight = min_weight
        self.alpha = np.full(len(self.names), 1.0 / len(self.names))

    @property
    def k(self) -> int:
        """Number of sources."""
        return len(self.names)

    def row_weight(self, sources: Sequence[int]) -> float:
        """``K * mean(alpha[sources])``; 1 for a row without sources."""
        if not len(sources):
            return 1.0
        return float(self.k * self.alpha[list(sources)].mean())

    def accumulate(self, grad: np.ndarray, sources: Sequence[int], loss: float) -> None:
        """Add one row's contribution ``loss * K / |S|`` to ``grad[s]`` for each of its sources (unnormalised)."""
        if len(sources):
            grad[list(sources)] += loss * self.k / len(sources)

    def step(self, grad: np.ndarray) -> None:
        """One gradient step ``alpha -= lr * grad``, clip at ``min_weight``, renormalise to sum 1.

        ``grad`` is the :meth:`accumulate` sum divided by the step's loss normaliser (its agent tokens, agent
        turns or pairs), i.e. the gradient of the loss that trained the model."""
        alpha = self.alpha - self.lr * grad
        alpha = np.maximum(alpha, self.min_weight)
        self.alpha = alpha / alpha.sum()

    def as_dict(self) -> dict[str, float]:
        """``{source: weight}``."""
        return {n: float(a) for n, a in zip(self.names, self.alpha, strict=True)}

    def state_dict(self) -> dict[str, list]:
        """Serializable state (names and weights)."""
        return {"names": list(self.names), "alpha": [float(a) for a in self.alpha]}

    def load_state_dict(self, state: dict[str, list]) -> None:
        """Restore :meth:`state_dict`'s output (the names must match)."""
        if list(state["names"]) != self.names:
            raise ValueError(f"source names differ: saved {state['names']}, now {self.names}")
        self.alpha = np.asarray(state["alpha"], dtype=np.float64)
