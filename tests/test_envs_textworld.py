"""TextWorld env: generated suites, expert plans, exact clone/restore, caching, robustness to bad actions."""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from w2s_agents.envs.base import ACTION_CHARSET, OBSERVATION_MAX_CHARS, UnknownTaskError, clean_action
from w2s_agents.envs.suites import GameSpec, TextWorldSuite
from w2s_agents.envs.textworld_env import TextWorldEnv
from w2s_agents.envs.textworld_games import GameCache
from w2s_agents.errors import ConfigError, W2SError

CHALLENGES = ["tw-simple", "tw-coin_collector", "tw-treasure_hunter", "tw-cooking", "custom"]

BAD_ACTIONS = [
    "",
    "   ",
    "x" * 10_000,
    "prenez la clé dorée ☃ 🙂",
    "look\x00\x07\x1b[31m\n\r north",
    "\n\n\n",
    "go north; go south",
    "take all",
    "\ud800 lone surrogate",
    "!@#$%^&*()_+{}|:<>?",
    "\\",  # the Z-machine interpreter crashes or hangs on backslashes
    "take \\ coin \\\\ \\n",
]


@pytest.fixture()
def env(game_cache_dir: Path, tw_test_suites: dict) -> TextWorldEnv:
    e = TextWorldEnv(cache_dir=game_cache_dir, max_steps=50)
    yield e
    e.close()


def _play(env: TextWorldEnv, actions: list[str]) -> list[tuple]:
    return [env.step(a) for a in actions]


@pytest.mark.slow
@pytest.mark.parametrize("challenge", CHALLENGES)
def test_expert_plan_wins_every_game_of_a_suite(env: TextWorldEnv, challenge: str) -> None:
    suite = f"test-{challenge}"
    for task_id in [f"{suite}/train/0", f"{suite}/train/1", f"{suite}/valid/0", f"{suite}/test/0"]:
        obs, info = env.reset(options={"task": task_id})
        assert info["task_id"] == task_id
        assert info["instruction"] and env.instruction == info["instruction"]
        assert obs and info["score"] == 0.0 and not info["won"]
        plan = info["expert_plan"]
        assert plan, task_id
        total, steps = 0.0, 0
        for action in plan:
            obs, reward, terminated, truncated, info = env.step(action)
            total += reward
            steps += 1
            # while the agent follows the walkthrough, the plan left is the rest of it
            assert info["expert_plan"] == (plan[steps:] if not terminated else [])
            if terminated or truncated:
                break
        assert terminated and not truncated and info["won"] and not info["lost"], task_id
        assert steps == len(plan)
        assert total == pytest.approx(1.0) and info["score"] == 1.0


def test_splits_use_disjoint_seeds(tw_test_suites: dict) -> None:
    suite: TextWorldSuite = tw_test_suites["tw-simple"]
    seeds = {
        split: {suite.game_spec(split, i).seed for i in range(suite.sizes[split])} for split in suite.sizes
    }
    assert not seeds["train"] & seeds["valid"] and not seeds["train"] & seeds["test"]
    assert not seeds["valid"] & seeds["test"]
    cooking = tw_test_suites["tw-cooking"]
    assert cooking.game_spec("valid", 0).settings["split"] == "valid"  # the cooking challenge's own split


def test_expert_plan_replans_after_a_deviation(env: TextWorldEnv) -> None:
    _, info = env.reset(options={"task": "test-tw-simple/train/0"})
    env.step("inventory")  # not on the walkthrough, does not change the world
    _, _, _, _, info = env.step("look")
    replanned = info["expert_plan"]
    assert replanned, "TextWorld's winning policy should be reported after leaving the walkthrough"
    for action in replanned:
        _, _, terminated, _, info = env.step(action)
    assert terminated and info["won"]


def test_rewards_are_score_deltas_and_infos_are_complete(env: TextWorldEnv) -> None:
    _, info = env.reset(options={"task": "test-tw-simple/train/1"})
    keys = {"task_id", "won", "lost", "score", "raw_score", "max_score", "admissible_commands", "expert_plan"}
    assert keys <= set(info)
    assert info["admissible_commands"] and all(isinstance(c, str) for c in info["admissible_commands"])
    previous = 0.0
    for action in info["expert_plan"]:
        _, reward, _, _, info = env.step(action)
        assert reward == pytest.approx(info["score"] - previous)
        assert info["score"] == pytest.approx(info["raw_score"] / info["max_score"])
        previous = info["score"]
    assert previous == 1.0


def test_step_limit_truncates(game_cache_dir: Path, tw_test_suites: dict) -> None:
    env = TextWorldEnv(cache_dir=game_cache_dir, max_steps=3)
    env.reset(options={"task": "test-tw-simple/train/0"})
    flags = [env.step("look")[2:4] for _ in range(3)]
    assert flags == [(False, False), (False, False), (False, True)]
    _obs, reward, terminated, truncated, _ = env.step("look")  # after the end: nothing changes
    assert reward == 0.0 and truncated and not terminated
    env.close()


def test_infos_are_computed_only_when_asked(game_cache_dir: Path, tw_test_suites: dict) -> None:
    env = TextWorldEnv(cache_dir=game_cache_dir, admissible_commands=False, expert_plan=False)
    _, info = env.reset(options={"task": "test-tw-coin_collector/train/0"})
    assert info["admissible_commands"] is None and info["expert_plan"] is None
    tracking = env._tw._wrapped_env  # TextWorld's StateTracking wrapper
    assert not tracking.tracking  # no per-step state tracking cost
    env.close()


@pytest.mark.slow
@pytest.mark.parametrize("challenge", ["tw-simple", "tw-cooking", "custom"])
def test_restore_gives_the_same_continuation(env: TextWorldEnv, challenge: str) -> None:
    """Property over seeded random action sequences: after restore_state, the same actions give the same
    observations, rewards, flags and infos as they did after clone_state."""
    rng = random.Random(challenge)
    junk = ["look", "inventory", "", "xyzzy", "go north", "take all", "examine room"]
    for trial in range(8):
        task = f"test-{challenge}/train/{trial % 2}"
        _, info = env.reset(options={"task": task})
        plan = info["expert_plan"]
        # a random prefix: part of the walkthrough, admissible commands and junk
        for _ in range(rng.randrange(0, 8)):
            if info["won"] or info["lost"]:
                break
            pool = info["admissible_commands"] + junk + plan[:3]
            *_, info = env.step(rng.choice(pool))
        state = env.clone_state()
        continuation = [
            rng.choice((info["admissible_commands"] or ["look"]) + junk) for _ in range(rng.randrange(1, 8))
        ]
        if rng.random() < 0.5:
            continuation = list(info["expert_plan"] or []) + continuation
        first = _play(env, continuation)
        env.restore_state(state)
        assert env.actions == state.actions
        second = _play(env, continuation)
        assert second == first, (task, state.actions, continuation)
        # restoring twice works too, and on a fresh env of the same class
        other = TextWorldEnv(cache_dir=env.cache.root, max_steps=env.max_steps)
        other.restore_state(state)
        assert _play(other, continuation) == first
        other.close()


def test_replay_fallback_matches_exact_restore(env: TextWorldEnv) -> None:
    _, info = env.reset(options={"task": "test-tw-cooking/train/0"})
    for action in info["expert_plan"][:2]:
        env.step(action)
    exact = env.clone_state()
    replayed = type(exact)(**{**exact.__dict__, "engine": None})
    continuation = ["look", "inventory", *info["expert_plan"][2:]]
    first = _play(env, continuation)
    env.restore_state(replayed)
    assert _play(env, continuation) == first


def test_malformed_actions_never_raise(env: TextWorldEnv) -> None:
    obs, _ = env.reset(options={"task": "test-tw-treasure_hunter/train/0"})
    assert env.observation_space.contains(obs)
    for action in BAD_ACTIONS:
        obs, reward, terminated, _truncated, _info = env.step(action)
        assert isinstance(obs, str) and obs, repr(action)
        assert env.observation_space.contains(obs)
        assert reward == 0.0 and not terminated
    assert env.actions[0] == "" and len(env.actions) == len(BAD_ACTIONS)  # each bad action cost a step
    for action in (None, 42, b"look\xff"):
        env.step(action)  # type: ignore[arg-type]


def test_random_printable_actions_never_crash_the_interpreter(env: TextWorldEnv) -> None:
    """Random text from the whole printable range (the action space's samples, plus backslashes and
    punctuation runs) must not crash or hang the Z-machine."""
    env.reset(options={"task": "test-tw-coin_collector/train/0"})
    env.action_space.seed(0)
    rng = random.Random(0)
    printable = [chr(c) for c in range(0x20, 0x7F)]
    for i in range(300):
        if i % 2:
            action = env.action_space.sample()
        else:
            action = "".join(rng.choice(printable) for _ in range(rng.randint(1, 200)))
        obs, *_ = env.step(action)
        assert isinstance(obs, str)
        if env.clone_state().done:
            env.reset()


def test_clean_action() -> None:
    assert clean_action("  Take  the\tkey\n") == "Take the key"
    assert clean_action("clé") == "cle"
    assert clean_action("a\x00b") == "a b"
    assert len(clean_action("x" * 10_000)) <= 190
    assert clean_action("☃") == ""
    assert clean_action("take \\ coin") == "take coin"
    assert all(c in ACTION_CHARSET for c in clean_action("".join(map(chr, range(300)))))


@pytest.mark.slow
def test_same_spec_twice_gives_identical_games_the_second_time_from_cache(tmp_path: Path) -> None:
    from textworld import Game

    spec = GameSpec("tw-treasure_hunter", seed=7, settings={"level": 3})
    a, b = GameCache(tmp_path / "a"), GameCache(tmp_path / "b")
    assert not a.contains(spec)
    path_a, path_b = a.get(spec), b.get(spec)
    assert path_a.name == path_b.name == f"{spec.key()}.z8"
    game_a, game_b = Game.load(str(path_a.with_suffix(".json"))), Game.load(str(path_b.with_suffix(".json")))
    assert (
        game_a == game_b and game_a.walkthrough == game_b.walkthrough and game_a.objective == game_b.objective
    )
    mtime = path_a.stat().st_mtime_ns
    start = time.perf_counter()
    assert GameCache(tmp_path / "a").get(spec) == path_a
    assert time.perf_counter() - start < 0.5  # found on disk, not regenerated
    assert path_a.stat().st_mtime_ns == mtime
    assert not list((tmp_path / "a").rglob(".gen-*"))  # no temporary files left behind
    other = GameSpec("tw-treasure_hunter", seed=8, settings={"level": 3})
    assert other.key() != spec.key()


@pytest.mark.slow
def test_games_made_in_worker_processes_equal_games_made_here(tmp_path: Path) -> None:
    from textworld import Game

    specs = [GameSpec("tw-coin_collector", seed=s, settings={"level": 1}) for s in (41, 42, 43)]
    here = GameCache(tmp_path / "here")
    made = GameCache(tmp_path / "workers").generate([*specs, specs[0]], workers=2)  # a repeat is made once
    assert made == [GameCache(tmp_path / "workers").path(s) for s in [*specs, specs[0]]]
    for spec, path in zip(specs, made, strict=False):
        assert path.is_file() and path.with_suffix(".json").is_file()
        assert Game.load(str(path.with_suffix(".json"))) == Game.load(
            str(here.get(spec).with_suffix(".json"))
        )
    # the workers' Inform folders are gone, and nothing went to the home folder
    assert not (tmp_path / "workers" / ".inform-home" / "workers").exists()
    assert not (Path(os.environ["HOME"]) / "Inform").exists()
    mtimes = [p.stat().st_mtime_ns for p in made[:3]]
    GameCache(tmp_path / "workers").generate(specs, workers=2)  # all cached: nothing is made again
    assert [p.stat().st_mtime_ns for p in made[:3]] == mtimes


def test_a_game_that_fails_in_a_worker_gets_a_one_line_error(tmp_path: Path, monkeypatch) -> None:
    # a worker whose interpreter cannot import TextWorld's compiler fails; its error names the cause
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "broken"))
    (tmp_path / "broken" / "textworld").mkdir(parents=True)
    (tmp_path / "broken" / "textworld" / "__init__.py").write_text(
        "raise ImportError('textworld is broken')\n"
    )
    specs = [GameSpec("tw-coin_collector", seed=s, settings={"level": 1}) for s in (51, 52)]
    with pytest.raises(W2SError, match=r"game generation failed: .*textworld is broken"):
        GameCache(tmp_path / "c").generate(specs, workers=2)


@pytest.mark.slow
def test_generation_leaves_home_untouched(env: TextWorldEnv, tmp_path: Path) -> None:
    home = Path(os.environ["HOME"])
    env.reset(options={"task": "test-tw-coin_collector/valid/0"})
    GameCache(tmp_path).get(GameSpec("custom", seed=3))
    assert not (home / "Inform").exists()
    assert os.environ["HOME"] == str(home)


def test_bad_task_ids_and_specs_get_one_line_errors(env: TextWorldEnv) -> None:
    with pytest.raises(UnknownTaskError, match="expected <suite>/<split>/<index>"):
        env.reset(options={"task": "nonsense"})
    with pytest.raises(W2SError, match=r"unknown task suite 'nope'; registered: .*tw-simple"):
        env.reset(options={"task": "nope/train/0"})
    with pytest.raises(W2SError, match=r"has games 0\.\.1, not 5"):
        env.reset(options={"task": "test-tw-simple/train/5"})
    with pytest.raises(W2SError, match="unknown split 'dev'"):
        env.reset(options={"task": "test-tw-simple/dev/0"})
    with pytest.raises(ConfigError, match="unknown setting 'lvl' for TextWorld challenge tw-coin_collector"):
        GameSpec("tw-coin_collector", 0, {"lvl": 3})
    with pytest.raises(ConfigError, match="unknown TextWorld challenge 'tw-zork'; valid: "):
        GameSpec("tw-zork", 0)
    with pytest.raises(ConfigError, match="must be int"):
        GameSpec("tw-coin_collector", 0, {"level": "3"})
    with pytest.raises(W2SError, match="unknown reset option"):
        env.reset(options={"tsak": "x"})
    for exc in (UnknownTaskError("x\ny"),):
        assert str(exc) == "x\ny"


def test_observations_fit_the_space(env: TextWorldEnv) -> None:
    obs, _ = env.reset(options={"task": "test-custom/train/0"})
    assert env.observation_space.max_length == OBSERVATION_MAX_CHARS
    assert env.observation_space.contains(obs)
    assert not obs.rstrip().endswith(">")  # the interpreter's prompt is not part of the observation


_POOL = ["look", "inventory", "", "xyzzy", "go north", "go east", "go west", "take all", "open door"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prefix=st.lists(st.integers(min_value=0, max_value=40), max_size=10),
    continuation=st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=8),
)
@pytest.mark.slow
def test_restore_property(env: TextWorldEnv, prefix: list[int], continuation: list[int]) -> None:
    """Hypothesis: any prefix and continuation (indices into walkthrough + admissible commands + junk)."""

    def pick(i: int, info: dict) -> str:
        pool = list(info["expert_plan"] or []) + _POOL + list(info["admissible_commands"] or [])
        return pool[i % len(pool)]

    _, info = env.reset(options={"task": "test-tw-simple/train/0"})
    for i in prefix:
        *_, info = env.step(pick(i, info))
    state = env.clone_state()
    first, actions = [], []
    for i in continuation:
        actions.append(pick(i, first[-1][4] if first else info))
        first.append(env.step(actions[-1]))
    env.restore_state(state)
    assert [env.step(a) for a in actions] == first


def test_state_restores_on_an_env_with_another_cache(env: TextWorldEnv, tmp_path: Path) -> None:
    task = "test-tw-treasure_hunter/train/1"
    _, info = env.reset(options={"task": task})
    env.step("look")
    state = env.clone_state()
    first = _play(env, ["inventory", *info["expert_plan"]])
    src = env.game_path(task)
    dst = tmp_path / src.parent.name
    dst.mkdir()
    for suffix in (".z8", ".json"):
        shutil.copy(src.with_suffix(suffix), dst / src.with_suffix(suffix).name)
    other = TextWorldEnv(cache_dir=tmp_path)
    other.restore_state(state)
    assert other._game_path != env._game_path
    assert _play(other, ["inventory", *info["expert_plan"]]) == first
    other.close()


@pytest.mark.slow
def test_first_observation_drops_the_title_art(game_cache_dir):
    from w2s_agents.envs import make_env

    plain = make_env("w2s/TextWorld-v0", cache_dir=game_cache_dir)
    with_banner = make_env("w2s/TextWorld-v0", cache_dir=game_cache_dir, banner=True)
    obs, _ = plain.reset(options={"task": "tw-simple/train/0"})
    full, _ = with_banner.reset(options={"task": "tw-simple/train/0"})
    assert "$$$$" in full and "$$$$" not in obs
    assert full.endswith(obs) and len(obs) < len(full) - 1000
    assert any(c.isalpha() for c in obs.split("\n", 1)[0])  # the text starts at once
