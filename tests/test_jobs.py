"""Stages side by side (``run.jobs`` > 1, w2s_agents/pipeline/jobs.py): independent stages overlap, a stage waits
for its dependencies and sees only their folders, a failure stops the others and is raised as the stage raised
it, a stage's process that dies is reported, and no stage's process outlives a killed parent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cloudpickle
import pytest

from w2s_agents.errors import ConfigError, W2SError
from w2s_agents.pipeline.cache import Stage, StageContext, StageGroup, run_stage_groups, run_stages

# pytest's importlib mode: a stage's process cannot import this module, so its functions travel by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def work(
    ctx: StageContext, seconds: float = 0.0, fail: str | None = None, exit_code: int | None = None
) -> dict:
    """A stage: records when it ran, in which process and which folders it was given; optionally fails."""
    t0 = time.time()
    (ctx.directory / "pid").write_text(str(os.getpid()))
    (ctx.directory / "partial.txt").open("a").write("x")
    time.sleep(seconds)
    if exit_code is not None:
        os._exit(exit_code)
    if fail is not None:
        raise ConfigError(fail)
    out = {
        "start": t0,
        "end": time.time(),
        "pid": os.getpid(),
        "outputs": sorted(ctx.outputs),
        "mark": os.environ.get("W2S_TEST_MARK"),
        "cwd": os.getcwd(),
    }
    (ctx.directory / "out.json").write_text(json.dumps(out))
    return {"name": ctx.name}


def stage(name: str, deps: tuple[str, ...] = (), **kw) -> Stage:
    from functools import partial

    return Stage(name, partial(work, **kw), config={"kw": sorted(kw)}, deps=deps)


def diamond(**c_kw) -> list[Stage]:
    """a -> (b, c) -> d: b and c are independent."""
    return [
        stage("a"),
        stage("b", ("a",), seconds=1.5),
        stage("c", ("a",), **({"seconds": 1.5} | c_kw)),
        stage("d", ("b", "c")),
    ]


def out(run: Path, name: str) -> dict:
    return json.loads((run / name / "out.json").read_text())


def test_independent_stages_run_side_by_side_after_their_dependencies(tmp_path: Path) -> None:
    records = run_stages(diamond(), tmp_path, jobs=2)
    assert [(r.name, r.status) for r in records] == [(n, "done") for n in "abcd"]
    assert records[1].summary == {"name": "b"} and records[1].seconds >= 1.5
    a, b, c, d = (out(tmp_path, n) for n in "abcd")
    # each stage in a process of its own
    assert len({os.getpid(), a["pid"], b["pid"], c["pid"], d["pid"]}) == 5
    assert b["start"] < c["end"] and c["start"] < b["end"], "b and c did not overlap"
    assert a["end"] <= min(b["start"], c["start"]) and d["start"] >= max(b["end"], c["end"])
    # a stage is given the folders of the stages it depends on, directly or not, and no other
    assert (b["outputs"], c["outputs"], d["outputs"]) == (["a"], ["a"], ["a", "b", "c"])
    assert all(json.loads((tmp_path / n / "_done.json").read_text())["stage"] == n for n in "abcd")
    again = run_stages(diamond(), tmp_path, jobs=2)
    assert [r.status for r in again] == ["cached"] * 4 and again[2].summary == {"name": "c"}
    assert out(tmp_path, "b") == b  # not run again


def test_one_job_at_a_time_runs_the_same_stages_in_order(tmp_path: Path) -> None:
    records = run_stages(diamond(), tmp_path, jobs=1)
    b, c = out(tmp_path, "b"), out(tmp_path, "c")
    assert b["pid"] == c["pid"] == os.getpid() and b["end"] <= c["start"]
    assert [r.name for r in records] == list("abcd")


def test_stages_of_several_seeds_share_the_jobs(tmp_path: Path) -> None:
    groups = [StageGroup(diamond(), tmp_path / f"seed-{s}") for s in (0, 1)]
    records = run_stage_groups(groups, jobs=3, until="c")
    assert [[r.name for r in recs] for recs in records] == [["a", "b", "c"]] * 2
    assert not (tmp_path / "seed-0" / "d").exists()
    starts = sorted(out(tmp_path / f"seed-{s}", n)["start"] for s in (0, 1) for n in "bc")
    ends = sorted(out(tmp_path / f"seed-{s}", n)["end"] for s in (0, 1) for n in "bc")
    assert starts[2] < ends[0], "three of the four 1.5 s stages should have run at once"
    redo = run_stage_groups(groups, jobs=3, from_stage="c")
    assert [[r.status for r in recs] for recs in redo] == [["cached", "cached", "done", "done"]] * 2


def test_a_failing_stage_stops_the_others_and_its_error_is_raised(tmp_path: Path) -> None:
    stages = diamond(seconds=60.0)  # c would run for a minute
    stages[1] = stage("b", ("a",), seconds=1.0, fail="train.lr: must be > 0, got -1")
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"train\.lr: must be > 0, got -1"):
        run_stages(stages, tmp_path, jobs=2)
    assert time.monotonic() - t0 < 30
    c_pid = int((tmp_path / "c" / "pid").read_text())
    with pytest.raises(ProcessLookupError):  # stopped, not left running
        os.kill(c_pid, 0)
    assert (tmp_path / "a" / "_done.json").exists()
    assert not (tmp_path / "b" / "_done.json").exists() and not (tmp_path / "c" / "_done.json").exists()
    # the next run reuses a and resumes b and c in their folders
    records = run_stages(diamond(seconds=0.1), tmp_path, jobs=2)
    assert [r.status for r in records if r.name != "c"] == ["cached", "done", "done"]


def test_a_stage_whose_process_dies_is_reported(tmp_path: Path) -> None:
    with pytest.raises(W2SError, match=r"stage run/c: its process ended without a result \(exit code 3"):
        run_stages(diamond(seconds=0.0, exit_code=3), tmp_path / "run", jobs=2)


def _script(path: Path, body: str) -> Path:
    """A Python script at ``path`` that imports this module and ``run_stages``, then runs ``body``."""
    head = f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\nimport test_jobs\n"
    path.write_text(head + "from w2s_agents.pipeline.cache import run_stages\n" + textwrap.dedent(body))
    return path


def test_no_stage_process_outlives_a_killed_parent(tmp_path: Path) -> None:
    """The parent is SIGKILLed while two stages run: both stage processes end within seconds."""
    script = _script(
        tmp_path / "parent.py",
        f"""
        if __name__ == "__main__":  # each stage's process imports this script
            stages = test_jobs.diamond(seconds=120.0)
            stages[1] = test_jobs.stage("b", ("a",), seconds=120.0)
            run_stages(stages, {str(tmp_path / "run")!r}, jobs=2)
        """,
    )
    env = {**os.environ, "W2S_PROGRESS": "0"}
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stderr=subprocess.PIPE)
    pids: list[int] = []
    deadline = time.monotonic() + 120
    while len(pids) < 2:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "b and c did not start"
        pids = [int(p.read_text()) for p in (tmp_path / "run").glob("[bc]/pid") if p.read_text()]
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    deadline = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in pids if _alive(p)]
    assert not alive, f"stage processes {alive} outlived their parent"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for its (dead) parent's reaper has ended
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_bad_job_counts(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="jobs: must be >= 1, got 0"):
        run_stages(diamond(), tmp_path, jobs=0)


def test_a_script_without_the_main_guard_gets_the_reason(tmp_path: Path) -> None:
    script = _script(
        tmp_path / "unguarded.py", f"run_stages(test_jobs.diamond(), {str(tmp_path / 'run')!r}, jobs=2)"
    )
    env = {**os.environ, "W2S_PROGRESS": "0"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert 'must make that call under `if __name__ == "__main__":`' in proc.stderr.splitlines()[-1]


def test_stages_see_the_environment_and_folder_of_the_run_not_of_an_earlier_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The processes start from a server made at the first run; each stage still gets the caller's environment
    variables and working folder of the moment it starts."""
    for mark in ("first", "second"):
        monkeypatch.setenv("W2S_TEST_MARK", mark)
        (tmp_path / mark).mkdir()
        monkeypatch.chdir(tmp_path / mark)
        run_stages(diamond(seconds=0.0), tmp_path / f"run-{mark}", jobs=2)
        c = out(tmp_path / f"run-{mark}", "c")
        assert (c["mark"], c["cwd"]) == (mark, str(tmp_path / mark))
