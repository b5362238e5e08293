"""w2s/TextWorldExpress-v0: gymnasium's checker, expert plans that win, exact clone/restore by replay, JVM
recovery, task ids and suites, and ``w2s run`` on a TextWorld-Express suite."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from gymnasium.utils.env_checker import check_env

from w2s_agents.envs.base import UnknownTaskError
from w2s_agents.envs.suites import TextWorldExpressSuite, get_suite
from w2s_agents.errors import ConfigError

pytest.importorskip(
    "textworld_express", reason="textworld-express is not installed (pip install textworld-express)"
)

from w2s_agents.envs.textworld_express_env import TextWorldExpressEnv

pytestmark = pytest.mark.jvm

KINDS = ("twx-coin", "twx-cookingworld", "twx-mapreader", "twx-sorting", "twx-arithmetic")


@pytest.fixture(scope="module")
def env() -> TextWorldExpressEnv:
    e = TextWorldExpressEnv(max_steps=200)
    yield e
    e.close()


@pytest.mark.parametrize("task", ["twx-coin/train/0", "twx-sorting/valid/1", "twx-mapreader/test/2"])
def test_check_env_passes_on_three_game_kinds(env: TextWorldExpressEnv, task: str) -> None:
    env.reset(options={"task": task})  # check_env's resets keep playing this task
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # gymnasium's checker reports problems as warnings
        # render modes and close are checked on the registered id in test_envs_registration.py
        check_env(env, skip_render_check=True, skip_close_check=True)
    assert env.task_id == task


@pytest.mark.parametrize("suite", KINDS)
def test_expert_plan_wins_on_every_split(env: TextWorldExpressEnv, suite: str) -> None:
    for split, index in (("train", 3), ("valid", 0), ("test", 7)):
        task = f"{suite}/{split}/{index}"
        obs, info = env.reset(options={"task": task})
        plan = info["expert_plan"]
        assert obs and info["instruction"] and plan, task
        for i, action in enumerate(plan):
            assert info["expert_plan"] == plan[i:]  # the rest of the plan while the agent follows it
            obs, _reward, terminated, truncated, info = env.step(action)
        assert terminated and not truncated and info["won"] and not info["lost"], (task, obs)
        assert info["score"] == 1.0 and info["expert_plan"] == []


def test_admissible_commands_sorted_and_deviation_forgets_the_plan(env: TextWorldExpressEnv) -> None:
    obs, info = env.reset(options={"task": "twx-coin/train/5"})
    admissible = info["admissible_commands"]
    assert admissible == sorted(admissible) and "look around" in admissible
    off_plan = next(a for a in admissible if a != info["expert_plan"][0])
    *_, info = env.step(off_plan)
    assert info["expert_plan"] is None and info["state_key"] is None
    for junk in ("", "xyzzy", "take take take " * 30, "ÉCLAIR\x00\n", "help"):
        obs, reward, _terminated, _truncated, info = env.step(junk)  # the game's answer, never an exception
        assert isinstance(obs, str) and reward == 0.0
    assert info["moves"] == 6


def test_clone_restore_gives_the_same_continuation(env: TextWorldExpressEnv) -> None:
    rng = random.Random(0)
    env.reset(options={"task": "twx-cookingworld/train/2"})
    for _ in range(8):
        env.step(rng.choice(env.clone_state().status.admissible))
    state = env.clone_state()
    assert state.engine is None  # restored by replay
    walk = [rng.choice(state.status.admissible) for _ in range(10)]
    runs = []
    for _ in range(2):
        env.reset(options={"task": "twx-sorting/train/0"})  # another task in between
        env.restore_state(state)
        assert env.actions == state.actions
        runs.append([env.step(a) for a in walk])
    assert runs[0] == runs[1]


def test_a_killed_jvm_is_restarted_and_the_episode_replayed(env: TextWorldExpressEnv) -> None:
    plan = env.reset(options={"task": "twx-mapreader/train/1"})[1]["expert_plan"]
    reference = [env.step(a) for a in plan]
    env.reset()
    got = []
    for i, action in enumerate(plan):
        if i in (1, len(plan) // 2):
            env.kill_engine()
        got.append(env.step(action))
    assert got == reference and got[-1][4]["won"]


def test_task_ids_and_suite_checks(env: TextWorldExpressEnv) -> None:
    suite = get_suite("twx-coin")
    assert isinstance(suite, TextWorldExpressSuite)
    assert suite.task_ids("valid")[:2] == ["twx-coin/valid/0", "twx-coin/valid/1"]
    assert suite.seed("valid", 3) == 10_003 and suite.seed("test", 0) == 20_000
    assert set(suite.task_ids("train")) <= set(env.task_ids("train"))
    for bad, why in (
        ("twx-coin/0", "expected <suite>/<split>/<index>"),
        ("twx-coin/train/100", "has tasks 0..99, not 100"),
        ("tw-simple/train/0", "not a TextWorld-Express suite"),
        ("nope/train/0", "unknown task suite 'nope'"),
    ):
        with pytest.raises(UnknownTaskError, match=why):
            env.reset(options={"task": bad})
    with pytest.raises(ConfigError, match="unknown TextWorld-Express game 'zork'; valid: cookingworld"):
        TextWorldExpressSuite("twx-zork", "zork")
    with pytest.raises(ConfigError, match="split train has 1000 TextWorld-Express seeds, not 1001"):
        TextWorldExpressSuite("twx-big", "coin", sizes={"train": 1001})


RUN = """\
run: {{name: twx, out_dir: {out}}}
weak: {{tiny_preset: nano}}
strong: {{tiny_preset: nano}}
tasks: {{suite: twx-sorting, train: 2, valid: 0, test: 1, max_steps: 6}}
explore: {{samplers: [{{temperature: 0.0}}, {{temperature: 1.5}}], seeds: 1, max_steps: 6}}
search: {{iterations: 10, sft_min_value: 0.0}}
train:
  weak_sft: {{lr: 0.003, epochs: 1, batch_size: 4}}
  strong_sft: {{lr: 0.003, epochs: 1, batch_size: 4}}
  mcts_sft: {{lr: 0.003, epochs: 1, batch_size: 4}}
  variants: [w2s-mcts]
  ceiling: false
eval: {{misfit_states: 4}}
"""


@pytest.mark.slow
def test_w2s_run_completes_on_a_textworld_express_suite(tmp_path: Path) -> None:
    config = tmp_path / "twx.yaml"
    config.write_text(RUN.format(out=tmp_path / "runs"))
    proc = subprocess.run(
        [sys.executable, "-m", "w2s_agents.cli", "run", str(config)],
        env={**os.environ, "W2S_PROGRESS": "0"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seed_dir = tmp_path / "runs" / "twx" / "seed-0"
    tasks = json.loads((seed_dir / "tasks" / "tasks.json").read_text())
    tasks |= json.loads((seed_dir / "held-out" / "tasks.json").read_text())
    assert tasks == {
        "train": ["twx-sorting/train/0", "twx-sorting/train/1"],
        "valid": [],
        "test": ["twx-sorting/test/0"],
    }
    demos = [json.loads(line) for line in (seed_dir / "demos" / "demos.jsonl").read_text().splitlines()]
    assert [d["success"] for d in demos] == [True, True]
    assert {d["env_id"] for d in demos} == {"w2s/TextWorldExpress-v0"}
    assert (tmp_path / "runs" / "twx" / "report.md").is_file()
    assert "W2S-MCTS" in proc.stdout
