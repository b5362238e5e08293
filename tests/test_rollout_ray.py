"""Rollouts on a real local Ray instance (2 CPUs): the same trajectories whatever the number of workers, a
worker killed with SIGKILL during collection does not lose or duplicate an episode, ``w2s rollout`` on Ray
workers stops in order on SIGTERM and Ctrl-C, and a SIGKILLed driver leaves no Ray process or folder behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from w2s_agents.agents import Agent, AgentConfig, Sampler, load_model
from w2s_agents.cli import main
from w2s_agents.rollout import EngineOptions, RayOptions, collect
from w2s_agents.store import TrajectoryStore, read_trajectories, scan_store
from w2s_agents.types import EpisodeKey

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REAP_BOUND_S = 5.0
"""docs/rollout.md: after a SIGKILLed driver, no process of its Ray instance runs and its folder is gone within
this time."""

SAMPLERS = [Sampler(), Sampler(temperature=1.0)]


def _ray_dirs() -> dict[str, object]:
    tmp_ray = Path("/tmp/ray")
    return {
        "/tmp/ray": sorted(os.listdir(tmp_ray)) if tmp_ray.exists() else None,
        "~/.ray": (Path.home() / ".ray").exists(),
        # Ray's session folders end with the driver's pid: only this process's count
        "private temp folders": sorted(
            p.name for p in Path("/tmp").glob("w2sray-*") if any(p.glob(f"session_*_{os.getpid()}"))
        ),
    }


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance for the module (collect uses a running instance and leaves it up)."""
    from w2s_agents.rollout.ray import ray_session

    before = _ray_dirs()
    with ray_session(RayOptions(workers=2)):
        import ray

        assert ray.cluster_resources().get("CPU") == 2
        yield
    assert _ray_dirs() == before, "Ray left files in /tmp/ray, ~/.ray or its temporary folder"


@pytest.fixture(scope="module")
def agent(nano_model_dir: Path) -> Agent:
    return Agent(load_model(nano_model_dir), AgentConfig(mode="choose", max_context_tokens=768))


def _plain(traj) -> dict:
    d = traj.to_dict()
    for s in d["steps"]:
        s.pop("latency_s")
    return d


def _collect(agent: Agent, tasks: list[str], path: Path, **kwargs) -> tuple:
    with TrajectoryStore(path) as store:
        summary = collect(
            tasks,
            agent,
            SAMPLERS,
            store,
            env="w2s/TextWorld-v0",
            max_steps=4,
            engine=EngineOptions(batch_size=3, shard_size=3),
            **kwargs,
        )
    return summary, {t.key: _plain(t) for t in read_trajectories(path)}


@pytest.mark.ray
@pytest.mark.slow
def test_same_trajectories_in_process_and_on_1_or_2_workers(
    ray_instance, agent: Agent, tw_game_files: list[str], tmp_path: Path
) -> None:
    tasks = tw_game_files[:2]
    kwargs = {"seeds": 3}
    local, want = _collect(agent, tasks, tmp_path / "local.jsonl", **kwargs)
    assert local.workers == 0 and len(want) == 12
    one, got1 = _collect(agent, tasks, tmp_path / "w1.jsonl", ray=RayOptions(workers=1), **kwargs)
    two, got2 = _collect(agent, tasks, tmp_path / "w2.jsonl", ray=RayOptions(workers=2), **kwargs)
    assert (one.workers, two.workers, one.worker_failures, two.worker_failures) == (1, 2, 0, 0)
    assert got1 == want and got2 == want
    assert one.steps == two.steps == local.steps


def _busy_workers() -> list[int]:
    """Pids of this process's Ray actor processes that are running a shard."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.cmdline()[:1] == ["ray::RolloutWorker.run"]:
                out.append(p.pid)
        except psutil.Error:
            continue
    return out


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_worker_loses_and_duplicates_nothing(
    ray_instance, agent: Agent, tw_game_files: list[str], tmp_path: Path
) -> None:
    tasks = tw_game_files[:3]
    killed: list[int] = []

    def kill_one(traj, summary) -> None:
        if not killed:
            busy = _busy_workers()
            assert busy, "no busy rollout worker to kill"
            os.kill(busy[0], signal.SIGKILL)
            killed.append(busy[0])

    path = tmp_path / "killed.jsonl"
    with TrajectoryStore(path) as store:
        summary = collect(tasks, agent, SAMPLERS, store, env="w2s/TextWorld-v0", seeds=4, max_steps=4,
                          engine=EngineOptions(batch_size=2, shard_size=2), ray=RayOptions(workers=2),
                          on_episode=kill_one)  # fmt: skip
    assert killed and summary.worker_failures == 1
    scan = scan_store(path)
    want = {EpisodeKey(t, "nano", s.name, seed) for t in tasks for s in SAMPLERS for seed in range(4)}
    assert scan.keys == want and scan.records == 24 and not scan.duplicates and scan.torn_bytes == 0
    assert summary.episodes == 24 and summary.skipped == 0
    assert not psutil.pid_exists(killed[0]) or psutil.Process(killed[0]).status() == psutil.STATUS_ZOMBIE


# ------------------------------------------------------------------ stops: SIGTERM, Ctrl-C, SIGKILL


def test_reaper_kills_the_instance_processes_and_nothing_else(tmp_path: Path) -> None:
    """The reaper (no Ray here): a process with the session's mark and a ``ray::`` process holding a file in the
    session folder are killed, the folder removed; a ``ray::`` process of another folder, a process of another
    session and the driver (this process, also holding a file there) are left alone."""
    from w2s_agents.rollout.ray import _Reaper

    temp = tmp_path / "w2sray-x"
    session = temp / "session_1"
    session.mkdir(parents=True)
    other = tmp_path / "other"
    other.mkdir()
    mine = open(session / "driver.log", "w")  # noqa: SIM115  (held open while the reaper runs)
    sleep = "import sys, time; f = open(sys.argv[1], 'w') if len(sys.argv) > 1 else None; time.sleep(60)"

    def start(argv0: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        return subprocess.Popen([argv0, "-c", sleep, *args], executable=sys.executable, env=env)

    reaper = _Reaper(str(temp))
    assert reaper.proc is not None
    procs: list[subprocess.Popen] = []
    try:
        with reaper.marking():
            procs.append(start("python"))  # the GCS, the raylet: marked by their environment
        assert "W2S_RAY_SESSION" not in os.environ
        procs.append(start("ray::Worker", str(session / "worker.out")))  # a worker: its log is in the session
        procs.append(start("ray::Worker", str(other / "worker.out")))  # another instance's worker
        procs.append(start("python", env={**os.environ, "W2S_RAY_SESSION": "another-token"}))
        deadline = time.monotonic() + 30
        while not ((session / "worker.out").exists() and (other / "worker.out").exists()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        reaper.started(str(session))
        reaper.finish()
        assert [p.poll() for p in procs[:2]] == [-signal.SIGKILL, -signal.SIGKILL]
        assert [p.poll() for p in procs[2:]] == [None, None]
        assert not temp.exists() and other.exists()
    finally:
        mine.close()
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def _job(tmp_path: Path, model: Path, tasks: list[str]) -> Path:
    cfg = {
        "run": {"name": "job", "out_dir": str(tmp_path / "runs")},
        "model": {"path": str(model), "device": "cpu"},
        "agent": {"mode": "choose", "max_context_tokens": 1024},
        "rollout": {
            "suite": "tw-simple",
            "task_ids": tasks,
            "samplers": [{"temperature": 0.0}, {"temperature": 1.0}],
            "seeds": 6,
            "max_steps": 6,
            "batch_size": 2,
            "shard_size": 2,
            "workers": 2,
        },
    }
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    """The TMPDIR of a ``w2s rollout`` subprocess, where its Ray instance's folder goes: a fresh folder directly in
    /tmp (pytest's folders are too long for Ray's socket paths, which are limited to 107 bytes), removed after."""
    path = Path(tempfile.mkdtemp(prefix="w2st-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _start(cfg: Path, ray_tmp: Path, new_session: bool = False) -> subprocess.Popen:
    env = {**os.environ, "W2S_PROGRESS": "0", "OMP_NUM_THREADS": "1", "TMPDIR": str(ray_tmp)}
    return subprocess.Popen([sys.executable, "-m", "w2s_agents", "rollout", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=new_session)  # fmt: skip


def _wait_for_records(proc: subprocess.Popen, store: Path, records: int) -> None:
    deadline = time.monotonic() + 180
    while proc.poll() is None and not (store.exists() and scan_store(store).records >= records):
        assert time.monotonic() < deadline, "the rollout stored too few episodes in time"
        time.sleep(0.05)
    assert proc.poll() is None, f"the rollout ended early: {proc.stderr.read().decode()[-2000:]}"


def _leftovers(ray_tmp: Path, processes: list[psutil.Process]) -> list[str]:
    """Processes of the Ray instance still running (zombies are ended) and Ray folders still there."""
    left = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(f"pid {p.pid} {p.name()}")
        except psutil.NoSuchProcess:
            continue
    for p in psutil.process_iter(
        ["cmdline", "status"]
    ):  # anything naming the folder, started after the snapshot
        if p.info["status"] != psutil.STATUS_ZOMBIE and str(ray_tmp) in " ".join(p.info["cmdline"] or []):
            left.append(f"pid {p.pid} {' '.join(p.info['cmdline'])[:100]}")
    return left + [str(d) for d in ray_tmp.glob("w2sray-*")]


def _await_no_leftovers(ray_tmp: Path, processes: list[psutil.Process], within_s: float) -> float:
    """Seconds until nothing of the Ray instance is left; fails after ``within_s``."""
    start = time.monotonic()
    while left := _leftovers(ray_tmp, processes):
        assert time.monotonic() - start < within_s, f"left after {within_s} s: {left}"
        time.sleep(0.05)
    return time.monotonic() - start


def _stopped(proc: subprocess.Popen, timeout_s: float = 90) -> tuple[int, str]:
    try:
        status = proc.wait(timeout=timeout_s)
        return status, proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def _summary(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "runs" / "job" / "rollout-summary.json").read_text())


@pytest.mark.ray
@pytest.mark.slow
def test_ray_rollout_stops_on_sigterm_leaves_nothing_on_sigkill_and_resumes(
    nano_model_dir: Path, tw_game_files: list[str], tmp_path: Path, ray_tmp: Path, capsys
) -> None:
    tasks = tw_game_files[:2]
    cfg = _job(tmp_path, nano_model_dir, tasks)
    store = tmp_path / "runs" / "job" / "trajectories.jsonl"
    # SIGTERM (a scheduler preempting the job): exit 143, store and summary in order, Ray shut down
    proc = _start(cfg, ray_tmp)
    try:
        _wait_for_records(proc, store, 3)
        ray_procs = psutil.Process(proc.pid).children(recursive=True)
        os.kill(proc.pid, signal.SIGTERM)
    finally:
        status, err = _stopped(proc)
    assert status == 128 + signal.SIGTERM, err[-2000:]
    assert "w2s: terminated; finished episodes are stored" in err
    assert "SIGTERM received" not in err and "Traceback" not in err  # no C++ crash report, no traceback
    scan = scan_store(store)
    termed_at = scan.records
    assert 3 <= termed_at < 24 and not scan.duplicates and scan.torn_bytes == 0 and not scan.missing_newline
    summary = _summary(tmp_path)
    assert (summary["status"], summary["planned"], summary["episodes"]) == ("interrupted", 24, termed_at)
    _await_no_leftovers(ray_tmp, ray_procs, 10)
    # SIGKILL: no chance to clean up; the reaper ends Ray's processes and removes its folder
    proc = _start(cfg, ray_tmp)
    try:
        _wait_for_records(proc, store, termed_at + 3)
        ray_procs = psutil.Process(proc.pid).children(recursive=True)
        assert any(p.name().startswith("ray::") for p in ray_procs) and list(ray_tmp.glob("w2sray-*"))
        os.kill(proc.pid, signal.SIGKILL)
        took = _await_no_leftovers(ray_tmp, ray_procs, REAP_BOUND_S)
    finally:
        status, _ = _stopped(proc)
    assert status == -signal.SIGKILL and took < REAP_BOUND_S
    killed_at = scan_store(store).records
    assert termed_at + 3 <= killed_at < 24
    # resuming runs only the missing episodes (in this process, without Ray)
    assert main(["rollout", str(cfg), "rollout.workers=0"]) == 0
    assert (
        f"{24 - killed_at} episodes run, {killed_at} already stored (24 planned)" in capsys.readouterr().out
    )
    scan = scan_store(store)
    assert scan.records == 24 and not scan.duplicates and scan.torn_bytes == 0
    want = {EpisodeKey(t, "nano", s, seed) for t in tasks for s in ("greedy", "t1-p1") for seed in range(6)}
    assert scan.keys == want
    assert _summary(tmp_path)["status"] == "complete"


@pytest.mark.ray
@pytest.mark.slow
def test_ray_rollout_stops_on_ctrl_c(
    nano_model_dir: Path, tw_game_files: list[str], tmp_path: Path, ray_tmp: Path
) -> None:
    cfg = _job(tmp_path, nano_model_dir, tw_game_files[:2])
    store = tmp_path / "runs" / "job" / "trajectories.jsonl"
    proc = _start(cfg, ray_tmp, new_session=True)  # its own process group, as a terminal's foreground job
    try:
        _wait_for_records(proc, store, 3)
        ray_procs = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: SIGINT to the whole group
    finally:
        status, err = _stopped(proc)
    assert status == 128 + signal.SIGINT, err[-2000:]
    assert "w2s: interrupted; finished episodes are stored" in err and "Traceback" not in err
    scan = scan_store(store)
    assert (
        3 <= scan.records < 24 and not scan.duplicates and scan.torn_bytes == 0 and not scan.missing_newline
    )
    summary = _summary(tmp_path)
    assert (summary["status"], summary["episodes"]) == ("interrupted", scan.records)
    _await_no_leftovers(ray_tmp, ray_procs, 10)
