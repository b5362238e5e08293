"""An :class:`~w2s_agents.agents.Agent` as the policy prior of online tree expansion.

:func:`w2s_agents.search.expand_online` asks a :data:`~w2s_agents.search.Policy` for proposals with priors in
each state it expands or rolls out from, giving the :class:`~w2s_agents.types.EpisodeState` of the episode it
is playing. :class:`AgentPolicy` answers with the agent's choose-mode distribution over the state's admissible
commands (``softmax(score / temperature)``), or, where the env reports none, with the agent's greedy generated
action::

    policy = AgentPolicy(agent, temperature=1.0)
    expand_online(tree, make_env("w2s/TextWorld-v0"), policy, OnlineSearchConfig(iterations=50))

The state is the one a rollout hands the agent, so a searched state is scored as the agent scores it while
playing.
"""

from __future__ import annotations

import random

from w2s_agents.search.online import PolicyOutput, Proposal
from w2s_agents.types import EpisodeState

from .agent import Agent
from .sampling import Sampler

__all__ = ["AgentPolicy"]


class AgentPolicy:
    """The policy prior of :func:`~w2s_agents.search.expand_online` from an agent.

    Args:
        agent: the agent (its prompt settings, context length and contrastive decoding apply).
        temperature: of the choose-mode distribution (0: all mass on the best command).
        top_k: propose only the k most probable commands (0: all of them).
    """

    def __init__(self, agent: Agent, *, temperature: float = 1.0, top_k: int = 0) -> None:
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        self.agent = agent
        self.temperature = temperature
        self.top_k = top_k
        self._rng = random.Random(0)  # greedy decisions never draw from it

    def __call__(self, state: EpisodeState) -> PolicyOutput:
        """Proposals with priors for ``state``."""
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
