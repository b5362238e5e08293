"""On-policy RL rounds (``rl.rounds``): the stage table and its keys, the config checks, the report's W2S-RL rows,
one RL round of the miniature pipeline end to end, and a stopped RL round resumed within the round."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from w2s_agents.errors import ConfigError
from w2s_agents.pipeline import build_stages, run_pipeline
from w2s_agents.pipeline.cache import stage_keys
from w2s_agents.pipeline.experiment import load_experiment
from w2s_agents.pipeline.report import MODEL_LABELS, write_report
from w2s_agents.pipeline.rl import rl_label
from w2s_agents.store import read_trajectories
from w2s_agents.tree import TrajectoryTree

RL_ROUND_1 = ["rl-explore-r1", "rl-trees-r1", "rl-search-r1", "w2s-rl-r1"]


def _table(overrides: list[str]) -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    cfg = load_experiment(None, overrides)
    stages = build_stages(cfg, 0)
    return {s.name: s.deps for s in stages}, stage_keys(stages)


def test_rl_rounds_add_stages_before_eval_and_change_no_other_key() -> None:
    deps0, keys0 = _table([])
    assert _table(["rl.rounds=0"]) == (deps0, keys0)  # the default: no RL stage
    assert not any("rl" in name.split("-") for name in deps0)
    deps1, keys1 = _table(["rl.rounds=1"])
    names0 = list(deps0)
    assert list(deps1) == [*names0[:-1], *RL_ROUND_1, "eval"]
    assert deps1["rl-explore-r1"] == ("w2s-mcts",)  # rl.start: W2S-MCTS explores first
    assert deps1["rl-trees-r1"] == ("trees", "rl-explore-r1")  # the weak agent's trees, grown
    assert deps1["rl-search-r1"] == ("rl-trees-r1",)
    assert deps1["w2s-rl-r1"] == ("rl-search-r1", "w2s-mcts")
    # eval plays the RL model; it reads none of the RL data stages
    assert deps1["eval"] == (*deps0["eval"], "w2s-rl-r1")
    assert {k: keys1[k] for k in keys0 if k != "eval"} == {k: v for k, v in keys0.items() if k != "eval"}
    assert keys1["eval"] != keys0["eval"]
    # a second round follows from the first: round 1's keys do not depend on the number of rounds
    deps2, keys2 = _table(["rl.rounds=2"])
    assert list(deps2)[-5:] == ["rl-explore-r2", "rl-trees-r2", "rl-search-r2", "w2s-rl-r2", "eval"]
    assert deps2["rl-explore-r2"] == ("w2s-rl-r1",)
    assert deps2["rl-trees-r2"] == ("rl-trees-r1", "rl-explore-r2")
    assert deps2["w2s-rl-r2"] == ("rl-search-r2", "w2s-rl-r1", "w2s-mcts")  # KL to rl.start's model
    changed = [k for k in keys2 if keys2[k] != keys1.get(k)]
    assert changed == [*(n.replace("r1", "r2") for n in RL_ROUND_1), "eval"]
    # the RL settings enter only the RL stages; rl.start changes round 1's explorer
    _, other = _table(["rl.rounds=1", "rl.advantage=trajectory", "train.rl.lr=0.001"])
    assert [k for k in other if other[k] != keys1[k]] == ["rl-search-r1", "w2s-rl-r1", "eval"]
    deps, _ = _table(["rl.rounds=1", "rl.start=strong-sft"])
    assert deps["rl-explore-r1"] == ("strong-sft",) and deps["w2s-rl-r1"] == ("rl-search-r1", "strong-sft")


def test_rl_after_run_rounds_starts_from_the_last_rounds_model_and_trees() -> None:
    deps, keys = _table(["run.rounds=2", "rl.rounds=1"])
    names = list(deps)
    assert names.index("w2s-mcts-r2") < names.index("rl-explore-r1")
    assert deps["rl-explore-r1"] == ("w2s-mcts-r2",)
    assert deps["rl-trees-r1"] == ("trees-r2", "rl-explore-r1")
    _, without = _table(["run.rounds=2"])
    assert {k: keys[k] for k in without if k != "eval"} == {k: v for k, v in without.items() if k != "eval"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["rl.rounds=-1"], "'rounds' must be >= 0, got -1"),
        (
            ["rl.rounds=1", "train.variants=[w2s-treedpo]"],
            "'rl.start' is 'w2s-mcts', which this run does not train (train.variants: [w2s-treedpo])",
        ),
        (["rl.rounds=1", "train.rl.method=sft"], "'train.rl.method' is 'sft': the RL rounds train by policy"),
        (["rl.min_abs_advantage=-0.1"], "'min_abs_advantage' must be a number >= 0"),
        (["rl.advantage=value"], "config key 'rl.advantage': expected one of 'step'"),
    ],
)
def test_bad_rl_settings_are_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_experiment(None, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_rl_settings_are_not_checked_without_rl_rounds() -> None:
    load_experiment(None, ["train.variants=[w2s-treedpo]"])  # rl.start w2s-mcts, but no RL round
    load_experiment(None, ["rl.rounds=1", "rl.start=strong-sft", "train.variants=[w2s-treedpo]"])


def test_report_shows_w2s_rl_rows_after_the_w2s_models_and_before_the_ceiling(tmp_path: Path) -> None:
    assert rl_label("w2s-rl-r12") == "W2S-RL (round 12)"
    assert rl_label("w2s-rl") is None and rl_label("w2s-mcts-r1") is None
    names = ["ceiling", "w2s-rl-r2", "weak-sft", "w2s-treedpo", "w2s-rl-r1", "w2s-mcts", "strong-sft"]
    interval = {"estimate": 0.5, "low": 0.4, "high": 0.6, "n": 2, "level": 0.95}
    models = {n: {"label": rl_label(n) or MODEL_LABELS[n], "return": interval, "episodes": 2} for n in names}
    per_round = [
        {"round": 1, "explored_by": "w2s-mcts-r1", "episodes": 6, "successes": 2, "tasks_solved": 2,
         "trajectories": 12, "nodes": 30, "rows": 9, "positive": 4, "negative": 5, "mean_advantage": -0.01,
         "models": ["w2s-rl-r1"]},
        {"round": 2, "explored_by": "w2s-rl-r1", "episodes": 6, "successes": 3, "tasks_solved": 3,
         "trajectories": 18, "nodes": 35, "rows": 0, "positive": 0, "negative": 0, "mean_advantage": None,
         "models": [], "skipped": ["seed 0: training skipped, no policy-gradient rows"]},
    ]  # fmt: skip
    metrics = {
        "schema": "w2s.metrics/1",
        "models": models,
        "pgr": {n: interval for n in names if n.startswith("w2s-")},
        "rl": {"rounds": 2, "start": "w2s-mcts", "advantage": "step", "per_round": per_round},
    }
    report = write_report(metrics, tmp_path, plots=False).read_text()
    rows = [line.split(" | ")[0].removeprefix("| ") for line in report.splitlines() if line.startswith("| ")]
    assert rows[2 : 2 + len(names)] == [
        "Weak SFT",
        "Strong SFT",
        "W2S-TreeDPO",
        "W2S-MCTS",
        "W2S-RL (round 1)",
        "W2S-RL (round 2)",
        "Ceiling",
    ]
    assert rows.count("W2S-RL (round 1)") == 2  # the results and the weak-to-strong tables
    assert "## RL rounds" in report and "Round 1 starts from W2S-MCTS" in report
    assert (
        "| 1 | `w2s-mcts-r1` | 6 (2) | 2 | 12 | 30 | 9 (4 / 5) | -0.010 | W2S-RL (round 1) 50.0 |" in report
    )
    assert "| 2 | `w2s-rl-r1` | 6 (3) | 3 | 18 | 35 | 0 (0 / 0) | n/a | none trained |" in report
    assert "- Round 2: seed 0: training skipped, no policy-gradient rows." in report


# ------------------------------------------------------------------ one RL round of the miniature pipeline

RL_RUN = [
    "run.name=rl",
    "train.variants=[w2s-mcts]",
    # the strong SFT agent learns the three demos, so that its episodes win some games and the grown trees'
    # values (and advantages) are not all zero as the nano weak agent's are
    "train.strong_sft.epochs=80",
    "train.strong_sft.lr=0.02",
    "train.strong_sft.export=last",
    "rl.rounds=1",
    "rl.start=strong-sft",
    "rl.min_abs_advantage=0.0",
    "train.rl.lr=0.003",
    "train.rl.epochs=2",
    "train.rl.batch_size=4",
    "train.rl.checkpoint_every=1",
]
"""``MINI`` (tests/pipeline_runs.py) with one RL round from strong SFT, checkpointed at every step."""


@pytest.fixture(scope="module")
def rl_run(tmp_path_factory: pytest.TempPathFactory, game_cache_dir: Path, pipeline_runs: ModuleType) -> Any:
    """The miniature run with one RL round, run once for this module: ``(config file, config, result)``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the nano models run fastest on one thread
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("W2S_CACHE", str(game_cache_dir.parent / "w2s-cache"))
            root = tmp_path_factory.mktemp("rl-run")
            config = root / "mini.yaml"
            config.write_text(pipeline_runs.MINI.format(out=root / "runs"))
            cfg = load_experiment(config, RL_RUN)
            return config, cfg, run_pipeline(cfg)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_one_rl_round_end_to_end(rl_run: Any) -> None:
    from w2s_agents.search.advantages import pg_rows
    from w2s_agents.search.values import node_values

    _, cfg, result = rl_run
    seed_dir = result.run_dir / "seed-0"
    names = [r.name for r in result.records[0]]
    assert names[-5:] == [*RL_ROUND_1, "eval"] and {r.status for r in result.records[0]} == {"done"}
    # the round's episodes: W2S-MCTS on every train task with the explore settings, under its own source
    train = json.loads((seed_dir / "tasks" / "tasks.json").read_text())["train"]
    weak = list(read_trajectories(seed_dir / "explore" / "trajectories.jsonl"))
    strong = list(read_trajectories(seed_dir / "rl-explore-r1" / "trajectories.jsonl"))
    assert len(strong) == len(weak) == len(train) * len(cfg.explore.samplers) * cfg.explore.seeds

    def played(trajs: list) -> list:
        return sorted((t.task_id, t.source.sampler, t.source.seed) for t in trajs)

    assert played(strong) == played(weak)  # the same (task, sampler, episode seed)s
    assert {(t.source.model, t.source.role) for t in strong} == {("strong-sft", "strong")}
    # the grown trees hold both sources, counted per source; the weak agent's trees are unchanged
    per_task = len(weak) // len(train)
    rows = [json.loads(line) for line in (seed_dir / "rl-search-r1" / "pg.jsonl").open()]
    assert rows
    remade = []
    for path in sorted((seed_dir / "rl-search-r1" / "trees").glob("*.json")):
        tree = TrajectoryTree.load(path)
        assert tree.sources(0) == {"weak-sft": per_task, "strong-sft": per_task}
        weak_tree = TrajectoryTree.load(seed_dir / "trees" / "trees" / path.name)
        assert weak_tree.sources(0) == {"weak-sft": per_task}
        # the rows' advantages are the searched grown trees': A(n) = Q(n) - V(parent), Q the search value
        q = node_values(tree, cfg.search.value)
        for r in pg_rows(tree, level="step", value=cfg.search.value, system=None):
            assert r.q == pytest.approx(q[r.node])
            remade.append((r.task_id, r.node, r.advantage, r.q, r.v, list(r.sources)))
    assert [(r["task_id"], r["node"], r["advantage"], r["q"], r["v"], r["sources"]) for r in rows] == remade
    assert any("strong-sft" in r["sources"] for r in rows) and any("weak-sft" in r["sources"] for r in rows)
    assert any(r["advantage"] > 0 for r in rows) and any(r["advantage"] < 0 for r in rows)
    # W2S-RL trained on those rows from strong SFT by policy gradient
    info = json.loads((seed_dir / "w2s-rl-r1" / "model.json").read_text())
    assert info["method"] == "pg" and info["rows"] == len(rows) and info["steps"] > 0
    # and was evaluated and reported as the W2S models are
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    model = metrics["models"]["w2s-rl-r1"]
    assert model["label"] == "W2S-RL (round 1)" and model["episodes"] == 2
    for section in ("pgr", "vs_strong", "misfit", "transfer"):
        assert "w2s-rl-r1" in metrics[section], section
    (rl,) = metrics["rl"]["per_round"]
    assert rl["explored_by"] == "strong-sft" and rl["episodes"] == len(strong)
    assert rl["rows"] == len(rows) and rl["models"] == ["w2s-rl-r1"]
    assert rl["trajectories"] == len(weak) + len(strong)
    report = (result.run_dir / "report.md").read_text()
    assert "| W2S-RL (round 1) | " in report and "| W2S-MCTS | " in report and "## RL rounds" in report


@pytest.mark.slow
def test_a_stopped_rl_round_resumes_within_its_round(
    rl_run: Any,
    w2s_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A stage of the RL round stopped part-way (what a killed process leaves: a partial trajectory store with a
    torn last line; training checkpoints and no result) carries on within the round: no episode lost or played
    twice, the training resumed from its checkpoint to the uninterrupted run's weights."""
    import torch
    from safetensors.torch import load_file

    from w2s_agents.trainers.pg import PGObjective

    config, _, result = rl_run
    copy = tmp_path / "runs"
    shutil.copytree(result.run_dir.parent, copy, symlinks=True)
    cfg = load_experiment(config, [*RL_RUN, f"run.out_dir={copy}"])
    original, seed_dir = result.run_dir / "seed-0", copy / "rl" / "seed-0"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the uninterrupted run
    try:
        # exploration stopped after two episodes, the third half written
        store = seed_dir / "rl-explore-r1" / "trajectories.jsonl"
        lines = store.read_text().splitlines(keepends=True)
        store.write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])
        (seed_dir / "rl-explore-r1" / "_done.json").unlink()
        again = run_pipeline(cfg, until="rl-explore-r1")
        assert [r.status for r in again.records[0]][-1] == "done"
        assert {r.status for r in again.records[0][:-1]} == {"cached"}
        resumed = store.read_text().splitlines(keepends=True)
        assert resumed[:2] == lines[:2]  # the finished episodes were kept, not played again
        keys = [t.key for t in read_trajectories(store)]
        assert len(keys) == len(set(keys)) == len(lines)
        uninterrupted = read_trajectories(original / "rl-explore-r1" / "trajectories.jsonl")
        assert set(keys) == {t.key for t in uninterrupted}
        # training stopped after three optimizer steps (checkpoints at every step)
        shutil.rmtree(seed_dir / "w2s-rl-r1")
        calls = [0]
        objective = PGObjective.__call__

        def stopped(self: PGObjective, *args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            if calls[0] > 3:
                raise KeyboardInterrupt  # as a kill: the trainer saves nothing on the way out
            return objective(self, *args, **kwargs)

        monkeypatch.setattr(PGObjective, "__call__", stopped)
        with pytest.raises(KeyboardInterrupt):
            run_pipeline(cfg, until="w2s-rl-r1")
        train = seed_dir / "w2s-rl-r1" / "train"
        assert (train / "checkpoints").is_dir() and not (train / "result.json").exists()
        monkeypatch.setattr(PGObjective, "__call__", objective)
        with caplog.at_level("INFO"):
            again = run_pipeline(cfg, until="w2s-rl-r1")
        assert [(r.name, r.status) for r in again.records[0]][-1] == ("w2s-rl-r1", "done")
        assert "resuming pg from" in caplog.text
    finally:
        torch.set_num_threads(threads)
    a = load_file(str(original / "w2s-rl-r1" / "train" / "model" / "model.safetensors"))
    b = load_file(str(train / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (
        json.loads((d / "w2s-rl-r1" / "train" / "result.json").read_text())
        for d in (original, copy / "rl" / "seed-0")
    )
    assert ra["metrics_curve"] == rb["metrics_curve"]
