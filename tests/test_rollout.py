"""The rollout engine: every episode exactly once, resume after a crash (a real SIGKILL), env failures, a tiny
agent playing TextWorld in both modes, the ``w2s rollout`` command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from w2s_agents.agents import Agent, AgentConfig, Sampler, load_model
from w2s_agents.cli import main
from w2s_agents.errors import ConfigError, W2SError
from w2s_agents.rollout import (
    EngineOptions,
    RayOptions,
    RolloutConfig,
    collect,
    episode_seed,
    plan_episodes,
    run_episodes,
    shard_episodes,
)
from w2s_agents.seeding import derive_seed
from w2s_agents.store import TrajectoryStore, read_trajectories, scan_store
from w2s_agents.types import EpisodeKey

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SAMPLERS = [Sampler(), Sampler(temperature=1.0), Sampler(temperature=0.7, top_p=0.9)]


class Corridor:
    """A tiny text game: task ``corridor/N`` is won by going east N times; ``jump`` loses.

    ``failures`` maps ``(task, step)`` to how many times that step raises (shared by every env of a factory).
    """

    env_id = "test/Corridor-v0"
    command_grammar = "go east, go west, look, jump"

    def __init__(self, failures: dict[tuple[str, int], int] | None = None) -> None:
        self.failures = failures if failures is not None else {}
        self.task = ""
        self.length = 0
        self.pos = 0
        self.moves = 0
        self.closed = 0

    @property
    def unwrapped(self) -> Corridor:
        return self

    def _info(self, won: bool = False, lost: bool = False) -> dict[str, Any]:
        return {
            "admissible_commands": ["go east", "go west", "look", "jump"],
            "won": won,
            "lost": lost,
            "score": self.pos / self.length,
        }

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[str, dict]:
        self.task = options["task"]
        if not self.task.startswith("corridor/"):
            raise W2SError(f"unknown task {self.task!r}")
        self.length = int(self.task.split("/")[1])
        self.pos = self.moves = 0
        if self.failures.get((self.task, 0), 0) > 0:
            self.failures[self.task, 0] -= 1
            raise RuntimeError("cannot load the game")
        return f"You are in room 0 of {self.length}.", {**self._info(), "instruction": "Reach the last room."}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        self.moves += 1
        key = (self.task, self.moves)
        if self.failures.get(key, 0) > 0:
            self.failures[key] -= 1
            raise RuntimeError(f"engine crashed at move {self.moves}")
        before = self.pos
        if action == "go east":
            self.pos += 1
        elif action == "go west":
            self.pos = max(0, self.pos - 1)
        won, lost = self.pos >= self.length, action == "jump"
        obs = "I beg your pardon?" if not action else f"You are in room {self.pos} of {self.length}."
        return obs, (self.pos - before) / self.length, won or lost, False, self._info(won, lost)

    def close(self) -> None:
        self.closed += 1


@pytest.fixture(scope="module")
def agent(nano_model_dir: Path) -> Agent:
    return Agent(load_model(nano_model_dir), AgentConfig(mode="choose", max_context_tokens=1024))


def _plain(traj) -> dict:
    """A trajectory record without wall-clock fields (equal for equal behaviour)."""
    d = traj.to_dict()
    for s in d["steps"]:
        s.pop("latency_s")
    return d


TASKS = ["corridor/2", "corridor/3", "corridor/5"]


def test_collect_runs_every_episode_once_and_resumes(agent: Agent, tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    seen: list[str] = []
    made: list[Corridor] = []

    def factory() -> Corridor:
        made.append(Corridor())
        return made[-1]

    with TrajectoryStore(path) as store:
        s = collect(TASKS, agent, SAMPLERS, store, env=factory, seeds=3, max_steps=6,
                    engine=EngineOptions(batch_size=4, shard_size=5),
                    on_episode=lambda t, summ: seen.append(t.task_id))  # fmt: skip
    assert len(made) == 4 and all(e.closed == 1 for e in made)  # 6 shards share 4 envs, closed at the end
    want = {EpisodeKey(t, "nano", sm.name, seed) for t in TASKS for sm in SAMPLERS for seed in range(3)}
    trajs = list(read_trajectories(path))
    assert {t.key for t in trajs} == want and len(trajs) == 27 == len(seen)
    assert (s.planned, s.episodes, s.skipped) == (27, 27, 0)
    assert s.steps == sum(t.num_steps for t in trajs) and s.successes == sum(t.success for t in trajs)
    assert s.mean_return == pytest.approx(sum(t.return_ for t in trajs) / 27)
    assert s.tokens_in == sum(st.tokens_in for t in trajs for st in t.steps) > 0
    for t in trajs:
        src = t.source
        sampler = next(x for x in SAMPLERS if x.name == src.sampler)
        assert (src.model, src.role, src.temperature, src.top_p) == (
            "nano",
            "weak",
            sampler.temperature,
            sampler.top_p,
        )
        assert t.env_id == "test/Corridor-v0" and t.instruction == "Reach the last room."
        assert 1 <= t.num_steps <= 6 and t.end in ("won", "lost", "truncated")
        assert t.end != "truncated" or t.num_steps == 6
        assert t.extra == {"mode": "choose"}
        for st in t.steps:
            assert st.tokens_in > 0 and st.tokens_out > 0 and st.latency_s > 0
            assert st.admissible == ("go east", "go west", "look", "jump") and st.action in st.admissible
    # greedy episodes of a task are identical whatever the seed; sampled ones have their own streams
    greedy = [
        json.dumps([st.action for st in t.steps])
        for t in trajs
        if t.task_id == "corridor/5" and t.source.sampler == "greedy"
    ]
    assert len(set(greedy)) == 1
    # again: nothing to do
    with TrajectoryStore(path) as store:
        again = collect(
            TASKS,
            agent,
            SAMPLERS,
            store,
            env=Corridor,
            seeds=3,
            max_steps=6,
            engine=EngineOptions(batch_size=4, shard_size=5),
        )
    assert (again.episodes, again.skipped) == (0, 27)
    # a crash after 11 episodes, in the middle of writing the 12th: the rest is run, the first 11 are kept
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:11]) + lines[11][:40])
    with TrajectoryStore(path) as store:
        resumed = collect(
            TASKS,
            agent,
            SAMPLERS,
            store,
            env=Corridor,
            seeds=3,
            max_steps=6,
            engine=EngineOptions(batch_size=4, shard_size=5),
        )
    assert (resumed.episodes, resumed.skipped) == (16, 11)
    after = list(read_trajectories(path))
    assert sorted(t.key for t in after) == sorted(want) and scan_store(path).torn_bytes == 0
    by_key = {t.key: _plain(t) for t in trajs}
    same = sum(by_key[t.key] == _plain(t) for t in after)
    assert same == 27  # resumed episodes retrace the first run (their own seeds and streams)


def test_shards_give_the_same_trajectories_in_any_order_and_process(agent: Agent, tmp_path: Path) -> None:
    planned = plan_episodes(TASKS, SAMPLERS, [0, 1])
    assert [(e.task_id, e.sampler.name, e.seed) for e in planned[:3]] == [
        ("corridor/2", "greedy", 0),
        ("corridor/2", "greedy", 1),
        ("corridor/2", "t1-p1", 0),
    ]
    assert episode_seed("corridor/2", "t1-p1", 1) == derive_seed(1, "corridor/2", "t1-p1")
    shards = shard_episodes(planned, 4)
    assert [len(s) for s in shards] == [4, 4, 4, 4, 2]
    with TrajectoryStore(tmp_path / "a.jsonl") as store:
        collect(
            TASKS,
            agent,
            SAMPLERS,
            store,
            env=Corridor,
            seeds=2,
            max_steps=5,
            engine=EngineOptions(batch_size=3, shard_size=4),
        )
    reference = {t.key: _plain(t) for t in read_trajectories(tmp_path / "a.jsonl")}
    # what a Ray worker does: one shard at a time, shards in any order, a fresh agent replica
    replica = Agent(load_model(agent.lm.path), agent.config)
    reverse = [
        t
        for shard in reversed(shards)
        for t in run_episodes(replica, Corridor, shard, batch_size=3, max_steps=5)
    ]
    assert {t.key: _plain(t) for t in reverse} == reference


def test_env_failures_restart_the_episode_or_store_an_error(agent: Agent, tmp_path: Path) -> None:
    clean = list(run_episodes(agent, Corridor, plan_episodes(["corridor/3"], SAMPLERS[:2], [0]), max_steps=4))
    failures = {("corridor/3", 2): 1}
    flaky = list(
        run_episodes(
            agent, lambda: Corridor(failures), plan_episodes(["corridor/3"], SAMPLERS[:2], [0]), max_steps=4
        )
    )
    assert failures == {("corridor/3", 2): 0}
    # restarted from scratch, the episode retraces the clean run
    assert sorted(map(_plain, flaky), key=str) == sorted(map(_plain, clean), key=str)
    broken = {("corridor/2", 1): 99, ("corridor/4", 0): 99}
    made: list[Corridor] = []

    def factory() -> Corridor:
        made.append(Corridor(broken))
        return made[-1]

    with TrajectoryStore(tmp_path / "e.jsonl") as store:
        s = collect(
            ["corridor/2", "corridor/3", "corridor/4"],
            agent,
            SAMPLERS[:1],
            store,
            env=factory,
            max_steps=4,
            engine=EngineOptions(episode_retries=2),
        )
    trajs = {t.task_id: t for t in read_trajectories(tmp_path / "e.jsonl")}
    assert s.errors == 2 and s.episodes == 3
    assert broken == {("corridor/2", 1): 96, ("corridor/4", 0): 96}  # 1 try + 2 restarts each
    no_game = trajs["corridor/4"]  # failed before the env could tell its id, instruction or first observation
    assert no_game.end == "error" and no_game.env_id == "unknown" and no_game.initial_observation == ""
    assert no_game.extra["error"] == "reset: RuntimeError: cannot load the game"
    err = trajs["corridor/2"]
    assert err.end == "error" and not err.success and err.steps == ()
    assert err.extra["error"] == "step 1: RuntimeError: engine crashed at move 1"
    assert trajs["corridor/3"].end != "error"
    assert all(e.closed for e in made)  # every env was closed (failed ones at once, the rest at the end)
    # an unknown task is the user's error: it stops the run at once instead of storing error episodes
    with (
        TrajectoryStore(tmp_path / "u.jsonl") as store,
        pytest.raises(W2SError, match="unknown task 'maze/1'"),
    ):
        collect(
            ["corridor/2", "maze/1"],
            agent,
            SAMPLERS[:1],
            store,
            env=Corridor,
            max_steps=2,
            engine=EngineOptions(batch_size=1),
        )
    assert [t.task_id for t in read_trajectories(tmp_path / "u.jsonl")] == ["corridor/2"]


def test_unparseable_answers_become_empty_commands(nano_model_dir: Path, tmp_path: Path) -> None:
    agent = Agent(
        load_model(nano_model_dir), AgentConfig(mode="generate", max_new_tokens=4, bare_action=False)
    )
    with TrajectoryStore(tmp_path / "g.jsonl") as store:
        s = collect(["corridor/2"], agent, SAMPLERS[1:2], store, env=Corridor, seeds=2, max_steps=3)
    trajs = list(read_trajectories(tmp_path / "g.jsonl"))
    assert s.unparseable == 6 == sum(t.num_steps for t in trajs)
    for st in (st for t in trajs for st in t.steps):
        assert st.action == "" and st.observation == "I beg your pardon?"
        assert st.extra["parse_error"] == "no 'Action:' in the output" and st.extra["raw_output"]
        assert st.tokens_out == 4


def test_collect_checks_its_arguments(agent: Agent, tmp_path: Path) -> None:
    with TrajectoryStore(tmp_path / "x.jsonl") as store:
        for kwargs, msg in (
            ({"tasks": []}, "at least one task"),
            ({"samplers": []}, "at least one sampler"),
            ({"seeds": []}, "at least one seed"),
            ({"tasks": ["corridor/2", "corridor/2"]}, "each task must be given once"),
            ({"samplers": [Sampler(), Sampler(temperature=0.0)]}, "each sampler name"),
        ):
            args = {"tasks": ["corridor/2"], "samplers": SAMPLERS, **kwargs}
            with pytest.raises(W2SError, match=msg):
                collect(
                    args["tasks"], agent, args["samplers"], store, env=Corridor, seeds=kwargs.get("seeds", 1)
                )
        with pytest.raises(W2SError, match="not from a callable"):
            collect(["corridor/2"], agent, SAMPLERS, store, env=Corridor, ray=RayOptions(workers=2))
    with pytest.raises(ConfigError, match="names must be unique"):
        RolloutConfig(samplers=[Sampler(), Sampler()])


# ------------------------------------------------------------------------------------------- TextWorld


@pytest.mark.slow
def test_tiny_agent_plays_textworld_in_both_modes(
    nano_model_dir: Path, game_cache_dir: Path, tw_test_suites: dict, tmp_path: Path
) -> None:
    suite = tw_test_suites["tw-simple"]
    tasks = [
        *suite.task_ids("train"),
        *suite.task_ids("valid"),
        *suite.task_ids("test"),
        *tw_test_suites["tw-coin_collector"].task_ids("train")[:1],
    ]
    assert len(tasks) == 5
    lm = load_model(nano_model_dir)
    for mode in ("choose", "generate"):
        agent = Agent(lm, AgentConfig(mode=mode, max_context_tokens=768, max_new_tokens=10))
        path = tmp_path / f"{mode}.jsonl"
        with TrajectoryStore(path) as store:
            s = collect(tasks, agent, SAMPLERS[:2], store, env="w2s/TextWorld-v0", env_kwargs={"cache_dir": game_cache_dir},
                        seeds=5, max_steps=3, engine=EngineOptions(batch_size=16))  # fmt: skip
        trajs = list(read_trajectories(path))
        assert s.episodes == 50 == len({t.key for t in trajs}) and s.errors == 0
        for t in trajs:
            assert (
                t.env_id == "w2s/TextWorld-v0"
                and t.end in ("won", "lost", "truncated")
                and 1 <= t.num_steps <= 4
            )
            for st in t.steps:
                assert st.tokens_in > 0 and st.tokens_out > 0 and st.latency_s > 0 and st.admissible
                if "parse_error" in st.extra:  # the env answered an empty command
                    assert st.action == "" and st.observation == "I beg your pardon?"
                elif mode == "choose":
                    assert st.action in st.admissible


# ------------------------------------------------------------------------------------------- CLI


def _job(tmp_path: Path, model: Path | None, tasks: list[str], **rollout: Any) -> Path:
    cfg = {
        "run": {"name": "job", "out_dir": str(tmp_path / "runs")},
        "model": {
            "path": str(model) if model else None,
            "device": "cpu",
            "tiny_preset": "nano",
            "vocab_size": 400,
        },
        "agent": {"mode": "choose", "max_context_tokens": 1024},
        "rollout": {
            "suite": "tw-simple",
            "task_ids": tasks,
            "samplers": [{"temperature": 0.0}, {"temperature": 1.0}],
            "seeds": 6,
            "max_steps": 6,
            "batch_size": 4,
            "shard_size": 4,
            "threads": 1,
            **rollout,
        },
    }
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def _stop_rollout_at(cfg: Path, store: Path, records: int, sig: int) -> tuple[int, str]:
    """Run ``w2s rollout cfg`` in a subprocess and send it ``sig`` once the store holds ``records`` episodes;
    return its exit status and standard error."""
    env = {**os.environ, "W2S_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "w2s_agents", "rollout", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if store.exists() and scan_store(store).records >= records:
                break
            time.sleep(0.02)
        assert proc.poll() is None, (
            f"the rollout ended before the signal: {proc.stderr.read().decode()[-2000:]}"
        )
        os.kill(proc.pid, sig)
        status = proc.wait(timeout=60)
        return status, proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


@pytest.mark.slow
def test_rollout_sigkilled_half_way_then_rerun(
    nano_model_dir: Path, tw_game_files: list[str], tmp_path: Path, capsys
) -> None:
    cfg = _job(tmp_path, nano_model_dir, tw_game_files[:2])
    store = tmp_path / "runs" / "job" / "trajectories.jsonl"
    # a scheduler's SIGTERM: an orderly stop with what is finished stored
    status, err = _stop_rollout_at(cfg, store, 3, signal.SIGTERM)
    assert status == 128 + signal.SIGTERM and "terminated; finished episodes are stored" in err
    termed_at = scan_store(store).records
    assert 3 <= termed_at < 24 and scan_store(store).torn_bytes == 0
    # SIGKILL: no chance to clean up; at most the line being written is torn
    status, _ = _stop_rollout_at(cfg, store, termed_at + 4, signal.SIGKILL)
    assert status == -signal.SIGKILL
    killed_at = scan_store(store).records
    assert termed_at + 4 <= killed_at < 24
    assert main(["rollout", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert f"{24 - killed_at} episodes run, {killed_at} already stored (24 planned)" in out
    scan = scan_store(store)
    assert scan.records == 24 and not scan.duplicates and scan.torn_bytes == 0 and not scan.missing_newline
    keys = [t.key for t in read_trajectories(store)]
    want = {
        EpisodeKey(t, "nano", s, seed)
        for t in tw_game_files[:2]
        for s in ("greedy", "t1-p1")
        for seed in range(6)
    }
    assert len(keys) == 24 and set(keys) == want
    assert main(["rollout", str(cfg)]) == 0
    assert "0 episodes run, 24 already stored" in capsys.readouterr().out
    summary = json.loads((tmp_path / "runs" / "job" / "rollout-summary.json").read_text())
    assert (summary["planned"], summary["episodes"], summary["skipped"]) == (24, 0, 24)


@pytest.mark.slow
def test_rollout_command_builds_a_tiny_model_and_refuses_bad_input(
    tw_game_files: list[str], tmp_path: Path, capsys
) -> None:
    cfg = _job(tmp_path, None, tw_game_files[:1], seeds=1, max_steps=2)
    assert main(["rollout", str(cfg), "rollout.max_stesp=3"]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1 and "unknown config key 'rollout.max_stesp' (did you mean 'max_steps'?)" in err
    )
    assert main(["rollout", "rollout.seeds=2"]) == 2
    assert "needs a config file" in capsys.readouterr().err
    assert main(["rollout", str(cfg), "model.path=/nonexistent/model"]) == 2
    assert "is not a local directory" in capsys.readouterr().err
    assert main(["rollout", str(cfg)]) == 0  # model.path null: a tiny model is built from the tasks' text
    assert "2 episodes run" in capsys.readouterr().out
    meta = json.loads((tmp_path / "runs" / "job" / "model" / "w2s_model.json").read_text())
    assert meta["preset"] == "nano" and meta["corpus_texts"] > 10
    assert (tmp_path / "runs" / "job" / "config.yaml").is_file()
    # resuming with settings that change the trajectories is refused; more seeds or samplers are fine
    assert main(["rollout", str(cfg), "rollout.max_steps=3"]) == 2
    err = capsys.readouterr().err
    assert "holds a run started with another config: rollout.max_steps (2 -> 3)" in err
    assert main(["rollout", str(cfg), "rollout.samplers=[{name: greedy, temperature: 0.5}]"]) == 2
    assert "rollout.samplers[greedy]" in capsys.readouterr().err
    assert main(["rollout", str(cfg), "rollout.seeds=2"]) == 0
    assert "2 episodes run, 2 already stored (4 planned)" in capsys.readouterr().out


def test_choose_agent_plays_the_same_with_and_without_the_prefix_cache(nano_model_dir: Path) -> None:
    lm = load_model(nano_model_dir)
    eps = plan_episodes(["corridor/3", "corridor/5"], [Sampler(), Sampler(temperature=1.0)], [0, 1])
    played = {}
    for size in (0, 64):
        agent = Agent(lm, AgentConfig(prefix_cache=size, prompt_admissible=False))
        trajs = sorted(run_episodes(agent, Corridor, eps, batch_size=3, max_steps=6), key=lambda t: t.key)
        played[size] = [_plain(t) for t in trajs]
        if size:
            cache = agent.prefix_cache
            assert cache is not None and cache.reused_tokens > cache.fed_tokens  # most tokens came cached
        else:
            assert agent.prefix_cache is None
    assert played[0] == played[64]
