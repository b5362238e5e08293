"""Trajectory data model and crash-safe store: round trip, validation with file:line, torn lines, resume."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from w2s_agents.errors import DataFormatError, DuplicateEpisodeError, W2SError
from w2s_agents.store import TrajectoryStore, encode_trajectory, read_trajectories, scan_store
from w2s_agents.types import TRAJECTORY_SCHEMA, EpisodeKey, Source, Step, Trajectory


def make_traj(
    task: str = "t0", seed: int = 0, n_steps: int = 3, won: bool = True, text: str = ""
) -> Trajectory:
    steps = tuple(
        Step(
            action=f"go {i}",
            observation=f"room {i} {text}",
            reward=(1.0 if won and i == n_steps - 1 else 0.0),
            score=(1.0 if won and i == n_steps - 1 else 0.0),
            thought=f"step {i}",
            admissible=("go 0", "go 1", "look") if i % 2 == 0 else None,
            tokens_in=10 + i,
            tokens_out=2,
            latency_s=0.01,
        )
        for i in range(n_steps)
    )
    return Trajectory(
        task_id=task,
        env_id="w2s/Toy-v0",
        source=Source(model="weak", role="weak", sampler="t0.7", temperature=0.7, top_p=0.95, seed=seed),
        instruction="reach the end",
        initial_observation=f"start {text}",
        steps=steps,
        return_=1.0 if won else 0.0,
        success=won,
        end="won" if won else "lost",
    )


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    weird = 'ünïcødé \x00\x07 <script>\n\ttabs \u2028 "quotes" 🙂'
    trajs = [
        make_traj("a", 0),
        make_traj("a", 1, won=False),
        make_traj("b", 0, n_steps=0, won=False, text=weird),
    ]
    path = tmp_path / "t.jsonl"
    with TrajectoryStore(path) as store:
        for t in trajs:
            store.append(t)
        assert len(store) == 3
        assert store.keys == {t.key for t in trajs}
    assert list(read_trajectories(path)) == trajs
    record = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert record["schema"] == TRAJECTORY_SCHEMA
    assert set(record) == {
        "schema", "task_id", "env_id", "source", "instruction", "initial_observation", "steps", "return",
        "success", "end",
    }  # fmt: skip
    assert set(record["steps"][0]) == {
        "observation", "thought", "action", "reward", "score", "admissible", "tokens_in", "tokens_out", "latency_s",
    }  # fmt: skip
    assert path.read_bytes().count(b"\n") == 3  # one line per record even with newlines in the text


# written by the store before state keys existed; a trajectory without keys must still encode to exactly this
UNKEYED_LINE = (
    b'{"schema":"w2s.trajectory/1","task_id":"t0","env_id":"w2s/Toy-v0","source":{"model":"weak","role":"weak",'
    b'"sampler":"t0.7","seed":1},"instruction":"reach the end","initial_observation":"start","steps":[{"observation'
    b'":"room 0","thought":"","action":"go 0","reward":0.0,"score":0.0,"admissible":["go 0","look"],"tokens_in":3,'
    b'"tokens_out":0,"latency_s":0.0},{"observation":"room 1","thought":"done","action":"go 1","reward":1.0,"score'
    b'":1.0,"admissible":null,"tokens_in":0,"tokens_out":0,"latency_s":0.0}],"return":1.0,"success":true,"end":"w'
    b'on"}\n'
)


def _small_traj(keys: tuple[str | None, ...] = (None, None, None)) -> Trajectory:
    steps = (
        Step("go 0", "room 0", admissible=("go 0", "look"), tokens_in=3, state_key=keys[1]),
        Step("go 1", "room 1", 1.0, 1.0, "done", state_key=keys[2]),
    )
    source = Source("weak", "weak", "t0.7", seed=1)
    return Trajectory(
        "t0",
        "w2s/Toy-v0",
        source,
        "reach the end",
        "start",
        steps,
        1.0,
        True,
        "won",
        initial_state_key=keys[0],
    )


def test_state_keys_round_trip_and_files_without_them_are_unchanged(tmp_path: Path) -> None:
    assert encode_trajectory(_small_traj()) == UNKEYED_LINE
    keyed = _small_traj(("k-start", "k-room0", None))
    path = tmp_path / "t.jsonl"
    with TrajectoryStore(path) as store:
        store.append(keyed)
    (back,) = read_trajectories(path)
    assert back == keyed
    assert back.initial_state_key == "k-start" and [s.state_key for s in back.steps] == ["k-room0", None]
    record = json.loads(path.read_bytes())
    assert list(record)[5:8] == ["initial_observation", "initial_state_key", "steps"]
    assert list(record["steps"][0])[-1] == "state_key" and "state_key" not in record["steps"][1]
    assert Trajectory.from_dict(json.loads(UNKEYED_LINE)) == _small_traj()  # older files read as before


def test_reopen_resumes_with_finished_keys(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    with TrajectoryStore(path) as store:
        store.append(make_traj("a", 0))
    with TrajectoryStore(path) as store:
        assert EpisodeKey("a", "weak", "t0.7", 0) in store
        assert EpisodeKey("a", "weak", "t0.7", 1) not in store
        with pytest.raises(DuplicateEpisodeError, match="already stored"):
            store.append(make_traj("a", 0))
        store.append(make_traj("a", 1))
    assert [t.source.seed for t in read_trajectories(path)] == [0, 1]


def test_torn_last_line_is_repaired_without_losing_records(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "t.jsonl"
    with TrajectoryStore(path) as store:
        for seed in range(3):
            store.append(make_traj("a", seed))
    whole = path.read_bytes()
    partial = encode_trajectory(make_traj("a", 3))[:57]  # a writer killed mid-record
    path.write_bytes(whole + partial)

    # readers skip the torn record and warn, without touching the file
    with caplog.at_level(logging.WARNING, logger="w2s_agents"):
        assert [t.source.seed for t in read_trajectories(path)] == [0, 1, 2]
    assert "t.jsonl:4: skipping a torn last record" in caplog.text
    assert path.read_bytes() == whole + partial

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="w2s_agents"), TrajectoryStore(path) as store:
        assert len(store) == 3
        for seed in range(6):  # the resumed run: only the missing episodes
            if EpisodeKey("a", "weak", "t0.7", seed) not in store:
                store.append(make_traj("a", seed))
    assert "removed a torn last record (57 bytes)" in caplog.text
    seeds = [t.source.seed for t in read_trajectories(path)]
    assert seeds == [0, 1, 2, 3, 4, 5]


def test_complete_last_record_without_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_bytes(encode_trajectory(make_traj("a", 0)).rstrip(b"\n"))  # hand-edited file
    assert scan_store(path).missing_newline
    with TrajectoryStore(path) as store:
        store.append(make_traj("a", 1))
    assert [t.source.seed for t in read_trajectories(path)] == [0, 1]


def _bad_file(tmp_path: Path, bad_line: str) -> Path:
    path = tmp_path / "bad.jsonl"
    good = encode_trajectory(make_traj("a", 0)).decode()
    path.write_text(good + good.replace('"seed":0', '"seed":1') + bad_line + "\n" + good, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda r: r.pop("steps"), "missing field 'steps'"),
        (lambda r: r.update(schema="w2s.trajectory/9"), "unsupported trajectory schema 'w2s.trajectory/9'"),
        (lambda r: r.update(colour="red"), "unknown field 'colour'"),
        (
            lambda r: r["steps"][1].update(reward="lots"),
            "steps[1]: reward must be a finite number, got 'lots'",
        ),
        (lambda r: r["steps"][0].pop("action"), "missing field 'steps[0].action'"),
        (lambda r: r.update({"return": 1.5}), "return must be a number in [0, 1], got 1.5"),
        (lambda r: r.update(end="exploded"), "end must be one of won, lost, truncated, error"),
        (
            lambda r: r["source"].update(role="oracle"),
            "source.role must be one of weak, strong, expert, search",
        ),
        (
            lambda r: r["steps"][2].update(state_key=3),
            "steps[2]: state_key must be a non-empty string or null, got 3",
        ),
        (
            lambda r: r.update(initial_state_key=""),
            "initial_state_key must be a non-empty string or null, got ''",
        ),
    ],
)
def test_bad_record_error_names_file_and_line(tmp_path: Path, mutate, fragment: str) -> None:
    record = make_traj("a", 2).to_dict()
    mutate(record)
    path = _bad_file(tmp_path, json.dumps(record))
    with pytest.raises(DataFormatError) as err:
        list(read_trajectories(path))
    msg = str(err.value)
    assert msg.startswith(f"{path}:3: invalid trajectory record: ")
    assert fragment in msg
    with pytest.raises(DataFormatError, match=r"bad.jsonl:3:"):
        TrajectoryStore(path)  # a writer refuses to append to a corrupt file


def test_invalid_json_and_encoding_errors_name_line(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match=r"bad.jsonl:3: invalid JSON"):
        list(read_trajectories(_bad_file(tmp_path, '{"schema": ')))
    path = tmp_path / "bin.jsonl"
    path.write_bytes(b"\xff\xfe\n")
    with pytest.raises(DataFormatError, match=r"bin.jsonl:1: not UTF-8"):
        list(read_trajectories(path))
    with pytest.raises(DataFormatError, match="trajectory file not found"):
        list(read_trajectories(tmp_path / "nope.jsonl"))


def test_lone_surrogate_is_refused_with_field_and_line(tmp_path: Path) -> None:
    good = encode_trajectory(make_traj("a", 0))
    # an escaped lone surrogate is valid JSON but no Unicode text; an escaped pair (an emoji) is fine
    lone = encode_trajectory(make_traj("b", 0)).replace(b'"action":"go 1"', b'"action":"go \\ud800 1"')
    pair = encode_trajectory(make_traj("c", 0)).replace(b'"action":"go 1"', b'"action":"go \\ud83d\\ude00 1"')
    path = tmp_path / "s.jsonl"
    path.write_bytes(good + pair + lone)
    with pytest.raises(
        DataFormatError, match=r"s.jsonl:3: .*field 'steps\[1\]\.action' holds a lone surrogate"
    ):
        scan_store(path)
    with pytest.raises(DataFormatError, match=r"s.jsonl:3: "):
        list(read_trajectories(path))
    path.write_bytes(good + pair)
    assert [t.steps[1].action for t in read_trajectories(path)] == ["go 1", "go \U0001f600 1"]


def test_blank_lines_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    line = encode_trajectory(make_traj("a", 0))
    path.write_bytes(b"\n" + line + b"\n  \n")
    assert len(list(read_trajectories(path))) == 1
    with TrajectoryStore(path) as store:
        assert len(store) == 1


def test_second_writer_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    with TrajectoryStore(path), pytest.raises(W2SError, match="another process is writing"):
        TrajectoryStore(path)
    with TrajectoryStore(path) as store:  # the lock is released on close
        store.append(make_traj())


def test_data_model_rejects_inconsistent_values() -> None:
    with pytest.raises(ValueError, match="must end 'won'"):
        Trajectory("t", "e", Source("m", "weak"), "", "", (), 1.0, True, "lost")
    with pytest.raises(ValueError, match="tokens_in must be a non-negative integer"):
        Step(action="a", observation="o", tokens_in=-1)
    with pytest.raises(ValueError, match="finite number"):
        Step(action="a", observation="o", reward=float("nan"))
    assert Step(action="a", observation="o", admissible=["x"]).admissible == ("x",)


_WRITER = r"""
import sys, time
from w2s_agents.store import TrajectoryStore
from w2s_agents.types import Source, Step, Trajectory
path, n = sys.argv[1], int(sys.argv[2])
with TrajectoryStore(path) as store:
    done = store.keys
    for seed in range(n):
        t = Trajectory("task", "w2s/Toy-v0", Source("weak", "weak", "s", seed=seed), "go", "start " * 50,
                       tuple(Step(action=f"a{i}", observation="o" * 2000) for i in range(20)), 0.0, False, "lost")
        if t.key in done:
            continue
        store.append(t)
        print(seed, flush=True)
"""


def test_writer_killed_with_sigkill_then_resumed(tmp_path: Path) -> None:
    """A real writer process is SIGKILLed mid-run; the rerun completes with every episode exactly once."""
    path = tmp_path / "t.jsonl"
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    n = 400
    proc = subprocess.Popen(
        [sys.executable, str(script), str(path), str(n)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    for _ in range(40):  # let it write some episodes, then kill it without warning
        proc.stdout.readline()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = scan_store(path)
    assert 40 <= before.records < n

    subprocess.run(
        [sys.executable, str(script), str(path), str(n)], check=True, capture_output=True, timeout=120
    )
    seeds = [t.source.seed for t in read_trajectories(path)]
    assert sorted(seeds) == list(range(n))
    after = scan_store(path)
    assert after.torn_bytes == 0 and not after.duplicates and after.records == n


def test_fsync_is_called_per_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    with TrajectoryStore(tmp_path / "t.jsonl") as store:
        n0 = len(calls)
        store.append(make_traj("a", 0))
        store.append(make_traj("a", 1))
        assert len(calls) - n0 == 2
    with TrajectoryStore(tmp_path / "u.jsonl", fsync=False) as store:
        n0 = len(calls)
        store.append(make_traj("a", 0))
        assert len(calls) == n0
