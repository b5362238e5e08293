"""TextWorld under any action: interpreter commands refused, expert plans that do not run out, a clean last
screen (issue 17)."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from w2s_agents.cli import main
from w2s_agents.envs.base import EngineStatus, TextEnv, UnknownTaskError
from w2s_agents.envs.demos import PLAN_EXHAUSTED, expert_trajectory
from w2s_agents.envs.textworld_env import (
    INTERPRETER_COMMANDS,
    TextWorldEnv,
    interpreter_command,
    interpreter_command_refusal,
)

TASK = "test-tw-simple/train/0"

# every line here would run an interpreter command (the verb it runs on the right)
REFUSED = {
    "restart": "restart",
    "RESTART": "restart",
    "  Quit  ": "quit",
    "q": "q",
    "quit.": "quit",
    "save": "save",
    "save game": "save",
    "restore": "restore",
    "script": "script",
    "script on": "script",
    "transcript": "transcript",
    "transcripts": "transcript",  # the dictionary reads 9 letters
    "unscript": "unscript",
    "noscript": "noscript",
    "undo": "undo",
    "verbose": "verbose",
    "long": "long",
    "brief": "brief",
    "normal": "normal",
    "superbrief": "superbrief",
    "SuperBriefly": "superbrief",
    "short": "short",
    "notify off": "notify",
    "version": "version",
    "verify": "verify",
    "look. save": "save",  # Inform chains commands at '.', ',' and 'then'
    "look.save": "save",
    "look,save": "save",
    "me, save": "save",
    "look then script": "script",
    'save"': "save",
    "tw-trace-actions": "tw-trace-actions",
    "TW-extra-infos score": "tw-extra-infos",
}
PASSED = [
    "score",
    "inventory",
    "help",
    "goal",
    "look",
    "yes",
    "y",
    "no",
    "again",
    "g",
    "oops key",
    "take save",
    "quitx",
    "restar",
    "qu",
    "open the script",
    "examine transcript",
    "'quit'",
    "weather then",
]


@pytest.fixture()
def env(game_cache_dir: Path, tw_test_suites: dict) -> TextWorldEnv:
    e = TextWorldEnv(cache_dir=game_cache_dir, max_steps=60)
    yield e
    e.close()


@pytest.fixture()
def in_tmp_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working folder: the interpreter writes saves and transcripts into the working folder."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def _walk(env: TextWorldEnv, actions: list[str]) -> list[tuple]:
    return [env.step(a)[:4] for a in actions]


def test_interpreter_commands_are_recognised_as_the_interpreter_reads_them() -> None:
    assert {interpreter_command(line) for line in REFUSED} <= {
        *INTERPRETER_COMMANDS,
        "tw-trace-actions",
        "tw-extra-infos",
    }
    assert {line: interpreter_command(line) for line in REFUSED} == REFUSED
    assert {line: interpreter_command(line) for line in PASSED} == dict.fromkeys(PASSED)
    assert set(INTERPRETER_COMMANDS) == {interpreter_command(word) for word in INTERPRETER_COMMANDS} - {None}


def test_every_interpreter_command_is_refused_and_changes_nothing(
    env: TextWorldEnv, in_tmp_cwd: Path
) -> None:
    """Each refused line costs a move with reward 0 and leaves the state key, admissible commands and plan as
    they were; the walkthrough then gives exactly the observations of a clean run (no display mode, score
    notice or restart got through) and no file appears in the working folder."""
    _, start = env.reset(options={"task": TASK})
    plan = start["expert_plan"]
    clean = _walk(env, plan)
    assert clean[-1][2] and clean[-1][1] > 0
    lines = [*REFUSED, *INTERPRETER_COMMANDS]
    env.max_steps = len(lines) + len(plan) + 1
    env.reset(options={"task": TASK})
    for n, line in enumerate(lines, 1):
        obs, reward, terminated, truncated, info = env.step(line)
        assert obs == interpreter_command_refusal(REFUSED.get(line, line)), line
        assert (reward, terminated, truncated, info["moves"]) == (0.0, False, False, n), line
        assert info["state_key"] == start["state_key"], line
        assert info["admissible_commands"] == start["admissible_commands"], line
        assert info["expert_plan"] == plan, line
    assert _walk(env, plan) == clean
    assert list(in_tmp_cwd.iterdir()) == []


def test_restart_then_yes_does_not_restart_the_game(env: TextWorldEnv) -> None:
    _, info = env.reset(options={"task": TASK})
    plan = info["expert_plan"]
    total = 0.0
    for action in [plan[0], "restart", "yes", *plan[1:]]:
        _, reward, terminated, _, info = env.step(action)
        total += reward
    assert terminated and info["won"]
    assert info["score"] == 1.0 and total == pytest.approx(1.0)


def test_quit_and_restart_do_not_swallow_later_commands(env: TextWorldEnv) -> None:
    for word in ("quit", "q", "restart"):
        _, info = env.reset(options={"task": TASK})
        plan = info["expert_plan"]
        env.step(word)
        results = _walk(env, plan)
        assert results[-1][2] and env.clone_state().status.won, word
        assert len(results) == len(plan)


def test_save_restore_and_script_write_no_files(env: TextWorldEnv, in_tmp_cwd: Path) -> None:
    _, info = env.reset(options={"task": TASK})
    for line in ["save", "script", "transcript", "look then script", "look. save", "me, save", "restore"]:
        obs, *_ = env.step(line)
        assert "not carried out" in obs
    _walk(env, info["expert_plan"])
    assert list(in_tmp_cwd.iterdir()) == []


def test_score_and_inventory_are_game_commands(env: TextWorldEnv) -> None:
    env.reset(options={"task": TASK})
    obs, *_ = env.step("score")
    assert "scored 0 out of a possible" in obs
    obs, *_ = env.step("inventory")
    assert "carrying" in obs.lower() and "not carried out" not in obs


def test_refused_commands_restore_by_replay_as_exactly(env: TextWorldEnv) -> None:
    _, info = env.reset(options={"task": TASK})
    plan = info["expert_plan"]
    env.step(plan[0])
    env.step("verbose")
    env.step("save")
    exact = env.clone_state()
    replayed = type(exact)(**{**exact.__dict__, "engine": None})
    continuation = ["look", "superbrief", *plan[1:]]
    first = [env.step(a) for a in continuation]
    env.restore_state(replayed)
    assert [env.step(a) for a in continuation] == first
    env.restore_state(exact)
    assert [env.step(a) for a in continuation] == first


def test_last_observation_has_no_interpreter_menu(env: TextWorldEnv) -> None:
    _, info = env.reset(options={"task": TASK})
    for action in info["expert_plan"]:
        obs, _, terminated, _, _ = env.step(action)
    assert terminated
    assert "*** The End ***" in obs and "You scored" in obs
    assert "RESTART" not in obs and "UNDO" not in obs and obs == obs.rstrip()


def test_a_failing_walkthrough_command_is_replaced_by_textworld_policy(env: TextWorldEnv) -> None:
    """A walkthrough whose last command does nothing (the game does not understand it): the failed command
    costs a step, then the plan is TextWorld's policy, and the expert wins instead of running out."""
    env.reset(options={"task": TASK})
    good = env._walkthrough
    env._walkthrough = (*good[:-1], "frobnicate the widget")
    traj = expert_trajectory(env, TASK)
    actions = [s.action for s in traj.steps]
    assert actions[: len(good)] == [*good[:-1], "frobnicate the widget"]
    assert traj.success and traj.end == "won"
    assert actions[len(good) :] == [good[-1]]


@pytest.mark.slow
def test_tw_custom_train_0_expert_wins(game_cache_dir: Path) -> None:
    """tw-custom/train/0: the walkthrough's "take type K latchkey from locker" gets "Which do you mean, the
    locker or the type 0 locker?"; the repaired plan takes the latchkey and wins."""
    env = TextWorldEnv(cache_dir=game_cache_dir, max_steps=50)
    try:
        traj = expert_trajectory(env, "tw-custom/train/0")
    finally:
        env.close()
    actions = [s.action for s in traj.steps]
    assert "take type K latchkey from locker" in actions
    assert traj.success and traj.end == "won" and traj.return_ == 1.0
    assert actions[actions.index("take type K latchkey from locker") + 1] == "take type K latchkey"


class _ShortPlanEnv(TextEnv):
    """Counts to 3; its expert plan knows only two of the three steps."""

    env_id = "w2s/ShortPlan-v0"

    def _load_task(self, task_id: str) -> str:
        if task_id != "count":
            raise UnknownTaskError(f"unknown task {task_id}")
        return "say one, two, three"

    def _status_after(self, said: int) -> EngineStatus:
        return EngineStatus(str(said), float(said), 3.0, said == 3, False, None, ("one", "two")[said:])

    def _engine_reset(self) -> EngineStatus:
        self._said = 0
        return self._status_after(0)

    def _engine_step(self, command: str) -> EngineStatus:
        if command == ("one", "two", "three")[self._said]:
            self._said += 1
        return self._status_after(self._said)

    def task_ids(self, split: str | None = None) -> list[str]:
        return ["count"]

    def default_task(self) -> str:
        return "count"


def test_a_plan_that_runs_out_is_labelled_plan_exhausted_not_truncated() -> None:
    env = _ShortPlanEnv(max_steps=10)
    traj = expert_trajectory(env, "count")
    assert [s.action for s in traj.steps] == ["one", "two"]
    assert not traj.success and traj.end == "error"
    assert traj.extra["expert_end"] == PLAN_EXHAUSTED
    assert traj.extra["error"].startswith(f"{PLAN_EXHAUSTED}: the expert plan ran out after 2 steps")
    assert traj.return_ == pytest.approx(2 / 3)


# ------------------------------------------------------------------ w2s envs play


def test_play_prints_the_instruction_once_and_a_clean_last_screen(
    env: TextWorldEnv, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, game_cache_dir: Path
) -> None:
    _, info = env.reset(options={"task": TASK})
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(info["expert_plan"]) + "\n"))
    assert main(["envs", "play", "w2s/TextWorld-v0", "--task", TASK, "--cache-dir", str(game_cache_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# {TASK}\n")
    assert out.count(info["instruction"]) == 1
    assert "*** The End ***" in out and "RESTART" not in out
    assert f"[won after {len(info['expert_plan'])} steps, return 1.000]" in out


def _read_until(fd: int, marker: bytes, timeout: float = 60.0) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while marker not in out and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the other end closed
                break
            if not chunk:
                break
            out += chunk
    return out


def test_play_in_a_terminal_edits_lines_and_keeps_a_history(env: TextWorldEnv, tmp_path: Path) -> None:
    """In a terminal, the Up arrow brings back the last command (readline) instead of costing a step as
    "^[[A"."""
    game = str(env.game_path(TASK))  # a .z8 path: the suite is registered in this process only
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "w2s_agents", "envs", "play", "w2s/TextWorld-v0", "--task", game],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        cwd=tmp_path,
        close_fds=True,
    )
    os.close(slave)
    try:
        out = _read_until(master, b"> ")
        os.write(master, b"inventory\r")
        out += _read_until(master, b"> ")
        os.write(master, b"\x1b[A\r")  # Up arrow, Enter: the same command again
        out += _read_until(master, b"> ")
        os.write(master, b"quit\r")
        out += _read_until(master, b"\n", timeout=10)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    text = out.decode(errors="replace")
    assert text.count("You are carrying") == 2, text
    assert "recognise" not in text
