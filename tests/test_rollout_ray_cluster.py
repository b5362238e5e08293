"""Rollouts on a Ray cluster that is already running: the address (a config key, else ``RAY_ADDRESS``), the
one-line error for an address that does not answer, GPU fractions and workers per node, and, on a real cluster
started with ``ray start --head`` in its own folder, the same trajectories as in this process and a driver
killed mid-run (SIGKILL) whose run resumes with nothing lost or duplicated."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from w2s_agents.cli import main
from w2s_agents.config import load_config
from w2s_agents.errors import ConfigError, W2SError
from w2s_agents.pipeline.experiment import ExperimentConfig
from w2s_agents.rollout import EngineOptions, RayOptions, RolloutConfig, RolloutJobConfig, collect
from w2s_agents.store import TrajectoryStore, read_trajectories, scan_store
from w2s_agents.types import EpisodeKey

pytestmark = pytest.mark.usefixtures("one_torch_thread")

_MARK = "W2S_TEST_RAY_CLUSTER"
"""Environment variable holding the test cluster's token: every process of the cluster inherits it."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ config and address (no cluster)


def test_worker_gpu_fractions_and_workers_per_node_are_checked() -> None:
    ok = RolloutConfig(workers=2, worker_gpus=0.5, workers_per_node=4)
    assert ok.ray() == RayOptions(
        workers=2, address_key="rollout.ray_address", worker_gpus=0.5, workers_per_node=4
    )
    for override, key in (
        ("rollout.worker_gpus=1.5", "'worker_gpus'"),
        ("rollout.workers_per_node=-1", "'workers_per_node'"),
    ):
        with pytest.raises(ConfigError) as err:
            load_config(RolloutJobConfig, None, [override])
        msg = str(err.value)
        assert "section 'rollout'" in msg and key in msg and "\n" not in msg
    assert load_config(RolloutJobConfig, None, ["rollout.worker_gpus=2"]).rollout.worker_gpus == 2
    with pytest.raises(ConfigError, match=r"section 'explore': 'worker_gpus'"):
        load_config(ExperimentConfig, None, ["explore.worker_gpus=0.5", "explore.worker_gpus=1.25"])
    with pytest.raises(ValueError, match="worker_gpus"):
        RayOptions(worker_gpus=1.5)


def test_placement_keys_stay_out_of_the_explore_stage_key() -> None:
    from w2s_agents.pipeline.runner import build_stages

    def explore_part(*overrides: str) -> dict:
        cfg = load_config(ExperimentConfig, None, list(overrides))
        return next(s for s in build_stages(cfg, 0) if s.name == "explore").config

    default = explore_part()
    assert set(default["explore"]) == {
        "samplers",
        "seeds",
        "max_steps",
        "batch_size",
        "workers",
        "ray_address",
    }
    assert default["explore"]["ray_address"] is None
    placed = explore_part(
        "explore.ray_address=10.0.0.1:6379",
        "explore.worker_cpus=4",
        "explore.worker_gpus=0.5",
        "explore.workers_per_node=2",
    )
    assert placed == default
    assert explore_part("explore.seeds=3") != default  # what is computed still changes the key
    from w2s_agents.pipeline.cache import stage_keys

    placement = [
        "explore.ray_address=ray://head:10001",
        "explore.worker_gpus=0.5",
        "explore.workers_per_node=2",
    ]
    keys = [stage_keys(build_stages(load_config(ExperimentConfig, None, o), 0)) for o in ([], placement)]
    assert keys[0] == keys[1]


def test_the_address_comes_from_the_key_before_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from w2s_agents.rollout.ray import resolve_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(RayOptions()) == (None, "")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    assert resolve_address(RayOptions()) == ("10.0.0.2:6379", "RAY_ADDRESS")
    opts = RayOptions(address="ray://head:10001", address_key="rollout.ray_address")
    assert resolve_address(opts) == ("ray://head:10001", "rollout.ray_address")


def test_an_address_that_does_not_answer_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from w2s_agents.rollout.ray import check_reachable, ray_session

    port = _free_port()  # closed again: nothing listens there
    start = time.monotonic()
    with pytest.raises(W2SError) as err:
        check_reachable(f"ray://127.0.0.1:{port}", "explore.ray_address")
    msg = str(err.value)
    assert msg.startswith("explore.ray_address: cannot reach the Ray cluster at ray://127.0.0.1:")
    assert f":{port}" in msg and "\n" not in msg
    with pytest.raises(W2SError, match=r"rollout\.ray_address: 'head' is not a Ray cluster address"):
        check_reachable("head", "rollout.ray_address")
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    with pytest.raises(W2SError) as err, ray_session(RayOptions(workers=1)):
        pass
    assert str(err.value).startswith(f"RAY_ADDRESS: cannot reach the Ray cluster at 127.0.0.1:{port} (")
    assert time.monotonic() - start < 10  # Ray itself would wait minutes


def test_w2s_rollout_names_the_key_of_an_unreachable_cluster(
    nano_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        json.dumps(
            {
                "run": {"name": "job", "out_dir": str(tmp_path / "runs")},
                "model": {"path": str(nano_model_dir), "device": "cpu"},
                "agent": {"mode": "choose"},
                "rollout": {"suite": "tw-simple", "tasks": 1, "workers": 1},
            }
        )
    )
    port = _free_port()
    assert main(["rollout", str(cfg), f"rollout.ray_address=127.0.0.1:{port}"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(
        f"w2s: error: rollout.ray_address: cannot reach the Ray cluster at 127.0.0.1:{port}"
    )


# ------------------------------------------------------------------ a real cluster


def _cluster_processes(token: str) -> list[psutil.Process]:
    procs = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if p.environ().get(_MARK) == token:
                procs.append(p)
    return procs


def _stop_cluster(token: str) -> None:
    """End the cluster's processes (found by the token in their environment), SIGTERM then SIGKILL.

    Not ``ray stop``: it stops every Ray process of the machine, other runs' included."""
    procs = _cluster_processes(token)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=5)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[tuple[str, Path]]:
    """A one-node Ray cluster (2 CPUs, 1 logical GPU) started with ``ray start --head`` in a short folder of its
    own, with its own HOME; its address and HOME. Stopped and its folders removed afterwards."""
    from w2s_agents.rollout.ray import _short_tmp_root

    real_home_ray = Path(pwd.getpwuid(os.getuid()).pw_dir) / ".ray"
    before = (real_home_ray.exists(), (Path.home() / ".ray").exists(), Path("/tmp/ray").exists())
    root = Path(tempfile.mkdtemp(prefix="w2sc-", dir=_short_tmp_root()))
    home = Path(tempfile.mkdtemp(prefix="w2sh-", dir=_short_tmp_root()))
    token = uuid.uuid4().hex
    env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env[_MARK] = token
    for var in ("RAY_ADDRESS", "CUDA_VISIBLE_DEVICES"):  # a logical GPU: no device list to match
        env.pop(var, None)
    port = _free_port()
    cmd = [
        str(Path(sys.executable).with_name("ray")),
        "start",
        "--head",
        f"--temp-dir={root}",
        "--num-cpus=2",
        "--num-gpus=1",
        "--include-dashboard=false",
        f"--port={port}",
        f"--dashboard-port={_free_port()}",
        f"--ray-client-server-port={_free_port()}",
        "--node-ip-address=127.0.0.1",
        "--disable-usage-stats",
    ]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        yield f"127.0.0.1:{port}", home
    finally:
        _stop_cluster(token)
        shutil.rmtree(root, ignore_errors=True)
        home_files = sorted(os.listdir(home))
        shutil.rmtree(home, ignore_errors=True)
    assert not _cluster_processes(token)
    assert home_files == [], f"the cluster wrote into its HOME: {home_files}"
    after = (real_home_ray.exists(), (Path.home() / ".ray").exists(), Path("/tmp/ray").exists())
    assert after == before, "Ray left ~/.ray or /tmp/ray behind"


SAMPLERS_CFG = [{"temperature": 0.0}, {"temperature": 1.0}]


def _plain(traj) -> dict:
    d = traj.to_dict()
    for s in d["steps"]:
        s.pop("latency_s")
    return d


@pytest.mark.ray
@pytest.mark.slow
def test_gpu_fractions_and_workers_per_node_on_a_cluster(ray_cluster: tuple[str, Path]) -> None:
    import ray

    from w2s_agents.rollout.ray import plan_nodes, ray_session, worker_options

    address, _ = ray_cluster
    with ray_session(RayOptions(address=address)):
        (head,) = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        half = RayOptions(worker_cpus=0.5, worker_gpus=0.5, workers_per_node=2)
        assert plan_nodes(half, 3) == [head, head]  # two per node on the only node
        assert plan_nodes(RayOptions(workers_per_node=1), 2) == [head]
        assert plan_nodes(RayOptions(worker_gpus=2, workers_per_node=1), 1) == []  # no node has 2 GPUs
        assert plan_nodes(RayOptions(), 2) == [None, None]

        class Probe:
            def placed(self) -> tuple[dict, str, list]:
                ctx = ray.get_runtime_context()
                return ctx.get_assigned_resources(), ctx.get_node_id(), ray.get_gpu_ids()

        probe = ray.remote(Probe)
        actors = [probe.options(**worker_options(half, node)).remote() for node in plan_nodes(half, 2)]
        try:
            placed = ray.get([a.placed.remote() for a in actors], timeout=60)
        finally:
            for a in actors:
                ray.kill(a)
    # two workers share the one GPU, each with half of it, on the node they were pinned to
    assert [p[0] for p in placed] == [{"CPU": 0.5, "GPU": 0.5}] * 2
    assert [p[1] for p in placed] == [head, head] and placed[0][2] == placed[1][2] and len(placed[0][2]) == 1


@pytest.mark.ray
@pytest.mark.slow
def test_rollouts_on_a_cluster_match_and_a_killed_driver_resumes(
    ray_cluster: tuple[str, Path], nano_model_dir: Path, tw_game_files: list[str], tmp_path: Path
) -> None:
    from w2s_agents.agents import Agent, AgentConfig, Sampler, load_model

    address, home = ray_cluster
    # the same trajectories in this process and on the cluster's workers (pinned, two on the node)
    agent = Agent(load_model(nano_model_dir), AgentConfig(mode="choose", max_context_tokens=768))
    samplers = [Sampler(**s) for s in SAMPLERS_CFG]
    got = {}
    for name, ray_opts in (
        ("local", None),
        ("cluster", RayOptions(workers=2, workers_per_node=2, address=address, start_timeout_s=120)),
    ):
        path = tmp_path / f"{name}.jsonl"
        with TrajectoryStore(path) as store:
            summary = collect(tw_game_files[:2], agent, samplers, store, env="w2s/TextWorld-v0", seeds=2,
                              max_steps=4, engine=EngineOptions(batch_size=2, shard_size=2), ray=ray_opts)  # fmt: skip
        assert summary.episodes == 8 and summary.worker_failures == 0
        got[name] = {t.key: _plain(t) for t in read_trajectories(path)}
    assert got["cluster"] == got["local"]

    # a driver (`w2s rollout`, joining through RAY_ADDRESS) killed mid-run; the run resumes on the cluster
    tasks = tw_game_files[:2]
    cfg = tmp_path / "job.yaml"
    cfg.write_text(json.dumps({
        "run": {"name": "job", "out_dir": str(tmp_path / "runs")},
        "model": {"path": str(nano_model_dir), "device": "cpu"},
        "agent": {"mode": "choose", "max_context_tokens": 1024},
        "rollout": {"suite": "tw-simple", "task_ids": tasks, "samplers": SAMPLERS_CFG, "seeds": 4,
                    "max_steps": 4, "batch_size": 2, "shard_size": 2, "workers": 1},
    }))  # fmt: skip
    store = tmp_path / "runs" / "job" / "trajectories.jsonl"
    env = {
        **os.environ,
        "RAY_ADDRESS": address,
        "HOME": str(home),
        "W2S_PROGRESS": "0",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.Popen([sys.executable, "-m", "w2s_agents", "rollout", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while proc.poll() is None and not (store.exists() and scan_store(store).records >= 3):
            assert time.monotonic() < deadline, "the rollout stored too few episodes in time"
            time.sleep(0.05)
        assert proc.poll() is None, f"the rollout ended early: {proc.stderr.read().decode()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    killed_at = scan_store(store).records
    assert 3 <= killed_at < 16
    assert main(["rollout", str(cfg), f"rollout.ray_address={address}"]) == 0
    scan = scan_store(store)
    want = {EpisodeKey(t, "nano", s, seed) for t in tasks for s in ("greedy", "t1-p1") for seed in range(4)}
    assert scan.keys == want and scan.records == 16 and not scan.duplicates and scan.torn_bytes == 0
    summary = json.loads((tmp_path / "runs" / "job" / "rollout-summary.json").read_text())
    assert (summary["status"], summary["episodes"], summary["skipped"]) == (
        "complete",
        16 - killed_at,
        killed_at,
    )
