"""An :class:`~w2s_agents.agents.agent.Agent` as the policy prior of online tree expansion.

:func:`w2s_agents.search.expand_online` asks a :data:`~w2s_agents.search.Policy` for proposals with priors in
each state it expands or rolls out from, with the conversation up to that state. :class:`AgentPolicy` answers
with the agent's choose-mode distribution over the env's admissible commands (``softmax(score /
temperature)``), or, where the env reports none, with the agent's greedy generated action. The admissible
commands are read from the env: pass :attr:`AgentPolicy.env` (the given env, tracked) to ``expand_online``::

    policy = AgentPolicy(agent, make_env("w2s/TextWorld-v0"))
    expand_online(tree, policy.env, policy, OnlineSearchConfig(iterations=50, max_env_steps=500))

The prompt is the one the agent builds in a rollout (:class:`~w2s_agents.agents.agent.EpisodeState` of the same
instruction, first observation and turns), so a searched state is scored as the agent would score it while
playing.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from w2s_agents.agents.agent import Agent, EpisodeState, Sampler
from w2s_agents.errors import W2SError
from w2s_agents.messages import Message
from w2s_agents.search.online import PolicyOutput, Proposal

__all__ = ["AgentPolicy", "TrackedEnv"]

_THOUGHT, _ACTION = "Thought: ", "\nAction: "


class TrackedEnv:
    """A text env that remembers what its last reset, step or restore reported: the admissible commands, the
    task's instruction and first observation. ``clone_state`` / ``restore_state`` are there when the env (or
    its ``unwrapped`` env) has them; a cloned state carries the tracked commands with it."""

    def __init__(self, env: Any) -> None:
        self.env = env
        self.admissible: tuple[str, ...] | None = None
        self.instruction = ""
        self.initial_observation = ""
        base = getattr(env, "unwrapped", env)
        self.grammar: str | None = getattr(base, "command_grammar", "") or None
        self._base = base
        if callable(getattr(base, "clone_state", None)) and callable(getattr(base, "restore_state", None)):
            self.clone_state = self._clone_state
            self.restore_state = self._restore_state

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict]:
        """Reset the env and track its first state."""
        obs, info = self.env.reset(seed=seed, options=options)
        self.instruction = str(info.get("instruction") or getattr(self._base, "instruction", "") or "")
        self.initial_observation = obs
        self.admissible = _admissible(info)
        return obs, info

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        """Step the env and track the commands of the new state."""
        result = self.env.step(action)
        self.admissible = _admissible(result[4])
        return result

    def _clone_state(self) -> tuple[Any, tuple[str, ...] | None]:
        return self._base.clone_state(), self.admissible

    def _restore_state(self, state: tuple[Any, tuple[str, ...] | None]) -> None:
        inner, admissible = state
        self._base.restore_state(inner)
        self.admissible = admissible


class AgentPolicy:
    """The policy prior of :func:`~w2s_agents.search.expand_online` from an agent playing ``env``.

    Args:
        agent: the agent (its prompt settings, context length and contrastive decoding apply).
        env: the env the search acts in; wrapped in :class:`TrackedEnv` (see :attr:`env`).
        temperature: of the choose-mode distribution (0: all mass on the best command).
        top_k: propose only the k most probable commands (0: all of them).
    """

    def __init__(self, agent: Agent, env: Any, *, temperature: float = 1.0, top_k: int = 0) -> None:
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        self.agent = agent
        self.env = env if isinstance(env, TrackedEnv) else TrackedEnv(env)
        self.temperature = temperature
        self.top_k = top_k
        self._rng = random.Random(0)  # greedy decisions never draw from it

    def state(self, messages: Sequence[Message]) -> EpisodeState:
        """The episode state of the conversation ``messages`` in the env's current state.

        Raises:
            W2SError: the env has not been reset, or the conversation is not task turn, then (agent, user)
                turns.
        """
        if not self.env.initial_observation:
            raise W2SError("AgentPolicy: the env has not been reset (pass policy.env to expand_online)")
        msgs = [m for m in messages if m["role"] != "system"]
        if not msgs or msgs[0]["role"] != "user" or len(msgs) % 2 != 1:
            raise W2SError("AgentPolicy: expected the task turn followed by (agent, observation) turns")
        turns = []
        for agent_turn, user_turn in zip(msgs[1::2], msgs[2::2], strict=True):
            if agent_turn["role"] != "assistant" or user_turn["role"] != "user":
                raise W2SError("AgentPolicy: expected alternating agent and observation turns")
            thought, action = _split_agent_turn(agent_turn["content"])
            turns.append((thought, action, user_turn["content"]))
        return EpisodeState(
            instruction=self.env.instruction,
            initial_observation=self.env.initial_observation,
            turns=tuple(turns),
            admissible=self.env.admissible,
            grammar=self.env.grammar,
        )

    def __call__(self, messages: Sequence[Message]) -> PolicyOutput:
        """Proposals with priors for the state the conversation ends in (the env's current state)."""
        state = self.state(messages)
        agent = self.agent
        if state.admissible and agent.config.mode == "choose":
            dist = agent.action_distributions([state], temperature=self.temperature)[0]
            ranked = sorted(dist.items(), key=lambda kv: -kv[1])
            if self.top_k:
                ranked = ranked[: self.top_k]
            prompt = agent.prompts.build(state, agent.max_context).ids
            tokens = len(prompt) + sum(len(agent.completion_ids(c)) for c in dist)
            return PolicyOutput(tuple(Proposal(c, p) for c, p in ranked), tokens=tokens)
        decision = agent.act([state], [Sampler(temperature=0.0)], [self._rng])[0]
        tokens = decision.tokens_in + decision.tokens_out
        if not decision.action:
            return PolicyOutput((), tokens=tokens)
        return PolicyOutput((Proposal(decision.action, 1.0, decision.thought),), tokens=tokens)


def _admissible(info: dict) -> tuple[str, ...] | None:
    cmds = info.get("admissible_commands")
    return tuple(cmds) if cmds is not None else None


def _split_agent_turn(content: str) -> tuple[str, str]:
    """(thought, action) of an agent turn written by :func:`w2s_agents.messages.agent_message`."""
    if content.startswith(_THOUGHT) and _ACTION in content:
        thought, action = content[len(_THOUGHT) :].rsplit(_ACTION, 1)
        return thought, action
    return "", content
