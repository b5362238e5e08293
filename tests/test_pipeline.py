"""The whole pipeline in miniature: every artefact, then a run killed mid-way and resumed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from w2s_agents.pipeline import build_stages, run_pipeline, stage_names
from w2s_agents.pipeline.cache import stage_keys
from w2s_agents.pipeline.experiment import load_experiment
from w2s_agents.pipeline.stage_io import plays_valid
from w2s_agents.store import read_trajectories


@pytest.fixture()
def mini_config(tmp_path: Path, w2s_cache: Path, pipeline_runs: ModuleType) -> Path:
    """The miniature experiment (tests/pipeline_runs.py ``MINI``) in a file, its runs under ``tmp_path``."""
    path = tmp_path / "mini.yaml"
    path.write_text(pipeline_runs.MINI.format(out=tmp_path / "runs"))
    return path


def test_stage_table_names_each_stages_inputs() -> None:
    """Dependencies are part of the stage keys: a changed table would redo finished stages of old runs."""
    deps = {s.name: s.deps for s in build_stages(load_experiment(None), 0)}
    assert deps == {
        "tasks": (),
        "held-out": (),
        "demos": ("tasks",),
        "models": ("demos",),
        "weak-sft": ("models",),
        "strong-sft": ("models",),
        "ceiling-sft": ("models",),  # scarce demos: the ceiling starts from every train task's demo
        "explore": ("weak-sft",),
        "trees": ("explore",),
        "search": ("trees", "demos"),
        "w2s-mcts": ("search", "models"),
        "ceiling": ("search", "ceiling-sft"),
        "eval": ("held-out", "weak-sft", "strong-sft", "ceiling-sft", "explore", "w2s-mcts", "ceiling"),
    }
    treedpo = load_experiment(None, ["train.variants=[w2s-mcts, w2s-treedpo]"])
    assert {s.name: s.deps for s in build_stages(treedpo, 0)}["w2s-treedpo"] == (
        "search",
        "strong-sft",
        "weak-sft",
    )
    cfg = load_experiment(
        None, ["expand.iterations=2", "train.variants=[w2s-mcts-treedpo]", "train.ceiling=false"]
    )
    deps = {s.name: s.deps for s in build_stages(cfg, 0)}
    assert deps["expand"] == ("trees", "weak-sft") and deps["search"] == ("expand", "demos")
    assert deps["w2s-mcts-treedpo"] == ("search", "w2s-mcts", "weak-sft")  # W2S-MCTS runs as its start
    assert deps["eval"] == ("held-out", "weak-sft", "strong-sft", "explore", "w2s-mcts", "w2s-mcts-treedpo")


def test_held_out_tasks_retrain_nothing_unless_training_plays_them() -> None:
    """More test games, or evaluating on the valid split, reruns ``held-out`` and ``eval`` only: the settings
    chosen on the valid games are evaluated on the test games with the very models they were chosen on. Only
    ``train.valid_success`` with valid tasks makes the training stages read (and depend on) the held-out games."""
    keys = stage_keys(build_stages(load_experiment(None), 0))
    for overrides in (
        ["tasks.test=20"],
        ["tasks.valid=20", "eval.split=valid", "train.valid_success=false"],
        ["tasks.valid=20", "train.valid_success=false"],
    ):
        other = stage_keys(build_stages(load_experiment(None, overrides), 0))
        assert {n for n, k in keys.items() if other[n] != k} == {"held-out", "eval"}, overrides
    played = build_stages(load_experiment(None, ["tasks.valid=20"]), 0)  # valid_success is on by default
    deps = {s.name: s.deps for s in played}
    for name in ("weak-sft", "strong-sft", "ceiling-sft", "w2s-mcts", "ceiling"):
        assert deps[name][-1] == "held-out", name
    assert "held-out" not in deps["explore"] and "held-out" not in deps["search"]
    # the train tasks are the tasks stage's: more of them redo every stage but held-out
    more = stage_keys(build_stages(load_experiment(None, ["tasks.train=61"]), 0))
    assert {n for n, k in keys.items() if more[n] == k} == {"held-out"}


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_miniature_pipeline_writes_every_artefact(
    feature_run: Any, pipeline_runs: ModuleType, w2s_cache: Path, tmp_path: Path
) -> None:
    """The shared feature run (tests/pipeline_runs.py): every stage ran once and wrote its artefacts, a rerun
    reuses them all, ``from_stage`` redoes a stage and the ones after it."""
    cfg = feature_run.cfg
    names = stage_names(cfg)
    assert names == [
        "tasks",
        "held-out",
        "demos",
        "models",
        "weak-sft",
        "strong-sft",
        "ceiling-sft",
        "models-b",
        "weak-sft-b",
        "explore",
        "explore-b",
        "trees",
        "search",
        "w2s-mcts",
        "w2s-treedpo",
        "w2s-mcts-treedpo",
        "ceiling",
        "strong-explore",
        "eto",
        "best-of-n",
        "explore-r2",
        "trees-r2",
        "search-r2",
        "w2s-mcts-r2",
        "w2s-treedpo-r2",
        "w2s-mcts-treedpo-r2",
        "eval",
    ]
    run = feature_run.result.run_dir
    seed_dir = run / "seed-0"
    for name in names:
        done = json.loads((seed_dir / name / "_done.json").read_text())
        assert done["stage"] == name
    # every stage ran once: the first invocation up to its stop, the resumed one the rest
    stop = names.index(pipeline_runs.STOP) + 1
    assert [(r.name, r.status) for r in feature_run.first.records[0]] == [(n, "done") for n in names[:stop]]
    assert [(r.name, r.status) for r in feature_run.result.records[0]] == [
        (n, "cached" if i < stop else "done") for i, n in enumerate(names)
    ]
    tasks = json.loads((seed_dir / "tasks" / "tasks.json").read_text())
    tasks |= json.loads((seed_dir / "held-out" / "tasks.json").read_text())
    assert [len(tasks[s]) for s in ("train", "valid", "test")] == [4, 1, 2]
    # exploration: every (task, sampler) once per explore seed; one tree per task; search outputs
    trajs = list(read_trajectories(seed_dir / "explore" / "trajectories.jsonl"))
    assert sorted((t.task_id, t.source.sampler) for t in trajs) == sorted(
        (t, s) for t in tasks["train"] for s in ("greedy", "t1.5-p1") for _ in range(cfg.explore.seeds)
    )
    assert len({(t.task_id, t.source.sampler, t.source.seed) for t in trajs}) == len(trajs)
    assert len(list((seed_dir / "trees" / "trees").glob("*.json"))) == 4
    assert (seed_dir / "search" / "sft.jsonl").stat().st_size > 0
    # every tree's best path: shortened only when shorter (and then replayed in the game), summed in the metrics
    paths = json.loads((seed_dir / "search" / "paths.json").read_text())
    assert paths["summary"]["trees"] == 4 == len(paths["trees"])
    for entry in paths["trees"]:
        assert entry["steps"] <= entry["raw_steps"] or entry["won"]
        assert entry["path"] != "tree" or entry["steps"] == entry["raw_steps"]
    # every trained model loads; evaluation of each on the test tasks
    # strict JSON: a number that cannot be computed is null with a reason, never NaN
    metrics = json.loads((run / "metrics.json").read_text(), parse_constant=pytest.fail)
    assert metrics["schema"] == "w2s.metrics/1"
    evaluated = set(metrics["models"])
    assert {"weak-sft", "strong-sft", "w2s-mcts", "ceiling"} <= evaluated
    for name, m in metrics["models"].items():
        assert m["episodes"] == 2, name
        assert 0.0 <= m["return"]["estimate"] <= 1.0
    assert "w2s-mcts" in metrics["misfit"] and metrics["misfit"]["w2s-mcts"]["states"] > 0
    assert {k: metrics["best_paths"][k] for k in paths["summary"]} == paths["summary"]
    # every train task has a won expert demo (SFT sees the first tasks.demos of them)
    assert metrics["best_paths"]["with_expert_demo"] == 4
    # correction / expansion: the counts of the train tasks the weak SFT agent failed (and no exploration
    # solved) that W2S-MCTS solves, as recorded per task in the eval stage
    ev = json.loads((seed_dir / "eval" / "eval.json").read_text())
    weak, w2s, explored = ev["train"]["weak-sft"], ev["train"]["w2s-mcts"], ev["explored_solved"]
    assert set(weak) == set(w2s) == set(explored) == set(tasks["train"])
    tr = metrics["transfer"]["w2s-mcts"]
    assert tr["weak_failed"] == sum(not ok for ok in weak.values())
    assert tr["corrected"] == sum(w2s[t] for t, ok in weak.items() if not ok)
    assert tr["uncovered"] == sum(not ok for ok in explored.values())
    assert tr["expanded"] == sum(w2s[t] for t, ok in explored.items() if not ok)
    report = (run / "report.md").read_text()
    # the W2S rows of a run of two rounds are labelled by round
    for label in ("Weak SFT", "Strong SFT", "W2S-MCTS (round 1)", "Ceiling"):
        assert f"| {label} | " in report
    assert (run / "plots" / "returns.png").is_file()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["packages"]["torch"] and len(manifest["stages"]) == len(names)
    assert (run / "config.yaml").is_file()
    # a second run reuses everything
    again = run_pipeline(cfg)
    assert [r.status for r in again.records[0]] == ["cached"] * len(names)
    # --from redoes a stage and the ones after it (in a copy of the run: the other tests read the shared one)
    copy = tmp_path / "runs"
    shutil.copytree(run.parent, copy, symlinks=True)
    moved = load_experiment(feature_run.config, [*pipeline_runs.FEATURES, f"run.out_dir={copy}"])
    redo = run_pipeline(moved, from_stage="w2s-mcts")
    assert redo.run_dir == copy / run.name
    at = names.index("w2s-mcts")
    assert [(r.name, r.status) for r in redo.records[0]] == [
        (n, "cached" if i < at else "done") for i, n in enumerate(names)
    ]


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_online_expansion_stage_grows_the_trees_before_the_search(mini_config: Path) -> None:
    from w2s_agents.tree import TrajectoryTree

    cfg = load_experiment(
        mini_config, ["expand.iterations=3", "expand.max_env_steps=40", "run.name=mini-expand"]
    )
    names = stage_names(cfg)
    assert names[names.index("trees") + 1 : names.index("search") + 1] == ["expand", "search"]
    result = run_pipeline(cfg, until="search")
    seed_dir = result.run_dir / "seed-0"
    totals = json.loads((seed_dir / "expand" / "expand.json").read_text())
    assert totals["trees"] == 3 and 1 <= totals["iterations"] <= 9 and totals["env_steps"] > 0
    grew = 0
    for path in sorted((seed_dir / "trees" / "trees").glob("*.json")):
        before = TrajectoryTree.load(path)
        after = TrajectoryTree.load(seed_dir / "expand" / "trees" / path.name)
        searched = TrajectoryTree.load(seed_dir / "search" / "trees" / path.name)
        # the data trajectories are all there, plus the search's own episodes under their source
        assert after.sources(0)["weak-sft"] == before.visits(0)
        assert after.visits(0) == before.visits(0) + after.sources(0).get("weak-sft-search", 0)
        assert len(searched) == len(after)  # MCTS ran on the expanded tree
        grew += len(after) - len(before)
    assert grew == totals["new_nodes"] > 0
    # a rerun finds every stage done, the expansion included
    again = run_pipeline(cfg, until="search")
    assert {r.name: r.status for r in again.records[0]}["expand"] == "cached"


@pytest.mark.slow
def test_a_killed_run_resumes_without_redoing_finished_stages(mini_config: Path, tmp_path: Path) -> None:
    env = {**os.environ, "W2S_PROGRESS": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "w2s_agents.cli", "run", str(mini_config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    seed_dir = tmp_path / "runs" / "mini" / "seed-0"
    deadline = time.monotonic() + 300
    while not (seed_dir / "weak-sft" / "_done.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the run did not finish weak-sft in time"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    finished = {p.parent.name for p in seed_dir.glob("*/_done.json")}
    assert {"tasks", "demos", "models", "weak-sft"} <= finished
    result = run_pipeline(load_experiment(mini_config))
    statuses = {r.name: r.status for r in result.records[0]}
    for name in finished:
        assert statuses[name] == "cached", name
    assert all(s in ("done", "cached") for s in statuses.values())
    keys = [t.key for t in read_trajectories(seed_dir / "explore" / "trajectories.jsonl")]
    assert len(keys) == len(set(keys)) == 6
    assert (tmp_path / "runs" / "mini" / "report.md").is_file()
    _side_by_side_matches(mini_config, result, env)


def _side_by_side_matches(mini_config: Path, in_order: Any, env: dict[str, str]) -> None:
    """The same run with its stages side by side (run.jobs=2), killed while stages run and resumed, gives the
    results of the run whose stages ran one after the other; no stage's process outlives the killed parent."""
    import psutil

    overrides = ["run.jobs=2", "run.name=mini-jobs"]
    cmd = [sys.executable, "-m", "w2s_agents.cli", "run", str(mini_config), *overrides]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seed_dir = in_order.run_dir.parent / "mini-jobs" / "seed-0"
    deadline = time.monotonic() + 300
    while not (seed_dir / "weak-sft" / "_done.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the run did not finish weak-sft in time"
        time.sleep(0.05)
    children = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"processes {alive} outlived the killed run"
    result = run_pipeline(load_experiment(mini_config, overrides))
    statuses = {r.name: r.status for r in result.records[0]}
    assert statuses["weak-sft"] == "cached" and statuses["eval"] == "done"
    assert result.metrics["models"] == in_order.metrics["models"]

    def steps(run_dir: Path) -> list:
        trajs = read_trajectories(run_dir / "seed-0" / "explore" / "trajectories.jsonl")
        return sorted((t.key, [(s.action, s.reward) for s in t.steps]) for t in trajs)

    assert steps(result.run_dir) == steps(in_order.run_dir)
    for name in ("w2s-mcts", "ceiling"):
        model = Path("seed-0") / name / "train" / "model" / "model.safetensors"
        assert (result.run_dir / model).read_bytes() == (in_order.run_dir / model).read_bytes(), name


@pytest.mark.slow
def test_example_script_runs(tmp_path: Path, game_cache_dir: Path, repo_root: Path) -> None:
    env = {**os.environ, "W2S_PROGRESS": "0", "W2S_CACHE": str(game_cache_dir.parent / "w2s-cache")}
    out = tmp_path / "example"
    args = [
        "--out",
        str(out),
        "--train",
        "3",
        "--test",
        "2",
        "--epochs",
        "2",
        "--strong",
        "nano",
        "--max-steps",
        "6",
    ]
    proc = subprocess.run(
        [sys.executable, str(repo_root / "examples" / "weak_to_strong.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert 0.0 <= results["weak-sft"] <= 1.0
    assert "held-out success" in proc.stdout
    assert len(list(read_trajectories(out / "explore.jsonl"))) == 9  # 3 tasks x 3 samplers


@pytest.mark.slow
def test_env_plugin_example_runs(tmp_path: Path, repo_root: Path) -> None:
    env = {**os.environ, "W2S_PROGRESS": "0"}
    out = tmp_path / "vault"
    proc = subprocess.run(
        [sys.executable, str(repo_root / "examples" / "custom_env.py"), "--out", str(out), "--seeds", "2",
         "--max-steps", "8"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    trajs = list(read_trajectories(out / "trajectories.jsonl"))
    assert len(trajs) == 6 * 3 * 2 and {t.env_id for t in trajs} == {"example/Vault-v0"}
    results = json.loads((out / "results.json").read_text())
    assert results["trees"] == 6 and results["episodes"] == len(trajs)
    pages = sorted(p.name for p in (out / "viz").glob("trees__*.html"))
    assert len(pages) == 6
    index = (out / "viz" / "index.html").read_text()
    assert all(p in index for p in pages)  # the index links every tree page
    assert (out / "viz" / "first-tree.svg").read_text().lstrip().startswith("<svg")


@pytest.mark.slow
def test_scarce_demos_reach_strong_sft_only_and_w2s_data_holds_no_expert_step(feature_run: Any) -> None:
    """tasks.demos: weak and strong SFT see the demos of the first N train tasks only, the ceiling sees every
    train task's demo, and what the W2S stages train on (best paths, tree pairs) comes from the weak agents (and,
    in round 2, from round 1's W2S model), never from the expert."""
    cfg = feature_run.cfg
    assert (cfg.tasks.train, cfg.tasks.demos) == (4, 1)  # the shared run's scarce demos
    names = stage_names(cfg)
    assert names.index("ceiling-sft") < names.index("ceiling")
    deps = {s.name: s.deps for s in build_stages(cfg, 0)}
    # the shared run validates by success on the valid tasks: its training stages also read held-out
    assert plays_valid(cfg)
    assert deps["ceiling"] == ("search", "ceiling-sft", "held-out") and "ceiling-sft" in deps["eval"]
    result = feature_run.result
    seed_dir = result.run_dir / "seed-0"
    train = json.loads((seed_dir / "tasks" / "tasks.json").read_text())["train"]
    assert len(train) == 4

    def rows(path: Path) -> list[dict]:
        return [json.loads(line) for line in path.read_text().splitlines()]

    demo_rows = rows(seed_dir / "demos" / "sft.jsonl")
    assert [r["task_id"] for r in demo_rows] == train[:1]
    assert sorted(r["task_id"] for r in rows(seed_dir / "demos" / "sft-all.jsonl")) == sorted(train)
    # the SFT stages trained on exactly those rows (one of them held out for validation loss at most)
    for stage, n in (("weak-sft", 1), ("weak-sft-b", 1), ("strong-sft", 1), ("ceiling-sft", 4)):
        trained = json.loads((seed_dir / stage / "train" / "result.json").read_text())
        assert trained["rows"] + trained["skipped_rows"] <= n and trained["rows"] >= 1, stage
    # the W2S data: every best-path row and tree pair comes from the weak agents' explorations only
    demos = list(read_trajectories(seed_dir / "demos" / "demos.jsonl"))
    assert {t.source.role for t in demos} == {"expert"}
    explored = [
        t
        for stage in ("explore", "explore-b")
        for t in read_trajectories(seed_dir / stage / "trajectories.jsonl")
    ]
    assert explored and {t.source.role for t in explored} == {"weak"}
    best = rows(seed_dir / "search" / "sft.jsonl")
    pairs = rows(seed_dir / "search" / "pairs.jsonl")
    assert best, "no best-path row to check"
    for row in best:
        assert set(row["sources"]) <= {t.source.model for t in explored}, row["sources"]
    for pair in pairs:
        for key in ("chosen_sources", "rejected_sources"):
            assert set(pair[key]) <= {t.source.model for t in explored}, pair[key]
    assert not {t.source.model for t in demos} & {t.source.model for t in explored}
    # round 2's data: the weak agents' episodes and round 1's W2S model's, still no expert step
    explored += read_trajectories(seed_dir / "explore-r2" / "trajectories.jsonl")
    assert {t.source.role for t in explored} == {"weak", "strong"}
    best = rows(seed_dir / "search-r2" / "sft.jsonl")
    assert best, "no round 2 best-path row to check"
    for row in best:
        assert set(row["sources"]) <= {t.source.model for t in explored}, row["sources"]
    for pair in rows(seed_dir / "search-r2" / "pairs.jsonl"):
        for key in ("chosen_sources", "rejected_sources"):
            assert set(pair[key]) <= {t.source.model for t in explored}, pair[key]
    assert not {t.source.model for t in demos} & {t.source.model for t in explored}
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert {"strong-sft", "ceiling-sft", "ceiling"} <= set(metrics["models"])
    assert "w2s-mcts" in metrics["vs_strong"]
