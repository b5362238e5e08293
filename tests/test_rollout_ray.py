"""Rollouts on a real local Ray instance (2 CPUs): the same trajectories whatever the number of workers, and a
worker killed with SIGKILL during collection does not lose or duplicate an episode."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest

from w2s_agents.agents import Agent, AgentConfig, Sampler, load_model
from w2s_agents.rollout import EngineOptions, RayOptions, collect
from w2s_agents.store import TrajectoryStore, read_trajectories, scan_store
from w2s_agents.types import EpisodeKey

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

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
