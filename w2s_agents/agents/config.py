"""How an LLM agent acts: :class:`AgentConfig` (the ``agent:`` section of configs)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from w2s_agents.config import check, option

if TYPE_CHECKING:
    pass

__all__ = ["AgentConfig", "Mode"]

logger = logging.getLogger(__name__)


Mode = Literal["generate", "choose"]


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

    @property
    def contrastive(self) -> bool:
        """Whether contrastive decoding is on (an amateur model is configured)."""
        return self.amateur_path is not None
