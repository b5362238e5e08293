"""TextWorld game generation: a time limit that stops it, no lock held while a game is made, scratch folders
removed on every exit path, and challenge settings checked against TextWorld's limits before generation.

HOME points at a temporary folder (conftest), and every cache here lives under ``tmp_path``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from w2s_agents.envs.suites import GameSpec, TextWorldSuite
from w2s_agents.envs.textworld_games import GameCache
from w2s_agents.errors import ConfigError, W2SError
from w2s_agents.pipeline.experiment import load_experiment

# a custom game whose quest search takes minutes (100 rooms), and a small one that takes seconds
COSTLY = GameSpec("custom", seed=0, settings={"world_size": 100, "quest_length": 3})
QUICK = GameSpec("tw-coin_collector", seed=5, settings={"level": 1})


def _scratch(root: Path) -> list[Path]:
    return sorted([*root.glob(".gen-*"), *root.glob("*/.gen-*")])


def _wait_for(cond, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _worker_pid(folder: Path) -> int:
    return int(folder.name.split("-")[1])  # .gen-<pid>-<random>


def test_a_game_past_the_time_limit_is_stopped_with_a_one_line_error(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(W2SError) as err:
        GameCache(tmp_path, timeout_s=1.5).get(COSTLY)
    message = str(err.value)
    assert "\n" not in message
    assert "custom game with seed 0" in message and "world_size': 100" in message
    assert "longer than 1.5s" in message and "tasks.generation_timeout_s" in message
    assert time.monotonic() - start < 30  # stopped, not left to search for minutes
    assert _scratch(tmp_path) == []
    assert not GameCache(tmp_path).contains(COSTLY)


@pytest.mark.slow
def test_no_lock_is_held_while_a_game_is_made_and_one_copy_of_a_game_made_twice_is_kept(
    tmp_path: Path,
) -> None:
    cache = GameCache(tmp_path)
    results: dict[str, object] = {}

    def get(name: str, spec: GameSpec) -> None:
        try:
            results[name] = cache.get(spec)
        except W2SError as exc:
            results[name] = exc

    slow = threading.Thread(target=get, args=("slow", COSTLY), daemon=True)
    slow.start()
    _wait_for(lambda: len(_scratch(tmp_path)) == 1, 60, "the costly game's worker started")
    (slow_scratch,) = _scratch(tmp_path)
    # two makers of the same small game while the costly one is being made: neither waits for it
    quick = [threading.Thread(target=get, args=(f"quick{i}", QUICK), daemon=True) for i in range(2)]
    for t in quick:
        t.start()
    for t in quick:
        t.join(180)
    assert not any(t.is_alive() for t in quick), "a generation waited for another one to finish"
    assert slow.is_alive() and slow_scratch.is_dir()  # still making its game, its scratch folder untouched
    assert results["quick0"] == results["quick1"] == cache.path(QUICK)
    made = sorted(p.name for p in (tmp_path / QUICK.challenge).iterdir())
    assert made == [f"{QUICK.key()}.json", f"{QUICK.key()}.z8"]  # one whole game, the other copy discarded
    from textworld import Game

    assert Game.load(str(cache.path(QUICK).with_suffix(".json"))).walkthrough
    # a worker killed from outside: the caller gets an error and the worker's scratch folder is removed
    os.kill(_worker_pid(slow_scratch), signal.SIGKILL)
    slow.join(30)
    assert not slow.is_alive()
    assert isinstance(results["slow"], W2SError) and "game generation failed" in str(results["slow"])
    assert _scratch(tmp_path) == []


_MAKER = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
from w2s_agents.envs.suites import GameSpec
from w2s_agents.envs.textworld_games import GameCache
GameCache(sys.argv[1]).get(GameSpec("custom", seed=0, settings={"world_size": 100, "quest_length": 3}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])  # SIGKILL: as SIGTERM (no handler)
def test_a_stopped_generation_leaves_no_scratch_folder_or_worker(tmp_path: Path, sig: signal.Signals) -> None:
    maker = subprocess.Popen([sys.executable, "-c", _MAKER, str(tmp_path)], stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: len(_scratch(tmp_path)) == 1, 60, "the worker started")
        worker = _worker_pid(_scratch(tmp_path)[0])
        maker.send_signal(sig)
        maker.wait(30)
        # Ctrl-C: the maker stops its worker; SIGTERM or SIGKILL: the worker sees its parent gone
        _wait_for(lambda: not _alive(worker) and _scratch(tmp_path) == [], 15, "worker and scratch gone")
    finally:
        maker.kill()
        maker.wait()


def test_scratch_folders_of_dead_processes_are_removed_at_the_next_start(tmp_path: Path, monkeypatch) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = tmp_path / f".gen-{gone.pid}-abc"
    (dead / "home").mkdir(parents=True)
    legacy = tmp_path / "custom" / ".gen-x1y2z3"  # an older version's folder, last touched two hours ago
    legacy.mkdir(parents=True)
    os.utime(legacy, (time.time() - 7200, time.time() - 7200))
    fresh_legacy = tmp_path / "custom" / ".gen-a1b2c3"  # maybe in use: kept
    fresh_legacy.mkdir()
    # the next generation starts (a worker that cannot import TextWorld fails at once)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "broken"))
    (tmp_path / "broken" / "textworld").mkdir(parents=True)
    (tmp_path / "broken" / "textworld" / "__init__.py").write_text(
        "raise ImportError('textworld is broken')\n"
    )
    with pytest.raises(W2SError, match="textworld is broken"):
        GameCache(tmp_path).get(QUICK)
    assert _scratch(tmp_path) == [fresh_legacy]


@pytest.mark.parametrize(
    ("challenge", "settings", "message"),
    [
        (
            "tw-coin_collector",
            {"level": 160},
            r"'level' .* must be in 1\.\.100, 101\.\.150, 201\.\.233 .*100 rooms",
        ),
        ("tw-coin_collector", {"level": 0}, r"'level' .* must be in 1\.\.100"),
        ("tw-treasure_hunter", {"level": 31}, r"'level' .* must be in 1\.\.30, got 31"),
        ("tw-simple", {"rewards": "often"}, r"'rewards' .* must be one of dense, balanced, sparse"),
        ("tw-simple", {"goal": "vague"}, r"'goal' .* must be one of detailed, brief, none"),
        ("tw-cooking", {"go": 7}, r"'go' .* must be one of 1, 6, 9, 12, got 7"),
        ("tw-cooking", {"recipe": 6}, r"'recipe' .* must be in 1\.\.5"),
        ("tw-cooking", {"recipe": 2, "take": 3}, r"'take' .* must be in 0\.\.2"),
        ("tw-cooking", {"recipe_seed": 4, "take": 0}, r"'take' .* must be >= 1 when recipe_seed > 0"),
        ("tw-cooking", {"split": "dev"}, r"'split' .* must be one of train, valid, test"),
        ("custom", {"world_size": 101}, r"'world_size' .* must be in 1\.\.100 .*100 rooms"),
        ("custom", {"world_size": 0}, r"'world_size' .* must be in 1\.\.100"),
        ("custom", {"quest_length": 0}, r"'quest_length' .* must be >= 1"),
        ("custom", {"quest_length": 2, "quest_breadth": 3}, r"'quest_breadth' .* must be in 1\.\.2"),
        ("custom", {"nb_objects": -1}, r"'nb_objects' .* must be >= 0"),
    ],
)
def test_settings_outside_textworlds_limits_are_refused_before_generation(
    challenge: str, settings: dict, message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        GameSpec(challenge, seed=0, settings=settings)
    assert "\n" not in str(err.value) and challenge in str(err.value)
    with pytest.raises(ConfigError, match=message):  # a suite is refused when it is made
        TextWorldSuite("acme", challenge, settings)


def test_settings_at_textworlds_limits_are_accepted() -> None:
    for challenge, settings in [
        ("tw-coin_collector", {"level": 100}),
        ("tw-coin_collector", {"level": 150}),
        ("tw-coin_collector", {"level": 233}),
        ("tw-treasure_hunter", {"level": 30}),
        ("tw-cooking", {"recipe": 5, "take": 5, "go": 12, "recipe_seed": 3}),
        ("custom", {"world_size": 100, "quest_length": 2, "quest_breadth": 2, "nb_objects": 0}),
    ]:
        assert (
            GameSpec(challenge, seed=0, settings=settings).settings[next(iter(settings))]
            == settings[next(iter(settings))]
        )


@pytest.mark.parametrize("value", ["0", "-5", "inf", "nan"])
def test_the_generation_timeout_key_is_checked(value: str) -> None:
    with pytest.raises(ConfigError, match=r"'generation_timeout_s' must be a positive number of seconds"):
        load_experiment(None, [f"tasks.generation_timeout_s={value}"])
    with pytest.raises(W2SError, match="timeout_s must be a positive number"):
        GameCache(timeout_s=float(value))


def test_the_generation_timeout_does_not_change_the_tasks_stage_key() -> None:
    from w2s_agents.pipeline.cache import stage_keys
    from w2s_agents.pipeline.runner import build_stages

    default, short = load_experiment(None), load_experiment(None, ["tasks.generation_timeout_s=5"])
    assert short.tasks.generation_timeout_s == 5.0
    assert stage_keys(build_stages(default, 0)) == stage_keys(build_stages(short, 0))


def test_food_split_gives_every_suite_split_the_same_food_pool() -> None:
    from w2s_agents.envs.suites import get_suite

    fetch = get_suite("tw-cooking-fetch")
    cooking = get_suite("tw-cooking")
    assert isinstance(fetch, TextWorldSuite) and isinstance(cooking, TextWorldSuite)
    # the registered cooking suite keeps TextWorld's disjoint pools; the fetch suite draws all from train
    assert [cooking.game_spec(s, 0).settings["split"] for s in ("train", "valid", "test")] == [
        "train",
        "valid",
        "test",
    ]
    specs = [fetch.game_spec(s, 0) for s in ("train", "valid", "test")]
    assert [s.settings["split"] for s in specs] == ["train"] * 3
    assert len({s.seed for s in specs}) == 3 and len({s.key() for s in specs}) == 3  # still different games
    with pytest.raises(ConfigError, match=r"suite tw-x: food_split applies to tw-cooking only"):
        TextWorldSuite("tw-x", "tw-simple", food_split="train")
    with pytest.raises(
        ConfigError, match=r"suite tw-y: food_split must be one of train, valid, test, got 'dev'"
    ):
        TextWorldSuite("tw-y", "tw-cooking", food_split="dev")
