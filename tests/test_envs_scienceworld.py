"""ScienceWorld env (needs Java): gold paths, score normalisation, clone by replay, JVM lifecycle."""

from __future__ import annotations

import logging
import random
import subprocess

import pytest

from w2s_agents.envs.base import UnknownTaskError
from w2s_agents.envs.scienceworld_env import ScienceWorldEnv, scienceworld_task_names
from w2s_agents.envs.suites import ScienceWorldSuite
from w2s_agents.errors import W2SError

pytestmark = [pytest.mark.jvm, pytest.mark.slow]

GOLD_TASKS = ["chemistry-mix/0", "find-plant/1", "boil/0"]


@pytest.fixture(scope="module")
def env() -> ScienceWorldEnv:
    e = ScienceWorldEnv(admissible_commands=False, max_steps=200)
    yield e
    e.close()


@pytest.mark.parametrize("task_id", GOLD_TASKS)
def test_gold_path_reaches_full_score(env: ScienceWorldEnv, task_id: str) -> None:
    obs, info = env.reset(options={"task": task_id})
    assert obs and info["instruction"].startswith("Your task is")
    plan = info["expert_plan"]
    assert plan
    total = 0.0
    for i, action in enumerate(plan):
        obs, reward, terminated, truncated, info = env.step(action)
        total += reward
        assert info["expert_plan"] == (plan[i + 1 :] if not terminated else [])
        assert 0.0 <= info["score"] <= 1.0
        if terminated or truncated:
            break
    assert terminated and info["won"] and not info["lost"]
    assert info["score"] == 1.0 and total == pytest.approx(1.0)  # the return is the final score


def test_admissible_commands_and_deviation(env: ScienceWorldEnv) -> None:
    env.admissible_commands = True
    try:
        _, info = env.reset(options={"task": "chemistry-mix/0"})
        assert "look around" in info["admissible_commands"] and len(info["admissible_commands"]) > 10
        _, _, _, _, info = env.step("inventory")
        assert info["expert_plan"] is None  # off the gold path: the plan is unknown
    finally:
        env.admissible_commands = False


def test_clone_by_replay_gives_the_same_continuation(env: ScienceWorldEnv) -> None:
    rng = random.Random(0)
    _, info = env.reset(options={"task": "find-plant/1"})
    plan = info["expert_plan"]
    for action in plan[:4]:
        env.step(action)
    state = env.clone_state()
    assert state.engine is None and state.actions == tuple(plan[:4])
    continuation = [rng.choice(["look around", "inventory", "wait1", "open door", "xyzzy"]) for _ in range(4)]
    continuation += plan[4:7]
    first = [env.step(a) for a in continuation]
    for _ in range(3):  # every restore, in this JVM or in a new one, gives the same continuation
        env.restore_state(state)
        assert [env.step(a) for a in continuation] == first
        env.kill_simulator()


def test_malformed_actions_never_raise(env: ScienceWorldEnv) -> None:
    env.reset(options={"task": "boil/0"})
    for action in ["", "x" * 10_000, "prenez la clé ☃", "look\x00\x07\n around", "\n"]:
        obs, reward, terminated, _, _ = env.step(action)
        assert isinstance(obs, str) and obs and env.observation_space.contains(obs)
        assert reward == 0.0 and not terminated


def test_negative_score_is_failure(env: ScienceWorldEnv) -> None:
    # focusing on the wrong thing fails a ScienceWorld task: its score goes negative
    _, info = env.reset(options={"task": "find-plant/1"})
    obs, reward, terminated, _, info = env.step("focus on agent")
    assert terminated and info["lost"] and not info["won"], obs
    assert info["raw_score"] < 0 and info["score"] == 0.0 and reward == 0.0


def test_jvm_restarts_when_it_dies_mid_episode(env: ScienceWorldEnv) -> None:
    _, info = env.reset(options={"task": "chemistry-mix/0"})
    plan = info["expert_plan"]
    for action in plan[:3]:
        env.step(action)
    expected_env = ScienceWorldEnv(admissible_commands=False, max_steps=200)
    try:
        expected_env.reset(options={"task": "chemistry-mix/0"})
        expected = [expected_env.step(a) for a in plan][3:]
    finally:
        expected_env.close()
    env.kill_simulator()
    got = [env.step(a) for a in plan[3:]]
    # a fresh JVM may generate another gold path, so expected_env's plan is not this episode's
    strip = [(*r[:4], {k: v for k, v in r[4].items() if k != "expert_plan"}) for r in (*got, *expected)]
    assert strip[: len(got)] == strip[len(got) :]
    assert [r[4]["expert_plan"] for r in got[:5]] == [plan[i + 1 :] for i in range(3, 8)]
    assert expected[-1][4]["won"] and env.actions == tuple(plan[: len(env.actions)])


def test_variation_splits_and_task_ids(env: ScienceWorldEnv) -> None:
    assert len(scienceworld_task_names()) == 30
    splits = {s: set(env.variations("boil", s)) for s in ("train", "valid", "test")}
    assert all(splits.values())
    assert not splits["train"] & splits["valid"] and not splits["train"] & splits["test"]
    suite = ScienceWorldSuite("test-sw", tasks=("boil", "melt"), sizes={"train": 2, "valid": 1, "test": 1})
    ids = env.suite_task_ids(suite, "train")
    boil, melt = env.variations("boil", "train")[:2], env.variations("melt", "train")[:2]
    # the tasks take turns, so the first ids of a split hold every task
    assert ids == [f"boil/{boil[0]}", f"melt/{melt[0]}", f"boil/{boil[1]}", f"melt/{melt[1]}"]
    uneven = ScienceWorldSuite("test-sw3", tasks=("boil", "melt"), sizes={"train": None})
    all_ids = env.suite_task_ids(uneven, "train")
    assert sorted(all_ids) == sorted(
        [f"boil/{v}" for v in splits["train"]] + [f"melt/{v}" for v in env.variations("melt", "train")]
    )
    assert all_ids[:2] == [f"boil/{boil[0]}", f"melt/{melt[0]}"]
    with pytest.raises(UnknownTaskError, match=r"unknown ScienceWorld task 'bake' in 'bake/0'; valid: boil"):
        env.reset(options={"task": "bake/0"})
    with pytest.raises(UnknownTaskError, match=r"expected <task>/<variation>"):
        env.reset(options={"task": "boil"})
    with pytest.raises(UnknownTaskError, match=r"has variations 0\.\.29, not 99"):
        env.reset(options={"task": "boil/99"})


def test_close_stops_the_jvm() -> None:
    e = ScienceWorldEnv(admissible_commands=False, expert_plan=False)
    e.reset(options={"task": "boil/0"})
    proc = e._sim.proc
    assert proc.poll() is None
    e.close()
    assert proc.poll() is not None
    e.reset(options={"task": "boil/0"})  # starts a new one
    e.close()


def test_demos_of_a_scienceworld_suite(tmp_path) -> None:
    from w2s_agents.envs.demos import export_demos
    from w2s_agents.envs.suites import register_suite
    from w2s_agents.store import read_trajectories

    register_suite(
        ScienceWorldSuite("test-sw-demos", tasks=("chemistry-mix", "find-plant"), sizes={"train": 1})
    )
    out = tmp_path / "sw.jsonl"
    written, won = export_demos("test-sw-demos", "train", out, admissible_commands=False)
    assert (written, won) == (2, 2)
    trajs = list(read_trajectories(out))
    assert [t.task_id.split("/")[0] for t in trajs] == ["chemistry-mix", "find-plant"]
    assert all(t.success and t.return_ == 1.0 and t.env_id == "w2s/ScienceWorld-v0" for t in trajs)


def test_state_keys_follow_the_world_not_the_path(env: ScienceWorldEnv) -> None:
    _, info = env.reset(options={"task": "boil/0"})
    start = info["state_key"]
    assert isinstance(start, str) and env.reset()[1]["state_key"] == start
    keys = {a: env.step(a)[4]["state_key"] for a in ("look around", "inventory", "xyzzy", "")}
    assert set(keys.values()) == {start}, keys  # time passes, nothing visible changes
    there = env.step("go to kitchen")[4]["state_key"]
    back = env.step("go to hallway")[4]["state_key"]
    assert there != start and back == start
    closed = env.step("close door to kitchen")[4]["state_key"]
    assert closed != start and env.step("open door to kitchen")[4]["state_key"] == start
    state = env.clone_state()
    env.step("go to kitchen")
    env.restore_state(state)  # by replay
    assert env.clone_state().state_key == start and env.step("look around")[4]["state_key"] == start
    # failing the task changes the score, and so the key, even where the room looks the same
    assert env.step("focus on agent")[4]["state_key"] != start


def test_state_keys_can_be_turned_off() -> None:
    e = ScienceWorldEnv(admissible_commands=False, expert_plan=False, state_key=False)
    try:
        _, info = e.reset(options={"task": "boil/0"})
        assert info["state_key"] is None and e.step("look around")[4]["state_key"] is None
    finally:
        e.close()


def _kill_later(env: ScienceWorldEnv, delay: float) -> subprocess.Popen:
    """SIGKILL the env's JVM after ``delay`` seconds, from another process (a Python thread formatting py4j's
    logged tracebacks at the same time as the main thread trips CPython 3.11's AST recursion check)."""
    return subprocess.Popen(["sh", "-c", f"sleep {delay:.3f}; kill -9 {env._sim.proc.pid} 2>/dev/null"])


def test_jvm_killed_at_random_moments_20_times(caplog: pytest.LogCaptureFixture) -> None:
    """Kill the JVM 20 times (between steps, during steps and during resets, from another process after a
    random delay): every episode ends with the uninterrupted run's trajectory or a one-line W2SError."""
    caplog.set_level(logging.CRITICAL, logger="py4j")  # py4j logs each broken connection with a traceback
    reference_env = ScienceWorldEnv(max_steps=50)
    try:
        first = reference_env.reset(options={"task": "find-plant/1"})
        plan = first[1]["expert_plan"]
        actions = ["open door", "0", "inventory", *plan]
        reference = [first, *(reference_env.step(a) for a in actions)]
    finally:
        reference_env.close()
    assert reference[-1][4]["score"] > 0

    env = ScienceWorldEnv(max_steps=50)
    env.reset(options={"task": "find-plant/1"})
    rng = random.Random(17)
    outcomes = {"same trajectory": 0, "W2SError": 0}
    kills = 0
    try:
        while kills < 20:
            mode = ("between", "during", "reset")[kills % 3]
            at = rng.randrange(len(actions))
            timer = None
            if mode == "reset":
                timer = _kill_later(env, rng.uniform(0.0, 0.3))
            try:
                got = [env.reset()]
                for i, action in enumerate(actions):
                    if i == at and mode == "between":
                        env.kill_simulator()
                    elif i == at and mode == "during":
                        timer = _kill_later(env, rng.uniform(0.0, 0.1))
                    got.append(env.step(action))
            except W2SError as exc:
                assert "\n" not in str(exc) and "ScienceWorld" in str(exc), str(exc)
                outcomes["W2SError"] += 1
            else:
                differ = [i for i, (g, r) in enumerate(zip(got, reference, strict=False)) if g != r]
                assert not differ and len(got) == len(reference), f"run {kills} ({mode} at {at}): {differ}"
                outcomes["same trajectory"] += 1
            finally:
                if timer is not None:
                    timer.wait()
            kills += 1
    finally:
        env.close()
    print(f"JVM killed 20 times: {outcomes}")  # shown with pytest -s
    assert sum(outcomes.values()) == 20


def test_the_task_order_is_part_of_a_sciworld_runs_task_stage_keys(repo_root) -> None:
    """Task lists cached in the earlier order (task by task) are not reused by a ScienceWorld run; the keys of the
    other suites' runs (pinned in test_weak_supervisors.py) do not change."""
    from w2s_agents.pipeline import build_stages
    from w2s_agents.pipeline.experiment import load_experiment
    from w2s_agents.pipeline.runner import _tasks_part

    sw = load_experiment(repo_root / "configs" / "sciworld-find.yaml")
    assert _tasks_part(sw, ("train",))["task_order"] == "turns"
    assert {s.name: s.config for s in build_stages(sw, 0)}["held-out"]["task_order"] == "turns"
    assert "task_order" not in _tasks_part(load_experiment(None), ("train",))
