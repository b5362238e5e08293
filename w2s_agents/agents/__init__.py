"""LLM agents: models, prompts, action parsing, the two action modes, sampling and contrastive decoding."""

from .agent import (
    Agent,
    AgentConfig,
    Decision,
    EpisodeState,
    ParsedOutput,
    Prompt,
    Sampler,
    action_distribution,
    load_agent,
    parse_react,
    score_actions,
)
from .models import LoadedModel, ModelConfig, create_tiny_model, load_model

__all__ = [
    "Agent",
    "AgentConfig",
    "Decision",
    "EpisodeState",
    "LoadedModel",
    "ModelConfig",
    "ParsedOutput",
    "Prompt",
    "Sampler",
    "action_distribution",
    "create_tiny_model",
    "load_agent",
    "load_model",
    "parse_react",
    "score_actions",
]
