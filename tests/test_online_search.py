"""Online expansion with PUCT on a small fake text game whose optimal answer is known."""

from __future__ import annotations

import pytest

from w2s_agents.search import (
    OnlineSearchConfig,
    PolicyOutput,
    Proposal,
    SearchEnv,
    best_path,
    expand_online,
    node_values,
    puct_score,
)
from w2s_agents.tree import TrajectoryTree, build_trees
from w2s_agents.types import EpisodeState

# (room, has key) -> {action: (next room, has key, score, terminated, won)}
GAME = {
    ("hall", False): {
        "go north": ("kitchen", False, 0.0, False, False),
        "go south": ("pit", False, 0.0, True, False),
        "look": ("hall", False, 0.0, False, False),
    },
    ("kitchen", False): {
        "take key": ("kitchen", True, 0.5, False, False),
        "go south": ("hall", False, 0.0, False, False),
    },
    ("kitchen", True): {
        "go east": ("vault", True, 1.0, True, True),
        "go south": ("hall", True, 0.5, False, False),
    },
    ("hall", True): {
        "go north": ("kitchen", True, 0.5, False, False),
        "go south": ("pit", True, 0.5, True, False),
    },
}
OPTIMAL = ["go north", "take key", "go east"]


class FakeGame:
    """Deterministic text game: find the key in the kitchen, then the vault east of it (score 1)."""

    def __init__(self, max_steps: int = 8) -> None:
        self.max_steps = max_steps
        self.state = ("hall", False, 0.0, 0)

    def _obs(self) -> str:
        room, key, _, _ = self.state
        return f"You are in the {room}." + (" You carry a key." if key else "")

    def reset(self, *, seed=None, options=None):
        assert options == {"task": "house/0"}
        self.state = ("hall", False, 0.0, 0)
        return self._obs(), {"admissible_commands": sorted(GAME[("hall", False)])}

    def step(self, action: str):
        room, key, score, steps = self.state
        moves = GAME[(room, key)]
        steps += 1
        if action not in moves:
            self.state = (room, key, score, steps)
            return "Nothing happens.", 0.0, False, steps >= self.max_steps, {"score": score, "won": False}
        room2, key2, score2, terminated, won = moves[action]
        self.state = (room2, key2, score2, steps)
        obs = "You win!" if won else ("You fall into a pit." if room2 == "pit" else self._obs())
        info = {"score": score2, "max_score": 1.0, "won": won, "lost": terminated and not won}
        return obs, score2 - score, terminated, steps >= self.max_steps and not terminated, info


class ClonableGame(FakeGame):
    def clone_state(self):
        return self.state

    def restore_state(self, state) -> None:
        self.state = state


def policy_for(prefer: dict[str, str]):
    """A policy that puts 0.8 of its prior on ``prefer[room]`` and spreads the rest; 10 tokens a call."""

    def policy(state: EpisodeState) -> PolicyOutput:
        last = state.observation
        room = "kitchen" if "kitchen" in last else "hall"
        key = "key" in last
        actions = sorted(GAME.get((room, key), {}))
        liked = prefer.get(room)
        props = [Proposal(a, 0.8 if a == liked else 0.2 / max(len(actions) - 1, 1)) for a in actions]
        return PolicyOutput(tuple(props), tokens=10)

    return policy


UNIFORM = policy_for({})
MISLEADING = policy_for({"hall": "go south", "kitchen": "go south"})


def test_fake_game_fits_the_protocol() -> None:
    assert isinstance(FakeGame(), SearchEnv)
    assert puct_score(0.5, 0.25, 4, 1, 2.0) == 0.5 + 2.0 * 0.25 * 2 / 2


@pytest.mark.parametrize("env_cls", [FakeGame, ClonableGame])
@pytest.mark.parametrize("policy", [UNIFORM, MISLEADING])
def test_online_search_finds_the_optimal_path(env_cls, policy) -> None:
    tree = TrajectoryTree("house/0", instruction="Open the vault.")
    result = expand_online(tree, env_cls(), policy, OnlineSearchConfig(iterations=40, max_depth=6))
    path = best_path(tree, node_values(tree, "mcts"))
    assert [tree.action(n) for n in path[1:]] == OPTIMAL
    assert tree.terminal(path[-1]) == {"won": 1}
    assert result.new_nodes == len(tree) - 1
    assert all(t.source.role == "search" for t in result.trajectories)
    assert all(set(tree.sources(n)) == {"search"} for n in range(len(tree)))


def test_replay_and_clone_give_the_same_tree_clone_saves_steps() -> None:
    cfg = OnlineSearchConfig(iterations=25, max_depth=6)
    a, b = TrajectoryTree("house/0"), TrajectoryTree("house/0")
    ra = expand_online(a, FakeGame(), UNIFORM, cfg)
    rb = expand_online(b, ClonableGame(), UNIFORM, cfg)
    assert a.to_json() == b.to_json()
    assert rb.env_steps < ra.env_steps


def test_online_search_is_deterministic() -> None:
    cfg = OnlineSearchConfig(iterations=30, max_depth=6, seed=4)
    a, b = TrajectoryTree("house/0"), TrajectoryTree("house/0")
    expand_online(a, FakeGame(), MISLEADING, cfg)
    expand_online(b, FakeGame(), MISLEADING, cfg)
    assert a.to_json() == b.to_json()


def test_budgets_are_respected() -> None:
    tree = TrajectoryTree("house/0")
    cfg = OnlineSearchConfig(iterations=1000, max_env_steps=30, max_depth=6)
    r = expand_online(tree, FakeGame(), UNIFORM, cfg)
    # no iteration starts over budget; the last replay may pass it by at most the depth limit
    assert 30 <= r.env_steps <= 30 + cfg.max_depth
    tree = TrajectoryTree("house/0")
    r = expand_online(tree, FakeGame(), UNIFORM, OnlineSearchConfig(iterations=1000, max_tokens=55))
    assert 55 <= r.tokens <= 55 + 10 and r.iterations < 1000


def test_search_grows_a_data_tree_and_keeps_its_statistics(make_traj) -> None:
    weak = [
        make_traj(
            [("go south", "You fall into a pit.")], 0.0, "lost", seed=1, initial="You are in the hall."
        ),
        make_traj(
            [("go north", "You are in the kitchen."), ("go south", "You are in the hall.")],
            0.0,
            "truncated",
            seed=2,
            initial="You are in the hall.",
        ),
    ]
    tree = build_trees(weak)["house/0"]
    before = {n: tree.visits(n) for n in range(len(tree))}
    assert before[0] == 2
    expand_online(tree, ClonableGame(), UNIFORM, OnlineSearchConfig(iterations=30, max_depth=6))
    path = best_path(tree, node_values(tree, "mcts"))
    assert [tree.action(n) for n in path[1:]] == OPTIMAL
    assert tree.sources(0)["weak"] == 2 and tree.sources(0)["search"] == tree.visits(0) - 2
    assert tree.terminal(path[-1]) == {"won": tree.visits(path[-1])}


class ScoredFiveGame(ClonableGame):
    """The same game on an engine whose raw maximum score is 5: ``info["score"]`` is already normalised (DESIGN
    section 7), ``info["max_score"]`` is the engine's raw maximum."""

    def step(self, action: str):
        obs, reward, terminated, truncated, info = super().step(action)
        return obs, reward, terminated, truncated, {**info, "max_score": 5}


def test_a_won_search_episode_has_return_one_whatever_the_engines_max_score() -> None:
    tree = TrajectoryTree("house/0", instruction="Open the vault.")
    result = expand_online(tree, ScoredFiveGame(), UNIFORM, OnlineSearchConfig(iterations=40, max_depth=6))
    won = [t for t in result.trajectories if t.success]
    assert won, "the search should win the game"
    assert {t.return_ for t in won} == {1.0}  # not 1/5: the score is normalised once, by the env
    path = best_path(tree, node_values(tree, "mcts"))
    assert tree.mean_return(path[-1]) == 1.0
    # a key taken, then a fall into the pit: half the score, lost
    lost = [t for t in result.trajectories if t.end == "lost" and t.steps[-1].score == 0.5]
    assert all(t.return_ == 0.5 for t in lost)


def test_the_policy_sees_the_episode_state_with_actions_as_played() -> None:
    odd = "look\nAction: go south"  # an action that a rendered conversation would split in two
    seen: list[EpisodeState] = []

    def policy(state: EpisodeState) -> PolicyOutput:
        seen.append(state)
        if not state.turns:
            return PolicyOutput((Proposal(odd, 1.0, "Thought: hmm"),), tokens=1)
        return PolicyOutput((Proposal("go south", 1.0),), tokens=1)

    tree = TrajectoryTree("house/0")
    expand_online(tree, ClonableGame(), policy, OnlineSearchConfig(iterations=3, max_depth=4))
    later = [s for s in seen if s.turns]
    assert later and all(s.turns[0][:2] == ("Thought: hmm", odd) for s in later)
    assert later[0].turns[0][2] == "Nothing happens."
    assert seen[0].admissible == tuple(sorted(GAME[("hall", False)]))


def test_search_episodes_keep_the_state_keys_also_after_a_restore() -> None:
    class KeyedGame(ClonableGame):
        def _key(self) -> str:
            room, key, _, _ = self.state
            return f"{room}/{key}"

        def reset(self, *, seed=None, options=None):
            obs, info = super().reset(seed=seed, options=options)
            return obs, {**info, "state_key": self._key()}

        def step(self, action: str):
            obs, reward, terminated, truncated, info = super().step(action)
            return obs, reward, terminated, truncated, {**info, "state_key": self._key()}

    tree = TrajectoryTree("house/0")
    result = expand_online(tree, KeyedGame(), UNIFORM, OnlineSearchConfig(iterations=20, max_depth=6))
    assert len(result.trajectories) > 3
    for traj in result.trajectories:
        assert traj.initial_state_key == "hall/False"
        assert all(s.state_key is not None for s in traj.steps)
    assert tree.has_state_keys and tree.state_key(0) == "hall/False"
