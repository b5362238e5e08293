"""Generation backends: where an agent's model runs, behind :class:`~w2s_agents.agents.Agent`.

The agent renders prompts, tokenizes candidate commands, parses answers and draws choices; a backend only runs the
model on token ids, in the two calls the two action modes need:

* :meth:`GenerationBackend.candidate_logprobs`: the log-probability of every token of every candidate continuation
  after its prompt (choose mode sums them into a command's score);
* :meth:`GenerationBackend.generate`: an answer decoded after every prompt, each with its own sampler and random
  stream (generate mode).

Both backends receive the same token ids (one prompt rendering, one tokenization), so they differ only in how the
numbers are computed:

=================  ==================================================================================================
``transformers``   :class:`TransformersBackend`, the default: the model in this process (CPU or GPU), candidates
                   packed behind one copy of their prompt, a prefix KV cache, contrastive decoding
``vllm``           :class:`~w2s_agents.agents.vllm_backend.VLLMBackend`: an offline vLLM engine (optional extra)
=================  ==================================================================================================

:func:`w2s_agents.agents.agent.make_backend` builds the one ``agent.backend`` names.
"""

from __future__ import annotations

import logging
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from w2s_agents.errors import ConfigError, ModelLoadError

if TYPE_CHECKING:
    import torch

    from w2s_agents.agents.config import AgentConfig
    from w2s_agents.agents.decoding import CandidateLogprobs
    from w2s_agents.agents.models import LoadedModel
    from w2s_agents.agents.sampling import Sampler

__all__ = [
    "GenerationBackend",
    "StopCheck",
    "TransformersBackend",
    "cut_answer",
    "local_model_files",
    "read_json",
    "stop_ids_of",
]

logger = logging.getLogger(__name__)

StopCheck = Callable[[int, list[int]], bool]
"""``stop(row, generated ids so far) -> bool``: end that row's answer after its last token (generate mode)."""


class GenerationBackend(ABC):
    """Where an agent's model runs: token ids in, log-probabilities and generated ids out.

    Attributes:
        path: the model folder.
        tokenizer: its Hugging Face tokenizer (the agent renders and tokenizes with it).
        max_positions: longest sequence the model takes (None when unknown).
        stop_ids: tokens that end an answer (the tokenizer's eos and the generation config's eos ids).
    """

    name: ClassVar[str]
    path: Path
    tokenizer: Any
    max_positions: int | None
    stop_ids: frozenset[int]

    @property
    def has_amateur(self) -> bool:
        """Whether an amateur model runs beside the model (contrastive decoding)."""
        return False

    @property
    def prefix_cache(self) -> Any:
        """The backend's own prefix KV cache object, or None."""
        return None

    @abstractmethod
    def candidate_logprobs(
        self,
        prompts: Sequence[list[int]],
        candidates: Sequence[Sequence[list[int]]],
        *,
        amateur: bool = False,
    ) -> list[list[CandidateLogprobs]]:
        """Per-token log-probabilities of every candidate after its prompt (``out[i][j]``: candidate ``j`` of
        prompt ``i``), under the model or, with ``amateur``, under the amateur model."""

    @abstractmethod
    def generate(
        self,
        prompts: Sequence[list[int]],
        samplers: Sequence[Sampler],
        rngs: Sequence[random.Random],
        *,
        max_new_tokens: int,
        stop: StopCheck | None = None,
    ) -> list[list[int]]:
        """The generated ids after every prompt (a stop token included when one ended it), decoding row ``i``
        with ``samplers[i]`` and drawing from ``rngs[i]`` only when it samples; a row ends at a stop token, when
        ``stop`` says so, or after ``max_new_tokens``."""

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release what the backend holds (an engine); the agent cannot act afterwards."""


def stop_ids_of(tokenizer: Any, generation_eos: Any, path: Path) -> frozenset[int]:
    """End-of-turn tokens: the tokenizer's eos and the generation config's eos ids.

    Raises:
        ModelLoadError: there is none.
    """
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if isinstance(generation_eos, int):
        ids.add(generation_eos)
    elif isinstance(generation_eos, (list, tuple)):
        ids.update(int(e) for e in generation_eos)
    if not ids:
        raise ModelLoadError(f"{path}: the tokenizer has no eos token to end the agent's answer")
    return frozenset(ids)


def cut_answer(ids: Sequence[int], stop_ids: frozenset[int], stop: StopCheck | None, row: int) -> list[int]:
    """``ids`` up to and including the first token that ends an answer: a stop token, or where ``stop`` says so
    (what decoding with those checks after every token gives, for an engine that decoded on)."""
    out = list(ids)
    for k, t in enumerate(out):
        if t in stop_ids or (stop is not None and stop(row, out[: k + 1])):
            return out[: k + 1]
    return out


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file, or ``{}`` when it is missing.

    Raises:
        ModelLoadError: it is not a JSON object.
    """
    import json

    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not a readable JSON file: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: not a JSON object")
    return data


def local_model_files(model_path: str | Path, *, why: str) -> tuple[Path, Any, frozenset[int], int | None]:
    """``(folder, tokenizer, stop ids, positions)`` of a local model folder, without loading its weights (the
    engine backends tokenize here and run the model elsewhere).

    Raises:
        ModelLoadError: not a local model folder (the message ends with ``why``), or no tokenizer in it.
    """
    from w2s_agents.agents.models import check_model_dir, load_tokenizer

    path = check_model_dir(model_path, what="model path", why=why)
    tokenizer = load_tokenizer(path)
    stop_ids = stop_ids_of(tokenizer, read_json(path / "generation_config.json").get("eos_token_id"), path)
    return path, tokenizer, stop_ids, read_json(path / "config.json").get("max_position_embeddings")


class TransformersBackend(GenerationBackend):
    """The model in this process through ``transformers`` (the default backend, CPU or GPU).

    Candidates are scored by :func:`~w2s_agents.agents.decoding.candidate_logprobs` (packed behind one copy of
    their prompt, with a :class:`~w2s_agents.agents.prefix_cache.PrefixCache`), answers decoded by
    :func:`~w2s_agents.agents.decoding.generate`; with an amateur model both modes are contrastive.

    Args:
        lm: the loaded model.
        config: the agent's settings (batching, prefix cache, contrastive decoding).
        amateur: the amateur model; loaded from ``config.amateur_path`` (same device and dtype) when not given.

    Raises:
        ConfigError: the amateur's tokenizer differs from the model's.
        ModelLoadError: the amateur cannot be loaded.
    """

    name = "transformers"

    def __init__(self, lm: LoadedModel, config: AgentConfig, *, amateur: LoadedModel | None = None) -> None:
        self.lm = lm
        self.config = config
        self.path = lm.path
        self.tokenizer = lm.tokenizer
        self.stop_ids = stop_ids_of(
            lm.tokenizer, getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None), lm.path
        )
        self.max_positions = getattr(lm.model.config, "max_position_embeddings", None)
        self.amateur: LoadedModel | None = amateur
        if self.amateur is None and config.amateur_path is not None:
            from w2s_agents.agents.models import load_model

            self.amateur = load_model(
                config.amateur_path, device=str(lm.device), dtype=str(lm.dtype).removeprefix("torch.")
            )
        if self.amateur is not None and self.amateur.tokenizer.get_vocab() != lm.tokenizer.get_vocab():
            raise ConfigError(
                f"agent.amateur_path: the amateur model {self.amateur.path} does not share the tokenizer of "
                f"{lm.path}; contrastive decoding compares the two models token by token"
            )
        self._prefix = self._make_prefix_cache(lm)
        self._prefix_amateur = self._make_prefix_cache(self.amateur) if self.amateur is not None else None

    def _make_prefix_cache(self, lm: LoadedModel) -> Any:
        from w2s_agents.agents.prefix_cache import PrefixCache

        if not (self.config.prefix_cache and self.config.share_prompt):
            return None
        if not PrefixCache.supported(lm.model):
            logger.info("%s: its KV cache cannot be kept per prompt; every prompt runs whole", lm.path)
            return None
        return PrefixCache(lm.model, self.config.prefix_cache)

    @property
    def has_amateur(self) -> bool:
        """Whether an amateur model runs beside the model (contrastive decoding)."""
        return self.amateur is not None

    @property
    def prefix_cache(self) -> Any:
        """The :class:`~w2s_agents.agents.prefix_cache.PrefixCache` of the model's recent prompts, or None."""
        return self._prefix

    def candidate_logprobs(
        self,
        prompts: Sequence[list[int]],
        candidates: Sequence[Sequence[list[int]]],
        *,
        amateur: bool = False,
    ) -> list[list[CandidateLogprobs]]:
        """See :meth:`GenerationBackend.candidate_logprobs`."""
        from w2s_agents.agents.decoding import candidate_logprobs

        cfg = self.config
        lm = self.amateur if amateur else self.lm
        if lm is None:
            raise ValueError("no amateur model to score with")
        return candidate_logprobs(
            lm.model,
            prompts,
            candidates,
            pad_id=int(self.tokenizer.pad_token_id),
            batch_rows=cfg.score_batch_size or (4 if self.lm.device.type == "cpu" else 16),
            block_tokens=cfg.score_block_tokens,
            share_prompt=cfg.share_prompt,
            prefix=self._prefix_amateur if amateur else self._prefix,
        )

    def generate(
        self,
        prompts: Sequence[list[int]],
        samplers: Sequence[Sampler],
        rngs: Sequence[random.Random],
        *,
        max_new_tokens: int,
        stop: StopCheck | None = None,
    ) -> list[list[int]]:
        """See :meth:`GenerationBackend.generate`; every sampled row draws one uniform a token from its stream."""
        from w2s_agents.agents.decoding import contrastive_token_scores, generate, pick_tokens

        cfg = self.config

        def choose(rows: list[int], logp: torch.Tensor, logp_b: torch.Tensor | None) -> torch.Tensor:
            scores = logp
            if logp_b is not None:
                best = logp.max(dim=-1, keepdim=True).values
                scores = contrastive_token_scores(
                    logp, best, logp_b, lam=cfg.contrastive_lambda, alpha=cfg.contrastive_alpha
                )
            return pick_tokens(
                scores,
                [samplers[r].temperature for r in rows],
                [samplers[r].top_p for r in rows],
                [None if samplers[r].greedy else rngs[r].random() for r in rows],
            )

        return generate(
            self.lm.model,
            prompts,
            choose,
            pad_id=int(self.tokenizer.pad_token_id),
            stop_ids=sorted(self.stop_ids),
            max_new_tokens=max_new_tokens,
            amateur=self.amateur.model if self.amateur is not None else None,
            stop=stop,
        )
