"""Online expansion on a real TextWorld game with a tiny agent as the policy prior (AgentPolicy)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from w2s_agents.agents import Agent, AgentConfig, AgentPolicy, load_model
from w2s_agents.envs.textworld_env import TextWorldEnv
from w2s_agents.search import OnlineSearchConfig, PolicyOutput, expand_online
from w2s_agents.tree import ROOT, TrajectoryTree
from w2s_agents.types import EpisodeState

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TASK = "test-tw-simple/train/0"


@pytest.fixture()
def env(game_cache_dir: Path, tw_test_suites: dict) -> TextWorldEnv:
    e = TextWorldEnv(cache_dir=game_cache_dir, max_steps=20)
    yield e
    e.close()


@pytest.fixture()
def agent(nano_model_dir: Path) -> Agent:
    return Agent(load_model(nano_model_dir), AgentConfig(mode="choose", max_context_tokens=1024))


def test_priors_are_the_agents_choose_mode_distribution(env: TextWorldEnv, agent: Agent) -> None:
    obs, info = env.reset(options={"task": TASK})
    state = EpisodeState(
        info["instruction"], obs, (), tuple(info["admissible_commands"]), env.command_grammar or None
    )
    out = AgentPolicy(agent, temperature=0.5)(state)
    expected = agent.action_distributions([state], temperature=0.5)[0]
    got = {p.action: p.prior for p in out.proposals}
    assert set(got) == set(info["admissible_commands"])
    for cmd, p in expected.items():
        assert math.isclose(got[cmd], p, rel_tol=1e-9, abs_tol=1e-12)
    assert [p.prior for p in out.proposals] == sorted(got.values(), reverse=True)
    assert out.tokens > 0
    assert len(AgentPolicy(agent, top_k=2)(state).proposals) == 2


def test_a_state_without_commands_gets_the_agents_generated_action(env: TextWorldEnv, agent: Agent) -> None:
    obs, info = env.reset(options={"task": TASK})
    state = EpisodeState(info["instruction"], obs, (), None, env.command_grammar or None)
    out = AgentPolicy(agent)(state)
    assert len(out.proposals) <= 1 and out.tokens > 0
    if out.proposals:
        assert out.proposals[0].prior == 1.0


@pytest.mark.slow
def test_online_expansion_on_textworld_with_a_tiny_agent(
    env: TextWorldEnv, agent: Agent, game_cache_dir: Path, tw_test_suites: dict
) -> None:
    states: list[EpisodeState] = []
    agent_policy = AgentPolicy(agent)

    def policy(state: EpisodeState) -> PolicyOutput:
        states.append(state)
        return agent_policy(state)

    tree = TrajectoryTree(TASK, env_id="w2s/TextWorld-v0")
    cfg = OnlineSearchConfig(iterations=8, max_env_steps=60, max_depth=6, model="tiny-search")
    result = expand_online(tree, env, policy, cfg)

    assert 1 <= result.iterations <= 8 and result.trajectories
    assert result.env_steps <= cfg.max_env_steps + cfg.max_depth
    assert result.tokens > 0 and result.new_nodes == len(tree) - 1
    assert tree.sources(ROOT) == {"tiny-search": len(result.trajectories)}
    assert all(t.source.role == "search" for t in result.trajectories)
    # every episode the search played (restoring cloned states between them) replays step for step in a
    # fresh env: the states it acted in were the real ones
    fresh = TextWorldEnv(cache_dir=game_cache_dir, max_steps=20)
    try:
        for traj in result.trajectories:
            obs, info = fresh.reset(options={"task": TASK})
            assert obs == traj.initial_observation
            for step in traj.steps:
                assert step.action in info["admissible_commands"]
                obs, _, _, _, info = fresh.step(step.action)
                assert obs == step.observation
        # the states handed to the policy (also after restoring cloned states) are the env's real ones: the
        # turns replay to the state's observation and the env offers exactly the state's commands there
        for state in states:
            obs, info = fresh.reset(options={"task": TASK})
            assert obs == state.initial_observation and state.grammar == fresh.command_grammar
            for _thought, action, observation in state.turns:
                obs, _, _, _, info = fresh.step(action)
                assert obs == observation
            assert state.admissible == tuple(info["admissible_commands"])
    finally:
        fresh.close()
    assert len(states) >= result.iterations
    assert tree.search_info["algorithm"] == "online-puct"
