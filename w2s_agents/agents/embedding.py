"""Sentence embeddings from a local encoder model, for the tree merge by observation similarity.

:class:`ModelEmbedder` reads a Hugging Face encoder (a sentence-embedding model such as a MiniLM or BERT saved with
``save_pretrained``) and its tokenizer from a local folder; nothing is downloaded. A text's embedding is the mean
of the last hidden state over its non-padding tokens, L2-normalised. :func:`load_embedder` gives it for a folder,
or the TF-IDF embedding of :mod:`w2s_agents.tree.similarity` when no folder is named.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from w2s_agents.errors import ModelLoadError
from w2s_agents.tree import DenseVectors, Embedder, TfidfEmbedder

from .models import _one_line, check_model_dir, count_parameters, load_tokenizer, resolve_device

__all__ = ["ModelEmbedder", "load_embedder"]

logger = logging.getLogger(__name__)


class ModelEmbedder:
    """Embeddings of texts by a local encoder: mean-pooled last hidden state, L2-normalised.

    Args:
        path: a folder written by ``save_pretrained`` (``config.json``, weights, tokenizer files) of a model
            that ``transformers.AutoModel`` loads (an encoder, or any model with a last hidden state).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (see ``resolve_device``).
        batch_size: texts per forward pass.
        max_length: tokens kept per text (longer texts are truncated; capped by the tokenizer's own limit).

    Raises:
        ModelLoadError: ``path`` is not a local folder with a model config, a tokenizer and weights that load
            (the message names the folder).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        device: str = "auto",
        batch_size: int = 32,
        max_length: int = 512,
    ) -> None:
        p = check_model_dir(
            path,
            what="embedder",
            why="the similarity merge loads embedding models only from local folders and downloads nothing "
            "(give a folder saved with save_pretrained, or leave the embedder unset for the TF-IDF embedding)",
        )
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size} and {max_length}")
        from transformers import AutoModel

        self.path = p
        self.tokenizer = load_tokenizer(p)
        try:
            model = AutoModel.from_pretrained(p, local_files_only=True)
        except Exception as exc:  # a folder's files fail the loader in many ways (OSError, ValueError, ...)
            raise ModelLoadError(f"embedder {p}: cannot load the model: {_one_line(exc)}") from None
        self.device = resolve_device(device)
        self.model: Any = model.to(self.device).eval()
        self.batch_size = batch_size
        limit = getattr(self.tokenizer, "model_max_length", max_length) or max_length
        self.max_length = min(max_length, int(limit)) if limit < 10**9 else max_length
        logger.info("embedder %s (%d parameters) on %s", p, count_parameters(self.model), self.device)

    @property
    def name(self) -> str:
        """``model:<folder>``."""
        return f"model:{self.path}"

    def embed(self, texts: Sequence[str]) -> DenseVectors:
        """The embeddings of ``texts`` (one unit row per text, in their order)."""
        import torch

        rows: list[np.ndarray] = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    list(texts[start : start + self.batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self.model(**batch).last_hidden_state  # (texts, tokens, hidden)
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (texts, tokens, 1)
                mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # (texts, hidden)
                rows.append(torch.nn.functional.normalize(mean.float(), dim=-1).cpu().numpy())
        width = int(getattr(self.model.config, "hidden_size", 0) or 0)
        return DenseVectors(np.concatenate(rows) if rows else np.zeros((0, width)))


def load_embedder(path: str | os.PathLike[str] | None, *, device: str = "auto") -> Embedder:
    """The embedding of the similarity merge: :class:`ModelEmbedder` of the local folder ``path``, or the TF-IDF
    embedding over character n-grams (:class:`~w2s_agents.tree.TfidfEmbedder`) when ``path`` is None.

    Raises:
        ModelLoadError: ``path`` is not a loadable local model folder.
    """
    if path is None:
        return TfidfEmbedder()
    return ModelEmbedder(path, device=device)
