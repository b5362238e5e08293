"""State keys: the TextWorld key on generated games (same state = same key, whatever the path), the env
contract (off switch, plugin envs without the hook, restore), and the Z-machine layout reader."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from w2s_agents.envs.base import STATE_KEY_HEX_DIGITS, EngineStatus, TextEnv, UnknownTaskError, hash_state
from w2s_agents.envs.textworld_env import TextWorldEnv
from w2s_agents.envs.zmachine import WorldLayout


@pytest.fixture()
def env(game_cache_dir: Path, tw_test_suites: dict) -> TextWorldEnv:
    e = TextWorldEnv(cache_dir=game_cache_dir, max_steps=200)
    yield e
    e.close()


def _keys(env: TextWorldEnv, actions: list[str]) -> list[str]:
    return [env.step(a)[4]["state_key"] for a in actions]


def _exits(info: dict) -> list[str]:
    return [c for c in info["admissible_commands"] if c.startswith("go ")]


OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}
TASKS = [
    f"test-{c}/{s}" for c in ("tw-simple", "tw-coin_collector", "custom") for s in ("train/0", "valid/0")
]


@pytest.mark.parametrize("task", TASKS)
def test_first_key_is_stable_across_resets_and_envs(env: TextWorldEnv, task: str) -> None:
    _, info = env.reset(options={"task": task})
    key = info["state_key"]
    assert isinstance(key, str) and len(key) == STATE_KEY_HEX_DIGITS
    env.step("look")
    assert env.reset()[1]["state_key"] == key
    # another env, without TextWorld's state tracking, sees the same state
    other = TextWorldEnv(cache_dir=env.cache.root, admissible_commands=False, expert_plan=False)
    assert other.reset(options={"task": task})[1]["state_key"] == key
    other.close()


@pytest.mark.parametrize("task", TASKS)
def test_a_move_and_its_inverse_return_to_the_same_key(env: TextWorldEnv, task: str) -> None:
    _, info = env.reset(options={"task": task})
    plan = iter(info["expert_plan"])
    while not _exits(info):  # follow the walkthrough until a door is open
        *_, info = env.step(next(plan))
    start, score = info["state_key"], info["raw_score"]
    for go in _exits(info):
        inverse = f"go {OPPOSITE[go.split()[1]]}"
        there, back, there_again, back_again = _keys(env, [go, inverse, go, inverse])
        assert there != start  # another room
        assert (there_again, back_again) == (there, back)  # visiting a room is history, not state
        if env.clone_state().status.raw_score == score:
            assert back == start, (task, go)
        else:  # tw-simple scores the first walk through its quest's door: same room, another score
            assert back != start and task.startswith("test-tw-simple")
    # and again with the move counter much further on
    _keys(env, ["look"] * 5)
    assert _keys(env, [go, inverse])[1] == back


@pytest.mark.parametrize("task", TASKS)
def test_steps_that_change_nothing_keep_the_key(env: TextWorldEnv, task: str) -> None:
    _, info = env.reset(options={"task": task})
    start = info["state_key"]
    walls = [f"go {d}" for d in OPPOSITE if f"go {d}" not in info["admissible_commands"]]
    examine = [c for c in info["admissible_commands"] if c.startswith("examine")]
    idle = ["look", "inventory", "", "xyzzy", "take the moon", *walls, *examine, "look"]
    keys = []
    for action in idle:
        *_, info = env.step(action)
        keys.append(info["state_key"])
        assert info["moves"] == len(keys)  # the move counter runs, the key does not
    assert keys == [start] * len(idle), list(zip(idle, keys, strict=True))


def _put_back(info: dict, thing: str, source: str) -> str:
    return next(
        c
        for c in info["admissible_commands"]
        if c in (f"insert {thing} into {source}", f"put {thing} on {source}")
    )


def test_taking_an_object_changes_the_key_and_putting_it_back_restores_it(env: TextWorldEnv) -> None:
    _, info = env.reset(options={"task": "test-custom/train/0"})
    start = info["state_key"]
    take = next(c for c in info["admissible_commands"] if c.startswith("take ") and " from " in c)
    thing, source = take.removeprefix("take ").split(" from ")
    *_, info = env.step(take)
    assert info["state_key"] != start and info["score"] == 0
    *_, info = env.step(_put_back(info, thing, source))
    assert info["state_key"] == start  # Inform 7's "handled" flag is history: the world is as it was


def test_two_orders_reaching_the_same_state_give_the_same_key(
    env: TextWorldEnv, tw_test_suites: dict
) -> None:
    """Take two things in either order: the same world (only the order of the inventory list differs)."""
    found = 0
    for task in [f"test-custom/{s}" for s in ("train/0", "train/1", "valid/0", "test/0")] + [
        f"test-tw-cooking/{s}" for s in ("train/0", "train/1", "valid/0", "test/0")
    ]:
        _, info = env.reset(options={"task": task})
        opens = [c for c in info["admissible_commands"] if c.startswith("open ")]
        for action in opens:
            *_, info = env.step(action)
        takes = [c for c in info["admissible_commands"] if c.startswith("take ")]
        if len(takes) < 2:
            continue
        a, b = takes[:2]
        env.reset()
        _keys(env, opens)
        one = _keys(env, [a, b])[1]
        env.reset()
        _keys(env, opens)
        other = _keys(env, [b, a])[1]
        assert one == other, (task, a, b)
        assert len({one, env.reset()[1]["state_key"]}) == 2
        found += 1
    assert found, "no test game has two things to take in the first room"


def test_the_score_enters_the_key(env: TextWorldEnv) -> None:
    """The cooking game scores a point for carrying the ingredient; putting it back leaves the objects as
    they were, but not the score (nor the quest it completed), so the key differs."""
    _, info = env.reset(options={"task": "test-tw-cooking/train/0"})
    plan = info["expert_plan"]
    i = next(i for i, c in enumerate(plan) if c.startswith("take ") and " from " in c)
    thing, source = plan[i].removeprefix("take ").split(" from ")
    before = _keys(env, plan[:i])[-1]
    _, reward, *_, info = env.step(plan[i])
    assert reward > 0
    *_, info = env.step(_put_back(info, thing, source))
    assert info["raw_score"] > 0 and plan[i] in info["admissible_commands"]  # back where it was
    assert info["state_key"] != before


def test_a_question_of_the_parser_is_part_of_the_state(env: TextWorldEnv) -> None:
    """After "take" the parser asks what to take and the next input is the answer ("carrot" takes it, where it
    would otherwise be no verb at all): a state of its own, though the world has not changed."""
    _, info = env.reset(options={"task": "test-tw-cooking/valid/0"})
    opened = _keys(env, ["open fridge"])[0]
    obs, *_, info = env.step("take")
    assert obs == "What do you want to take?" and info["state_key"] != opened
    asked = info["state_key"]
    assert _keys(env, ["look"]) == [opened]  # a command instead of an answer: the question is dropped
    assert _keys(env, ["examine"])[0] not in (opened, asked)  # another question
    assert _keys(env, ["look"]) == [opened]
    env.reset()
    assert _keys(env, ["open fridge", "take"]) == [opened, asked]  # the same question on the same world
    obs, *_, info = env.step("carrot")
    assert "carrot" in obs and info["state_key"] not in (opened, asked)


def test_a_won_game_has_one_key_whatever_the_path(env: TextWorldEnv) -> None:
    ends = set()
    for detour in ([], ["look", "inventory", "xyzzy"]):
        _, info = env.reset(options={"task": "test-tw-coin_collector/train/0"})
        for action in [*detour, *info["expert_plan"]]:
            obs, *_, info = env.step(action)
        assert info["won"] and "turns" in obs  # the closing text counts the turns; the key does not
        ends.add(info["state_key"])
    assert len(ends) == 1


def _textworld_world(env: TextWorldEnv, info: dict) -> tuple:
    """TextWorld's own account of the state: the facts of its logic engine (tracked while admissible
    commands are computed), with the score and the outcome."""
    (progression,) = [
        vars(layer)["_game_progression"] for layer in env._layers() if "_game_progression" in vars(layer)
    ]
    return frozenset(map(str, progression.state.facts)), info["raw_score"], info["won"], info["lost"]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["test-tw-cooking/valid/0", "test-custom/test/0", "test-tw-simple/valid/0"])
def test_keys_match_textworlds_own_world_state(env: TextWorldEnv, task: str) -> None:
    """Property over seeded random walks: two states share a key exactly when TextWorld's logic engine sees the
    same facts and score (no two states merged, no state split)."""
    rng = random.Random(task)
    worlds: dict[str, tuple] = {}
    keys: dict[tuple, str] = {}
    for _ in range(4):
        _, info = env.reset(options={"task": task})
        for _ in range(40):
            world = _textworld_world(env, info)
            assert worlds.setdefault(info["state_key"], world) == world  # no merge
            assert keys.setdefault(world, info["state_key"]) == info["state_key"]  # no split
            if info["won"] or info["lost"]:
                break
            *_, info = env.step(rng.choice([*info["admissible_commands"], "look", "inventory", "xyzzy"]))
    assert len(worlds) > 10


def test_restore_brings_back_the_key(env: TextWorldEnv) -> None:
    _, info = env.reset(options={"task": "test-tw-simple/train/0"})
    keys = _keys(env, info["expert_plan"][:2])
    state = env.clone_state()
    assert state.state_key == keys[-1]
    continuation = _keys(env, ["look", *info["expert_plan"][2:]])
    env.restore_state(state)
    assert env.clone_state().state_key == keys[-1]
    assert _keys(env, ["look", *info["expert_plan"][2:]]) == continuation  # computed from the engine again
    # a state restored by replay has the same keys
    env.restore_state(type(state)(**{**state.__dict__, "engine": None}))
    assert _keys(env, ["look", *info["expert_plan"][2:]]) == continuation


def test_the_key_can_be_turned_off(game_cache_dir: Path, tw_test_suites: dict, monkeypatch) -> None:
    env = TextWorldEnv(cache_dir=game_cache_dir, state_key=False)
    calls = []
    monkeypatch.setattr(env, "_engine_state_key", lambda status: calls.append(status) or "x")
    _, info = env.reset(options={"task": "test-tw-simple/train/0"})
    assert info["state_key"] is None and env.step("look")[4]["state_key"] is None
    assert env.clone_state().state_key is None
    assert not calls  # not computed at all
    env.state_key = True
    assert env.step("look")[4]["state_key"] == "x"
    env.close()


class _Counter(TextEnv):
    """A plugin env without the state-key hook."""

    env_id = "toy/Counter-v0"

    def default_task(self) -> str:
        return "count/3"

    def task_ids(self, split: str | None = None) -> list[str]:
        return ["count/3"]

    def _load_task(self, task_id: str) -> str:
        if task_id != "count/3":
            raise UnknownTaskError(task_id)
        return "Say up three times."

    def _engine_reset(self) -> EngineStatus:
        self.count = 0
        return EngineStatus(f"At {self.count}.", self.count, 3, False, False)

    def _engine_step(self, command: str) -> EngineStatus:
        self.count += command == "up"
        return EngineStatus(f"At {self.count}.", self.count, 3, self.count >= 3, False)


class _KeyedCounter(_Counter):
    def _engine_state_key(self, status: EngineStatus) -> str | None:
        return hash_state(str(self.count))


def test_a_plugin_env_without_the_hook_reports_none() -> None:
    env = _Counter()
    _, info = env.reset()
    assert "state_key" in info and info["state_key"] is None
    assert env.step("up")[4]["state_key"] is None


def test_a_plugin_env_with_the_hook_reports_its_keys() -> None:
    env = _KeyedCounter()
    start = env.reset()[1]["state_key"]
    keys = [env.step(a)[4]["state_key"] for a in ("down", "up", "down", "up")]
    assert keys[0] == start and keys[1] == keys[2] != start and keys[3] not in (start, keys[1])
    state = env.clone_state()
    env.step("up")
    env.restore_state(state)  # by replay: the saved key comes back with the state
    assert env.clone_state().state_key == keys[3]


def test_hash_state_is_stable_and_separates_parts() -> None:
    assert hash_state("ab", "c") != hash_state("a", "bc")
    assert hash_state(b"x", "y") == hash_state("x", b"y")
    assert hash_state("x") == "09f06e81dcd3af44"  # the same in every process and on every machine


def test_layout_reader_refuses_what_it_cannot_read() -> None:
    with pytest.raises(ValueError, match="version 4 or later"):
        WorldLayout.read(bytes([3]) + bytes(100))
    with pytest.raises(ValueError, match="object table"):
        WorldLayout.read(bytes([8]) + bytes(100))


def test_scienceworld_listings_are_compared_without_their_order() -> None:
    from w2s_agents.envs.scienceworld_env import _canonical_listing

    a = "In your inventory, you see:\n\tan orange\n\ta metal pot (containing water)\n"
    b = "In your inventory, you see:\n\ta metal pot (containing water)\n\tan orange\n"
    assert _canonical_listing(a) == _canonical_listing(b)
    room = "This room is called the hallway. In it, you see: \n\tthe agent\n\ta picture\nYou also see:\n\tA door\n"
    moved = "This room is called the hallway. In it, you see: \n\tthe agent\nYou also see:\n\tA door\n\ta picture\n"
    assert _canonical_listing(room) != _canonical_listing(moved)  # a run stays under its heading
