"""Training rows and micro-batches: :class:`Example` (one tokenized row), :class:`Batch` (its padded tensors),
:func:`collate` (rows -> batch) and the :class:`Objective` protocol that turns a batch into per-row losses.

Every method shares these: an SFT row holds one conversation, a preference pair its chosen and its rejected
conversation; a pair batch holds the chosen sequences first, then the rejected, so an objective splits its
``(2B, T)`` tensors with ``chunk(2)``. The loop imports this module, never the objectives themselves
(:mod:`.sft`, :mod:`.dpo`), which are handed to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np
import torch
from torch import nn

from .masks import EncodedConversation

__all__ = ["Batch", "Example", "Objective", "ObjectiveOutput", "collate"]


@dataclass(frozen=True)
class Example:
    """One training row after tokenization: one conversation (SFT) or a chosen and a rejected one (DPO)."""

    seqs: tuple[EncodedConversation, ...]
    units: float  # its share of the loss normaliser: agent tokens, agent turns, or 1 per pair
    sources: tuple[int, ...] = ()  # indices of the row's sources in the run's source list
    easy: bool = True
    ref: tuple[float, float] | None = None  # reference log-probs (chosen, rejected) of a pair
    advantage: float | None = None  # the step's advantage of a policy-gradient row

    @property
    def tokens(self) -> int:
        """Tokens of all its sequences."""
        return sum(len(s) for s in self.seqs)


@dataclass(frozen=True, eq=False)  # compared by identity: tensors have no single truth value
class Batch:
    """The right-padded tensors of a micro-batch, on the training device.

    ``N`` is the number of sequences: the rows of an SFT batch, twice the pairs of a pair batch (chosen
    sequences ``0..B-1``, then their rejected sequences ``B..2B-1``, in the same order).
    """

    input_ids: torch.Tensor  # (N, T) int64 token ids, padded with the pad id
    attention_mask: torch.Tensor  # (N, T) int64, 1 on the real tokens of each sequence
    target_mask: torch.Tensor  # (N, T) int64, 1 on the agent tokens that carry loss
    ref_chosen: torch.Tensor | None = None  # (B,) float32 reference log-prob of each pair's chosen side
    ref_rejected: torch.Tensor | None = None  # (B,) float32, of its rejected side
    advantages: torch.Tensor | None = None  # (B,) float32 advantage of each policy-gradient row

    @property
    def rows(self) -> int:
        """Training rows in the batch (a pair counts once)."""
        n = self.input_ids.shape[0]
        return n // 2 if self.ref_chosen is not None else n


def collate(examples: Sequence[Example], pad_id: int, device: torch.device) -> Batch:
    """Right-padded tensors of a micro-batch; pairs give ``[chosen_1..B, rejected_1..B]``.

    The attention and target masks come from each sequence's own length and loss mask, never from comparing
    ids with the pad id (which may equal the end-of-turn token that carries loss). Two pairs, padded with
    ``pad_id=0``::

        >>> seq = lambda ids, mask: EncodedConversation(ids, mask, [int(m) for m in mask])
        >>> pairs = [
        ...     Example((seq([5, 6, 7], [0, 1, 1]), seq([5, 8], [0, 1])), 1.0, ref=(-1.5, -2.0)),
        ...     Example((seq([5, 9], [0, 1]), seq([5, 6, 6, 4], [0, 0, 1, 1])), 1.0, ref=(-0.5, -3.0)),
        ... ]
        >>> batch = collate(pairs, pad_id=0, device=torch.device("cpu"))
        >>> batch.input_ids  # chosen of pair 1, chosen of pair 2, rejected of pair 1, rejected of pair 2
        tensor([[5, 6, 7, 0],
                [5, 9, 0, 0],
                [5, 8, 0, 0],
                [5, 6, 6, 4]])
        >>> batch.attention_mask
        tensor([[1, 1, 1, 0],
                [1, 1, 0, 0],
                [1, 1, 0, 0],
                [1, 1, 1, 1]])
        >>> batch.target_mask
        tensor([[0, 1, 1, 0],
                [0, 1, 0, 0],
                [0, 1, 0, 0],
                [0, 0, 1, 1]])
        >>> batch.ref_chosen, batch.ref_rejected, batch.rows
        (tensor([-1.5000, -0.5000]), tensor([-2., -3.]), 2)

    An SFT batch is the same with one sequence per row and no reference log-probs (``ref_chosen`` None).
    """
    n_seq = len(examples[0].seqs)
    seqs = [ex.seqs[k] for k in range(n_seq) for ex in examples]
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    attn = np.zeros((len(seqs), width), dtype=np.int64)
    target = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s.input_ids
        attn[i, : len(s)] = 1
        target[i, : len(s)] = s.loss_mask
    ref_chosen = ref_rejected = None
    if examples[0].ref is not None:
        ref = torch.tensor([ex.ref for ex in examples], dtype=torch.float32, device=device)
        ref_chosen, ref_rejected = ref[:, 0], ref[:, 1]
    advantages = None
    if examples[0].advantage is not None:
        advantages = torch.tensor([ex.advantage for ex in examples], dtype=torch.float32, device=device)
    return Batch(
        input_ids=torch.from_numpy(ids).to(device),
        attention_mask=torch.from_numpy(attn).to(device),
        target_mask=torch.from_numpy(target).to(device),
        ref_chosen=ref_chosen,
        ref_rejected=ref_rejected,
        advantages=advantages,
    )


class ObjectiveOutput(NamedTuple):
    """What an objective computes on one micro-batch."""

    losses: torch.Tensor  # (B,) each row's summed loss, differentiable (the loop divides by the normaliser)
    # name -> (B,) per-row values (or a 0-d batch mean); the loop averages them over the rows of a step
    metrics: dict[str, torch.Tensor]


class Objective(Protocol):
    """The loss of a method: ``objective(scorer, batch) -> ObjectiveOutput``.

    ``scorer(input_ids, attention_mask, target_mask)`` returns the policy's ``(N, T)`` token log-probs on the
    target positions (0 elsewhere; :func:`.logps.token_logps`). The metrics carry no gradient.
    """

    def __call__(self, scorer: nn.Module, batch: Batch) -> ObjectiveOutput:
        """Per-row losses ``(B,)`` and metrics of ``batch``."""
        ...
