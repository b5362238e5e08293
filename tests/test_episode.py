"""The one episode recorder: the outcome rule, and rollouts, demos and online search recording alike."""

from __future__ import annotations

import math
from typing import Any

import pytest

from w2s_agents.agents import AgentConfig, Decision, Sampler
from w2s_agents.envs.demos import expert_trajectory
from w2s_agents.episode import EpisodeRecorder, episode_outcome
from w2s_agents.rollout import EpisodeSpec, run_episodes
from w2s_agents.search import OnlineSearchConfig, PolicyOutput, Proposal, expand_online
from w2s_agents.tree import TrajectoryTree
from w2s_agents.types import EpisodeState, Source, Trajectory

PLAN = ["take key", "unlock door", "go out"]


class FiveGame:
    """A three-step game on an engine whose raw maximum score is 5 (two points for the key, three for the
    door): ``info["score"]`` is normalised as the env contract says, ``info["max_score"]`` is the raw 5."""

    env_id = "w2s/Five-v0"
    instruction = "Get out."
    command_grammar = "verb object"

    def __init__(self) -> None:
        self.done = 0

    def _info(self) -> dict[str, Any]:
        won = self.done == len(PLAN)
        return {
            "score": (0.0, 0.4, 1.0, 1.0)[self.done],
            "max_score": 5,
            "won": won,
            "lost": False,
            "admissible_commands": ["look", PLAN[self.done]] if not won else [],
            "expert_plan": PLAN[self.done :],
            "instruction": self.instruction,
        }

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[str, dict]:
        self.done = 0
        return "A locked room.", self._info()

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        before = self._info()["score"]
        if self.done < len(PLAN) and action == PLAN[self.done]:
            self.done += 1
            obs = f"Done: {action}."
        else:
            obs = "Nothing happens."
        info = self._info()
        return obs, info["score"] - before, info["won"], False, info

    def clone_state(self) -> int:
        return self.done

    def restore_state(self, state: int) -> None:
        self.done = state

    def close(self) -> None:
        pass


class ScriptedAgent:
    """Enough of an Agent for ``run_episodes``: plays ``PLAN`` whatever it sees."""

    name = "scripted"
    config = AgentConfig(mode="choose", role="weak")

    def act(self, states: list[EpisodeState], samplers: list[Sampler], rngs: list) -> list[Decision]:
        return [
            Decision(PLAN[len(s.turns)], "", PLAN[len(s.turns)], True, 0, 0, 0.0, "choose") for s in states
        ]


def _played(traj: Trajectory) -> list[tuple]:
    return [(s.action, s.observation, s.reward, s.score, s.admissible) for s in traj.steps]


def test_rollout_demos_and_search_record_the_same_episode() -> None:
    demo = expert_trajectory(FiveGame(), "room/0")
    (rollout,) = run_episodes(ScriptedAgent(), FiveGame, [EpisodeSpec("room/0", Sampler(), 0)], max_steps=10)

    def plan_policy(state: EpisodeState) -> PolicyOutput:
        return PolicyOutput((Proposal(PLAN[len(state.turns)], 1.0),))

    result = expand_online(
        TrajectoryTree("room/0"), FiveGame(), plan_policy, OnlineSearchConfig(iterations=1)
    )
    (search,) = result.trajectories
    for traj in (demo, rollout, search):
        assert (traj.return_, traj.success, traj.end) == (1.0, True, "won")  # never 1/5
        assert _played(traj) == _played(demo)
        assert traj.instruction == "Get out." and traj.initial_observation == "A locked room."
    assert [t.env_id for t in (demo, rollout, search)] == ["w2s/Five-v0"] * 3
    assert demo.steps[0].admissible == ("look", "take key")  # the commands of the state acted in


@pytest.mark.parametrize(
    ("info", "terminated", "reward_sum", "expected"),
    [
        ({"score": 0.4, "max_score": 5}, False, 0.0, (0.4, False, "truncated")),
        ({"score": 1.0, "won": True, "max_score": 5}, True, 0.0, (1.0, True, "won")),
        ({"score": 0.2, "lost": True}, True, 0.0, (0.2, False, "lost")),
        ({"score": 0.2}, True, 0.0, (0.2, False, "lost")),  # terminated without a win is a loss
        ({}, False, 0.75, (0.75, False, "truncated")),  # no score: the rewards' sum
        ({"score": 1.7}, False, 0.0, (1.0, False, "truncated")),  # clipped to [0, 1]
        ({"score": -3.0}, False, 0.0, (0.0, False, "truncated")),
        ({"score": math.nan}, False, 0.0, (0.0, False, "truncated")),
    ],
)
def test_outcome_rule(info: dict, terminated: bool, reward_sum: float, expected: tuple) -> None:
    out = episode_outcome(info, terminated, reward_sum)
    assert (out.return_, out.success, out.end) == expected


def test_recorder_state_steps_and_errors() -> None:
    env = FiveGame()
    rec, info = EpisodeRecorder.reset(env, "room/0", Source(model="m", role="weak"))
    assert rec.state() == EpisodeState("Get out.", "A locked room.", (), ("look", "take key"), "verb object")
    obs, reward, *_, info = env.step("look")
    rec.step("look", obs, reward, info, thought="first look", tokens_in=7, extra={"k": 1})
    state = rec.state()
    assert state.turns == (("first look", "look", "Nothing happens."),) and state.observation == obs
    assert rec.steps[0].tokens_in == 7 and dict(rec.steps[0].extra) == {"k": 1}
    failed = rec.finish(error="step 2: RuntimeError: boom")
    assert (failed.end, failed.success, failed.extra["error"]) == (
        "error",
        False,
        "step 2: RuntimeError: boom",
    )
    ended = rec.finish()  # with the last info recorded: not over yet
    assert ended.end == "truncated" and ended.num_steps == 1


class KeyedFiveGame(FiveGame):
    """FiveGame whose env reports state keys: the number of plan steps done (failed actions change nothing)."""

    def _info(self) -> dict[str, Any]:
        return {**super()._info(), "state_key": f"done-{self.done}"}


def test_recorder_stores_the_state_keys() -> None:
    demo = expert_trajectory(KeyedFiveGame(), "room/0")
    (rollout,) = run_episodes(
        ScriptedAgent(), KeyedFiveGame, [EpisodeSpec("room/0", Sampler(), 0)], max_steps=10
    )
    for traj in (demo, rollout):
        assert traj.initial_state_key == "done-0"
        assert [s.state_key for s in traj.steps] == ["done-1", "done-2", "done-3"]
    env = KeyedFiveGame()
    rec, _ = EpisodeRecorder.reset(env, "room/0", Source(model="m", role="weak"))
    for action in ("look", "take key", "dance"):
        obs, reward, *_, info = env.step(action)
        rec.step(action, obs, reward, info)
    traj = rec.finish()
    assert traj.initial_state_key == "done-0"
    assert [s.state_key for s in traj.steps] == ["done-0", "done-1", "done-1"]  # a loop shows in its keys
    # envs without keys (or with unusable ones) leave them unset
    assert expert_trajectory(FiveGame(), "room/0").initial_state_key is None
    rec.step("look", "x", 0.0, {"state_key": ""})
    rec.step("look", "x", 0.0, {"state_key": 7})
    assert [s.state_key for s in rec.steps[-2:]] == [None, None]
