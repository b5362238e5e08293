"""Env registration: gymnasium's checker on every registered id, plugins through entry points, the CLI."""

from __future__ import annotations

import io
import sys
import textwrap
import warnings
from pathlib import Path

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

import w2s_agents.envs
from w2s_agents.cli import main
from w2s_agents.envs import make_env, register_envs, registered_envs
from w2s_agents.store import read_trajectories

ENV_KWARGS = {"w2s/ScienceWorld-v0": {"task": "chemistry-mix/0", "admissible_commands": False}}
"""Constructor arguments for check_env (TextWorld's cache dir is added in the test)."""


def _params() -> list:
    out = []
    for entry in registered_envs():
        marks = [pytest.mark.jvm, pytest.mark.slow] if "ScienceWorld" in entry.env_id else []
        out.append(pytest.param(entry.env_id, marks=marks, id=entry.env_id))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("env_id", _params())
def test_check_env_passes_on_every_registered_id(
    env_id: str, game_cache_dir: Path, tw_test_suites: dict
) -> None:
    kwargs = dict(ENV_KWARGS.get(env_id, {}))
    if env_id == "w2s/TextWorld-v0":
        kwargs.update(cache_dir=str(game_cache_dir), task="test-tw-coin_collector/train/0")
    env = gym.make(env_id, **kwargs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # gymnasium's checker reports problems as warnings
            check_env(env.unwrapped)
    finally:
        env.close()


def test_builtin_ids_are_registered_lazily() -> None:
    ids = {e.env_id for e in registered_envs()}
    assert {"w2s/TextWorld-v0", "w2s/ScienceWorld-v0"} <= ids
    spec = gym.spec("w2s/TextWorld-v0")
    assert spec.entry_point == "w2s_agents.envs.textworld_env:TextWorldEnv"
    assert isinstance(spec.entry_point, str)  # "module:Class": importing w2s_agents.envs imports no engine


def test_unknown_env_id_lists_known_ones() -> None:
    with pytest.raises(
        w2s_agents.errors.W2SError, match=r"unknown env id 'w2s/Zork-v0'; registered .*TextWorld"
    ):
        make_env("w2s/Zork-v0")


def _install_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A third-party distribution declaring an env in the ``w2s_agents.envs`` entry-point group."""
    (tmp_path / "toy_plugin.py").write_text(
        textwrap.dedent(
            '''
            from w2s_agents.envs.base import EngineStatus, TextEnv, UnknownTaskError


            class CounterEnv(TextEnv):
                """Say "up" three times to win."""

                env_id = "toy/Counter-v0"

                def default_task(self):
                    return "count/3"

                def task_ids(self, split=None):
                    return ["count/3"]

                def _load_task(self, task_id):
                    if task_id != "count/3":
                        raise UnknownTaskError(f"unknown task {task_id!r}; valid: count/3")
                    return "Say up three times."

                def _engine_reset(self):
                    self.count = 0
                    return self._now("You are at 0.")

                def _engine_step(self, command):
                    self.count += command == "up"
                    return self._now(f"You are at {self.count}.")

                def _now(self, text):
                    return EngineStatus(text, self.count, 3, self.count >= 3, False, ("up", "down"), None)
            '''
        )
    )
    dist = tmp_path / "toy_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[w2s_agents.envs]\ntoy/Counter-v0 = toy_plugin:CounterEnv\n")
    monkeypatch.syspath_prepend(str(tmp_path))


def test_plugin_env_registers_and_appears_in_w2s_envs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    _install_plugin(tmp_path, monkeypatch)
    entries = {e.env_id: e for e in register_envs()}
    assert entries["toy/Counter-v0"].source == "toy-plugin 0.1"
    env = make_env("toy/Counter-v0")
    check_env(env.unwrapped)
    _, _info = env.reset()
    results = [env.step("up") for _ in range(3)]
    assert [r[1] for r in results] == pytest.approx([1 / 3, 1 / 3, 1 / 3])
    assert results[-1][2] and results[-1][4]["won"]
    env.close()
    assert main(["envs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("toy/Counter-v0  toy_plugin:CounterEnv  (toy-plugin 0.1)") for line in lines)
    assert any(line.startswith("w2s/TextWorld-v0") for line in lines)
    monkeypatch.setattr(sys, "stdin", io.StringIO("down\nup\nup\nup\n"))
    assert main(["envs", "play", "toy/Counter-v0"]) == 0
    assert "[won after 4 steps, return 1.000]" in capsys.readouterr().out
    assert main(["envs", "play", "toy/Counter-v0", "--cache-dir", "x"]) == 2
    assert "cannot create env toy/Counter-v0" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_play_reads_commands_from_stdin(
    game_cache_dir: Path, tw_test_suites: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from w2s_agents.envs.textworld_env import TextWorldEnv

    env = TextWorldEnv(cache_dir=game_cache_dir)
    _, info = env.reset(options={"task": "test-tw-coin_collector/train/1"})
    plan = info["expert_plan"]
    env.close()
    monkeypatch.setattr(sys, "stdin", io.StringIO("look\n\n" + "\n".join(plan) + "\n"))
    argv = ["envs", "play", "w2s/TextWorld-v0", "--task", "test-tw-coin_collector/train/1"]
    assert main([*argv, "--cache-dir", str(game_cache_dir), "--show-admissible"]) == 0
    out = capsys.readouterr().out
    assert "# test-tw-coin_collector/train/1" in out
    assert "[admissible: " in out
    assert f"[won after {len(plan) + 2} steps, return 1.000]" in out


def test_cli_play_unknown_task_is_one_line_error(capsys: pytest.CaptureFixture, game_cache_dir: Path) -> None:
    argv = ["envs", "play", "w2s/TextWorld-v0", "--task", "nope/train/0", "--cache-dir", str(game_cache_dir)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("w2s: error: unknown task suite 'nope'; registered: ")


@pytest.mark.slow
def test_cli_demos_exports_expert_trajectories(
    game_cache_dir: Path, tw_test_suites: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "demos.jsonl"
    argv = [
        "envs",
        "demos",
        "test-tw-simple",
        "--split",
        "train",
        "-o",
        str(out),
        "--cache-dir",
        str(game_cache_dir),
    ]
    assert main(argv) == 0
    assert "wrote 2 expert trajectories of test-tw-simple/train (2 won)" in capsys.readouterr().out
    trajs = list(read_trajectories(out))
    assert [t.task_id for t in trajs] == ["test-tw-simple/train/0", "test-tw-simple/train/1"]
    for t in trajs:
        assert t.source.role == "expert" and t.env_id == "w2s/TextWorld-v0"
        assert t.success and t.end == "won" and t.return_ == 1.0
        assert sum(s.reward for s in t.steps) == pytest.approx(1.0)
        assert t.steps[0].admissible and t.instruction and t.initial_observation
    assert main(argv) == 0  # resumes: nothing left to write
    assert "wrote 0 expert trajectories" in capsys.readouterr().out
    assert len(list(read_trajectories(out))) == 2


def test_cli_lists_suites_and_tasks(capsys: pytest.CaptureFixture, tw_test_suites: dict) -> None:
    assert main(["envs", "suites"]) == 0
    out = capsys.readouterr().out
    assert "tw-cooking  w2s/TextWorld-v0" in out and "sciworld  w2s/ScienceWorld-v0" in out
    assert main(["envs", "tasks", "test-tw-simple", "--split", "valid"]) == 0
    assert capsys.readouterr().out.split() == ["test-tw-simple/valid/0"]


def test_register_env_adds_a_class_of_this_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from w2s_agents.envs import register_env
    from w2s_agents.errors import W2SError

    _install_plugin(tmp_path, monkeypatch)  # only to import its env class; its entry point is not used here
    import toy_plugin

    entry = register_env("script/Counter-v0", toy_plugin.CounterEnv)
    assert entry.entry_point == "toy_plugin:CounterEnv" and entry.source == "this process"
    assert "script/Counter-v0" in {e.env_id for e in registered_envs()}
    env = make_env("script/Counter-v0", max_steps=5)
    check_env(env.unwrapped)
    env.reset()
    assert env.step("up")[4]["score"] == pytest.approx(1 / 3)
    env.close()
    assert register_env("script/Counter-v0", toy_plugin.CounterEnv) == entry  # registering again is harmless
    with pytest.raises(W2SError, match="is not a TextEnv subclass"):
        register_env("script/Dict-v0", dict)
    with pytest.raises(W2SError, match=r"already registered as w2s_agents\.envs\.textworld_env:TextWorldEnv"):
        register_env("w2s/TextWorld-v0", toy_plugin.CounterEnv)
