"""LLM agents for text environments.

=================  =====================================================================================
``agent``          :class:`Agent`: decides the next action of many live episodes at once ("LLM picks an
                   action": choose mode scores the admissible commands, generate mode writes ReAct)
``config``         :class:`AgentConfig` (the ``agent:`` config section), :class:`VLLMOptions`, :class:`ServerOptions`
``backend``        :class:`GenerationBackend`: where the model runs (the transformers backend, in this process)
``vllm_backend``   the vLLM backend (``agent.backend: vllm``; imports vLLM, an optional extra, when built)
``server_backend`` the server backend (``agent.backend: server``): an OpenAI-compatible server elsewhere
``prompts``        an :class:`~w2s_agents.types.EpisodeState` rendered through the chat template, fitted
``parsing``        a generated ``Thought: ... Action: ...`` answer split into thought and action
``sampling``       :class:`Sampler` (temperature, top-p) and how a choice is drawn
``decoding``       batched candidate scoring, generation, contrastive decoding (torch)
``prefix_cache``   keys and values of recent prompts, reused by the prompts that extend them
``models``         local model folders: :func:`load_model`, tiny models built from a config
``policy``         :class:`AgentPolicy`: an agent as the prior of online tree search
=================  =====================================================================================
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .agent import Agent, Decision, action_distribution, load_agent, make_backend, score_actions
from .backend import GenerationBackend
from .config import AgentConfig, ServerOptions, VLLMOptions
from .models import LoadedModel, ModelConfig, create_tiny_model, load_model
from .parsing import ParsedOutput, parse_react
from .prompts import Prompt, PromptBuilder
from .sampling import Sampler

# the search prior is imported on first use (it needs the search package)
_LAZY = {"AgentPolicy": "policy"}

if TYPE_CHECKING:
    from .policy import AgentPolicy


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "Agent",
    "AgentConfig",
    "AgentPolicy",
    "Decision",
    "GenerationBackend",
    "LoadedModel",
    "ModelConfig",
    "ParsedOutput",
    "Prompt",
    "PromptBuilder",
    "Sampler",
    "ServerOptions",
    "VLLMOptions",
    "action_distribution",
    "create_tiny_model",
    "load_agent",
    "load_model",
    "make_backend",
    "parse_react",
    "score_actions",
]
