"""Rounds of exploration and training (``run.rounds``): the stage table, the config checks, the report's rows,
and the two rounds of the shared miniature run (tests/pipeline_runs.py)."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from w2s_agents.errors import ConfigError
from w2s_agents.pipeline import build_stages, run_pipeline
from w2s_agents.pipeline.cache import stage_keys
from w2s_agents.pipeline.experiment import load_experiment
from w2s_agents.pipeline.report import MODEL_LABELS, write_report
from w2s_agents.pipeline.rounds import parse_round, round_label
from w2s_agents.store import read_trajectories
from w2s_agents.tree import TrajectoryTree

ROUND_1 = [
    "tasks",
    "held-out",
    "demos",
    "models",
    "weak-sft",
    "strong-sft",
    "ceiling-sft",
    "explore",
    "trees",
    "search",
    "w2s-mcts",
    "w2s-treedpo",
    "ceiling",
]


def _deps(overrides: list[str]) -> dict[str, tuple[str, ...]]:
    """The stage dependencies of the default config with both W2S-MCTS and W2S-TreeDPO, and ``overrides``."""
    cfg = load_experiment(None, ["train.variants=[w2s-mcts, w2s-treedpo]", *overrides])
    return {s.name: s.deps for s in build_stages(cfg, 0)}


def test_two_rounds_add_round_two_stages_that_read_round_one() -> None:
    deps = _deps(["run.rounds=2"])
    assert list(deps) == [
        *ROUND_1,
        "explore-r2",
        "trees-r2",
        "search-r2",
        "w2s-mcts-r2",
        "w2s-treedpo-r2",
        "eval",
    ]
    assert deps["explore-r2"] == ("w2s-mcts",)  # round 1's W2S-MCTS explores
    assert deps["trees-r2"] == ("trees", "explore-r2")  # joins round 1's trees
    assert deps["search-r2"] == ("trees-r2", "demos")
    assert deps["w2s-mcts-r2"] == ("search-r2", "models")  # the strong base model, as in round 1
    assert deps["w2s-treedpo-r2"] == ("search-r2", "strong-sft", "weak-sft")
    assert deps["eval"] == (
        "held-out",
        "weak-sft",
        "strong-sft",
        "ceiling-sft",
        "explore",
        "w2s-mcts",
        "w2s-treedpo",
        "ceiling",
        "w2s-mcts-r2",
        "w2s-treedpo-r2",
    )


def test_round_stages_bind_round_one_functions_to_their_rounds_data() -> None:
    cfg = load_experiment(
        None,
        [
            "run.rounds=3",
            "run.round_model=w2s-mcts-treedpo",
            "train.variants=[w2s-mcts-treedpo]",
            "train.mcts_start=strong-sft",
            "expand.iterations=2",
            "weak_extra=[{name: b, tiny_preset: nano}]",
        ],
    )
    stages = {s.name: s for s in build_stages(cfg, 0)}
    kw = {name: st.run.keywords for name, st in stages.items()}  # type: ignore[attr-defined]
    assert kw["explore-r3"]["model"] == "w2s-mcts-treedpo-r2" and stages["explore-r3"].deps == (
        "w2s-mcts-treedpo-r2",
    )
    assert (kw["explore-r2"]["source"], kw["explore-r2"]["role"]) == ("w2s-mcts-treedpo-r1", "strong")
    assert kw["explore-r3"]["source"] == "w2s-mcts-treedpo-r2"
    # every round's trees hold every exploration so far, the extra weak model's included
    assert kw["trees-r3"]["explores"] == ("explore", "explore-b", "explore-r2", "explore-r3")
    assert stages["trees-r3"].deps == ("trees-r2", "explore-r3")
    assert (
        stages["expand-r2"].deps == ("trees-r2", "weak-sft") and kw["expand-r2"]["trees_stage"] == "trees-r2"
    )
    assert (
        stages["search-r2"].deps == ("expand-r2", "demos") and kw["search-r2"]["trees_stage"] == "expand-r2"
    )
    # W2S-MCTS from strong SFT (train.mcts_start), then TreeDPO from this round's W2S-MCTS
    assert (
        stages["w2s-mcts-r2"].deps == ("search-r2", "strong-sft")
        and kw["w2s-mcts-r2"]["search"] == "search-r2"
    )
    assert stages["w2s-mcts-treedpo-r3"].deps == ("search-r3", "w2s-mcts-r3", "weak-sft")
    assert (kw["w2s-mcts-treedpo-r3"]["start"], kw["w2s-mcts-treedpo-r3"]["search"]) == (
        "w2s-mcts-r3",
        "search-r3",
    )
    # the same training settings as round 1 (per-source weights with several weak models included)
    assert stages["w2s-mcts-r2"].config == stages["w2s-mcts"].config
    assert stages["w2s-mcts-r2"].config["train"]["sources"]["weights"]
    # the baselines, the ceiling, the SFT stages and the extra weak model's stages are not repeated
    assert {n for n in stages if n.endswith("-r2")} == {
        "explore-r2",
        "trees-r2",
        "expand-r2",
        "search-r2",
        "w2s-mcts-r2",
        "w2s-mcts-treedpo-r2",
    }


def test_round_one_keys_do_not_depend_on_rounds() -> None:
    base = ["train.variants=[w2s-mcts,w2s-treedpo,w2s-mcts-treedpo]", "tree.merge=similarity"]
    one = stage_keys(build_stages(load_experiment(None, base), 0))
    assert one == stage_keys(build_stages(load_experiment(None, [*base, "run.rounds=1"]), 0))
    three = stage_keys(build_stages(load_experiment(None, [*base, "run.rounds=3"]), 0))
    assert {k: three[k] for k in one if k != "eval"} == {k: v for k, v in one.items() if k != "eval"}
    assert three["eval"] != one["eval"]  # it evaluates the later rounds' models too
    # a third round reuses round 2: only the new stages and eval differ
    two = stage_keys(build_stages(load_experiment(None, [*base, "run.rounds=2"]), 0))
    assert [k for k in two if two[k] != three[k]] == ["eval"]
    assert len({three[f"w2s-mcts-r{k}"] for k in (2, 3)} | {three["w2s-mcts"]}) == 3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["run.rounds=0"], "config section 'run': 'rounds' must be >= 1, got 0"),
        (
            ["run.rounds=2", "run.round_model=w2s-treedpo", "train.variants=[w2s-mcts]"],
            "'run.round_model' is 'w2s-treedpo', which this run does not train (train.variants: [w2s-mcts])",
        ),
        (
            ["run.rounds=2", "weak_extra=[{name: r2, tiny_preset: nano}]"],
            "'weak_extra' name 'r2' names the stage explore-r2, which is round 2's exploration",
        ),
        (["run.round_model=best"], "config key 'run.round_model': expected one of 'w2s-mcts'"),
    ],
)
def test_bad_rounds_settings_are_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_experiment(None, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_round_model_not_in_the_variants_is_accepted_when_the_run_trains_it_anyway() -> None:
    # W2S-MCTS+TreeDPO starts from W2S-MCTS, so the run trains W2S-MCTS; with one round nothing is checked
    load_experiment(None, ["run.rounds=2", "train.variants=[w2s-mcts-treedpo]"])
    load_experiment(None, ["run.round_model=w2s-mcts-treedpo"])


def test_report_shows_each_rounds_rows_after_round_one_and_before_the_ceiling(tmp_path: Path) -> None:
    assert parse_round("w2s-mcts-treedpo-r12") == ("w2s-mcts-treedpo", 12)
    assert parse_round("w2s-mcts-r1") is None and parse_round("weak-sft-r2") is None
    assert round_label("w2s-mcts", MODEL_LABELS, 1) is None
    names = ["weak-sft", "ceiling", "w2s-treedpo-r2", "w2s-mcts-r2", "w2s-mcts", "strong-sft", "w2s-treedpo"]
    interval = {"estimate": 0.5, "low": 0.4, "high": 0.6, "n": 2, "level": 0.95}
    models = {
        n: {"label": round_label(n, MODEL_LABELS, 2) or MODEL_LABELS[n], "return": interval, "episodes": 2}
        for n in names
    }
    per_round = [
        {"round": 1, "explored_by": ["weak-sft"], "episodes": 6, "successes": 1, "tasks_solved": 1,
         "trajectories": 6, "nodes": 20, "trees_with_success": 1, "sft_rows": 3, "pairs": 2,
         "models": ["w2s-mcts", "w2s-treedpo"]},
        {"round": 2, "explored_by": ["w2s-mcts-r1"], "episodes": 6, "successes": 4, "tasks_solved": 3,
         "trajectories": 12, "nodes": 31, "trees_with_success": 3, "sft_rows": 3, "pairs": 5,
         "models": ["w2s-mcts-r2", "w2s-treedpo-r2"]},
    ]  # fmt: skip
    metrics = {
        "schema": "w2s.metrics/1",
        "models": models,
        "pgr": {n: interval for n in names if n.startswith("w2s-")},
        "rounds": {"rounds": 2, "round_model": "w2s-mcts", "per_round": per_round},
    }
    report = write_report(metrics, tmp_path, plots=False).read_text()
    rows = [line.split(" | ")[0].removeprefix("| ") for line in report.splitlines() if line.startswith("| ")]
    rows = [r for r in rows if r not in ("---", "model")]
    results = rows[: len(names)]
    assert results == [
        "Weak SFT",
        "Strong SFT",
        "W2S-TreeDPO (round 1)",
        "W2S-MCTS (round 1)",
        "W2S-TreeDPO (round 2)",
        "W2S-MCTS (round 2)",
        "Ceiling",
    ]
    # the weak-to-strong table has a row per round's model, and the rounds section a row per round
    assert rows.count("W2S-MCTS (round 2)") == 2
    assert "## Rounds" in report
    row = "| 2 | `w2s-mcts-r1` | 6 (4) | 3 | 12 | 31 | 3 | 3 | 5 | W2S-MCTS (round 2) 50.0; W2S-TreeDPO (round 2) 50.0"
    assert row in report


@pytest.mark.slow
def test_two_rounds_end_to_end(feature_run: Any, pipeline_runs: ModuleType, w2s_cache: Path) -> None:
    """On the shared feature run (tests/pipeline_runs.py): two rounds, two weak models, every W2S variant."""
    cfg = feature_run.cfg
    assert (cfg.run.rounds, cfg.run.round_model, pipeline_runs.STOP) == (2, "w2s-mcts", "explore-r2")
    # a run stopped after round 2's exploration carries on from there
    first = feature_run.first
    assert [(r.name, r.status) for r in first.records[0]][-2:] == [
        ("best-of-n", "done"),
        ("explore-r2", "done"),
    ]
    result = feature_run.result
    seed_dir = result.run_dir / "seed-0"
    names = [r.name for r in result.records[0]]
    assert names[-8:] == [
        "best-of-n",
        "explore-r2",
        "trees-r2",
        "search-r2",
        "w2s-mcts-r2",
        "w2s-treedpo-r2",
        "w2s-mcts-treedpo-r2",
        "eval",
    ]
    statuses = [r.status for r in result.records[0]]
    assert statuses == ["cached"] * (len(names) - 6) + ["done"] * 6
    # round 2's episodes: round 1's W2S-MCTS agent on every train task, under the round's own source
    train = json.loads((seed_dir / "tasks" / "tasks.json").read_text())["train"]
    per_explore = len(train) * len(cfg.explore.samplers) * cfg.explore.seeds  # episodes of one exploration
    round2 = list(read_trajectories(seed_dir / "explore-r2" / "trajectories.jsonl"))
    round1 = list(read_trajectories(seed_dir / "explore" / "trajectories.jsonl"))
    assert len(round2) == len(round1) == per_explore and {t.task_id for t in round2} == set(train)
    assert {(t.source.model, t.source.role) for t in round2} == {("w2s-mcts-r1", "strong")}
    assert {(t.source.model, t.source.role) for t in round1} == {("weak-sft", "weak")}
    # round 2's trees hold both rounds' trajectories, counted per source; round 1's the weak agents' only
    trees2 = sorted((seed_dir / "trees-r2" / "trees").glob("*.json"))
    assert len(trees2) == len(train)
    per_task = per_explore // len(train)
    for f in trees2:
        tree = TrajectoryTree.load(f)
        assert tree.sources(0) == {"weak-sft": per_task, "weak-sft-b": per_task, "w2s-mcts-r1": per_task}
        round1_tree = TrajectoryTree.load(seed_dir / "trees" / "trees" / f.name)
        assert round1_tree.sources(0) == {"weak-sft": per_task, "weak-sft-b": per_task}
    # round 2's W2S-MCTS trained on round 2's rows, and was evaluated and reported with its round
    info = json.loads((seed_dir / "w2s-mcts-r2" / "model.json").read_text())
    assert info["rows"] == sum(1 for _ in (seed_dir / "search-r2" / "sft.jsonl").open()) > 0
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["models"]["w2s-mcts-r2"]["label"] == "W2S-MCTS (round 2)"
    assert metrics["models"]["w2s-mcts-r2"]["episodes"] == 2
    assert "w2s-mcts-r2" in metrics["vs_strong"] and "w2s-mcts-r2" in metrics["transfer"]
    per_round = metrics["rounds"]["per_round"]
    assert [r["explored_by"] for r in per_round] == [["weak-sft", "weak-sft-b"], ["w2s-mcts-r1"]]
    assert [r["trajectories"] for r in per_round] == [2 * per_explore, 3 * per_explore]
    assert metrics["search_cost"]["exploration_episodes"] == 3 * per_explore
    report = result.report.read_text()
    assert (
        "| W2S-MCTS (round 1) | " in report and "| W2S-MCTS (round 2) | " in report and "## Rounds" in report
    )
    # a second invocation reuses every stage
    again = run_pipeline(cfg)
    assert [r.status for r in again.records[0]] == ["cached"] * len(names)
