"""Online expansion on a real TextWorld game with a tiny agent as the policy prior (AgentPolicy)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from w2s_agents.agents.agent import Agent, AgentConfig, EpisodeState
from w2s_agents.envs.textworld_env import TextWorldEnv
from w2s_agents.errors import W2SError
from w2s_agents.agents.models import load_model
from w2s_agents.search import OnlineSearchConfig, expand_online
from w2s_agents.agents.policy import AgentPolicy, TrackedEnv
from w2s_agents.tree import ROOT, TrajectoryTree

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
    policy = AgentPolicy(agent, env, temperature=0.5)
    obs, info = policy.env.reset(options={"task": TASK})
    out = policy([{"role": "system", "content": "x"}, {"role": "user", "content": f"Task: ...\n\n{obs}"}])
    state = EpisodeState(
        info["instruction"], obs, (), tuple(info["admissible_commands"]), env.command_grammar or None
    )
    expected = agent.action_distributions([state], temperature=0.5)[0]
    got = {p.action: p.prior for p in out.proposals}
    assert set(got) == set(info["admissible_commands"])
    for cmd, p in expected.items():
        assert math.isclose(got[cmd], p, rel_tol=1e-9, abs_tol=1e-12)
    assert [p.prior for p in out.proposals] == sorted(got.values(), reverse=True)
    assert out.tokens > 0

    # after a step the state holds the turn and the new commands
    action = out.proposals[0].action
    obs2, *_, info2 = policy.env.step(action)
    state2 = policy.state(
        [
            {"role": "user", "content": "task"},
            {"role": "assistant", "content": f"Thought: why not\nAction: {action}"},
            {"role": "user", "content": obs2},
        ]
    )
    assert state2.turns == (("why not", action, obs2),)
    assert state2.admissible == tuple(info2["admissible_commands"])
    top2 = AgentPolicy(agent, policy.env, top_k=2)
    assert top2.env is policy.env and len(top2(state_messages(obs2, action)).proposals) == 2


def state_messages(obs: str, action: str) -> list[dict]:
    return [
        {"role": "user", "content": "task"},
        {"role": "assistant", "content": action},
        {"role": "user", "content": obs},
    ]


def test_tracked_env_carries_the_commands_through_clone_and_restore(env: TextWorldEnv) -> None:
    tracked = TrackedEnv(env)
    _, info = tracked.reset(options={"task": TASK})
    saved = tracked.clone_state()
    first = tracked.admissible
    assert first == tuple(info["admissible_commands"])
    tracked.step(info["expert_plan"][0])
    assert tracked.admissible != first
    tracked.restore_state(saved)
    assert tracked.admissible == first
    assert not hasattr(TrackedEnv(object()), "clone_state")  # an env without clones is replayed instead


def test_policy_refuses_a_conversation_before_reset(env: TextWorldEnv, agent: Agent) -> None:
    with pytest.raises(W2SError, match="not been reset"):
        AgentPolicy(agent, env)([{"role": "user", "content": "Task: x"}])


def test_online_expansion_on_textworld_with_a_tiny_agent(
    env: TextWorldEnv, agent: Agent, game_cache_dir: Path, tw_test_suites: dict
) -> None:
    policy = AgentPolicy(agent, env)
    tree = TrajectoryTree(TASK, env_id="w2s/TextWorld-v0")
    cfg = OnlineSearchConfig(iterations=8, max_env_steps=60, max_depth=6, model="tiny-search")
    result = expand_online(tree, policy.env, policy, cfg)

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
    finally:
        fresh.close()
    assert tree.search_info["algorithm"] == "online-puct"
