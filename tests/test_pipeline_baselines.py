"""The paper's whole table as pipeline rows: the strong-SFT baselines (ETO, Best-of-N), W2S-MCTS's starting point,
and configs/paper-table.yaml."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from w2s_agents.errors import ConfigError
from w2s_agents.pipeline import build_stages, stage_names
from w2s_agents.pipeline.cache import stage_keys
from w2s_agents.pipeline.experiment import load_experiment
from w2s_agents.pipeline.stages.baselines import best_of_n
from w2s_agents.store import read_trajectories
from w2s_agents.types import Source, Step, Trajectory


def _episode(task: str, sampler: str, seed: int, ret: float, steps: int, won: bool) -> Trajectory:
    return Trajectory(
        task_id=task,
        env_id="toy-v0",
        source=Source(model="strong-sft", role="strong", sampler=sampler, seed=seed),
        instruction="find the coin",
        initial_observation="a room",
        steps=[Step(observation=f"room {i}", action=f"go {i}") for i in range(steps)],
        return_=ret,
        success=won,
        end="won" if won else "truncated",
    )


def test_best_of_n_keeps_the_best_success_among_the_first_n() -> None:
    samplers = ["greedy", "t1.0"]
    trajs = [
        # task a: seed 0 greedy fails, seed 0 t1.0 wins in 5, seed 1 greedy wins in 3, seed 1 t1.0 wins in 2
        _episode("a", "greedy", 0, 0.0, 4, False),
        _episode("a", "t1.0", 0, 1.0, 5, True),
        _episode("a", "greedy", 1, 1.0, 3, True),
        _episode("a", "t1.0", 1, 1.0, 2, True),
        # task b: a higher return beats fewer steps; task c: nothing won
        _episode("b", "greedy", 0, 0.5, 1, True),
        _episode("b", "t1.0", 0, 1.0, 6, True),
        _episode("c", "greedy", 0, 0.0, 2, False),
        _episode("c", "t1.0", 0, 0.0, 2, False),
    ]
    everything = best_of_n(trajs, samplers)
    assert sorted(everything) == ["a", "b"]  # a task without a success gives no row
    assert len(everything["a"].steps) == 2 and everything["b"].return_ == 1.0
    # N = 3: seed 0 under both samplers, then seed 1 greedy; the 2-step win of seed 1 t1.0 is not a candidate
    first3 = best_of_n(trajs, samplers, 3)
    assert (first3["a"].source.seed, first3["a"].source.sampler, len(first3["a"].steps)) == (1, "greedy", 3)
    # N = 1: only seed 0 greedy, which fails on a
    assert sorted(best_of_n(trajs, samplers, 1)) == ["b"]


def test_paper_table_config_lists_every_row_of_the_table(repo_root: Path) -> None:
    cfg = load_experiment(repo_root / "configs" / "paper-table.yaml")
    deps = {s.name: s.deps for s in build_stages(cfg, 0)}
    rows = ["w2s-mcts", "w2s-treedpo", "w2s-mcts-treedpo", "ceiling", "strong-explore", "eto", "best-of-n"]
    expected = ["tasks", "held-out", "demos", "models", "weak-sft", "strong-sft"]
    expected += ["ceiling-sft"] if cfg.tasks.scarce else []  # the ceiling's start under scarce demos
    expected += ["explore", "trees", "search", *rows, "eval"]
    assert list(deps) == expected
    assert deps["strong-explore"] == ("strong-sft",)
    assert deps["eto"] == ("strong-explore", "demos", "strong-sft")
    assert deps["best-of-n"] == ("strong-explore", "strong-sft")
    assert deps["w2s-mcts"] == ("search", "models")  # mcts_start: base
    models = ("weak-sft", "strong-sft", "eto", "best-of-n", "w2s-mcts", "w2s-treedpo", "w2s-mcts-treedpo")
    assert set(models) | {"ceiling"} <= set(deps["eval"]) and "strong-explore" not in deps["eval"]


def test_baseline_keys_leave_the_stages_without_them_unchanged() -> None:
    """With train.baselines empty and mcts_start base, the new keys are in no stage's key."""
    default = stage_keys(build_stages(load_experiment(None), 0))
    changed = load_experiment(
        None, ["train.eto.lr=0.5", "train.best_of_n.epochs=3", "train.best_of_n_samples=2"]
    )
    assert stage_keys(build_stages(changed, 0)) == default
    on = stage_keys(build_stages(load_experiment(None, ["train.baselines=[best-of-n]"]), 0))
    assert {k: v for k, v in on.items() if k in default and k != "eval"} == {
        k: v for k, v in default.items() if k != "eval"
    }
    assert on["eval"] != default["eval"] and "eto" not in on


def test_mcts_start_strong_sft_trains_w2s_mcts_from_the_strong_sft_agent() -> None:
    base = {s.name: s for s in build_stages(load_experiment(None), 0)}
    cfg = load_experiment(None, ["train.mcts_start=strong-sft"])
    stages = {s.name: s for s in build_stages(cfg, 0)}
    assert stages["w2s-mcts"].deps == ("search", "strong-sft")
    assert stages["w2s-mcts"].run.keywords["start"] == "strong-sft"
    keys, base_keys = stage_keys(list(stages.values())), stage_keys(list(base.values()))
    assert keys["w2s-mcts"] != base_keys["w2s-mcts"] and keys["search"] == base_keys["search"]


def test_best_of_n_samples_above_the_episodes_played_is_refused() -> None:
    with pytest.raises(
        ConfigError, match=r"train\.best_of_n_samples.*explore\.samplers x explore\.seeds = 16"
    ):
        load_experiment(None, ["train.best_of_n_samples=17"])
    with pytest.raises(ConfigError, match="best_of_n_samples"):
        load_experiment(None, ["train.best_of_n_samples=-1"])


@pytest.mark.slow
def test_baselines_train_on_their_own_data_and_reach_the_report(feature_run: Any) -> None:
    """ETO pairs: demo tasks only, expert chosen, a failed strong SFT episode rejected. Best-of-N rows: one per
    task, its best successful strong SFT episode. Both models evaluated and in the report. On the shared feature
    run (tests/pipeline_runs.py): one demo task, 2 samplers x 2 seeds, a strong SFT agent that learned its demo."""
    cfg = feature_run.cfg
    assert cfg.train.baselines == ["eto", "best-of-n"] and cfg.tasks.demos == 1
    assert (len(cfg.explore.samplers), cfg.explore.seeds) == (2, 2)
    names = stage_names(cfg)
    # the baselines come after the W2S stages and the ceiling, from the strong SFT agent's own exploration
    at = names.index("strong-explore")
    assert names[at - 1 : at + 3] == ["ceiling", "strong-explore", "eto", "best-of-n"] and names[-1] == "eval"
    result = feature_run.result
    seed_dir = result.run_dir / "seed-0"
    train = json.loads((seed_dir / "tasks" / "tasks.json").read_text())["train"]
    demos = {t.task_id: t for t in read_trajectories(seed_dir / "demos" / "demos.jsonl")}
    own = list(read_trajectories(seed_dir / "strong-explore" / "trajectories.jsonl"))
    # the strong SFT agent played every train task under every explore setting
    assert sorted((t.task_id, t.source.sampler, t.source.seed) for t in own) == sorted(
        {(t.task_id, t.source.sampler, t.source.seed) for t in own}
    )
    assert {t.task_id for t in own} == set(train) and len(own) == len(train) * 2 * 2
    assert {(t.source.model, t.source.role) for t in own} == {("strong-sft", "strong")}

    def rows(p: Path) -> list[dict]:
        return [json.loads(line) for line in p.read_text().splitlines()]

    def actions(messages: list[dict]) -> list[str]:
        return [
            m["content"].splitlines()[-1].removeprefix("Action: ")
            for m in messages
            if m["role"] == "assistant"
        ]

    # ETO: pairs only on the one demo task; chosen = the expert's actions, rejected = a failed strong episode
    pairs = rows(seed_dir / "eto" / "pairs.jsonl")
    assert pairs, "the strong SFT agent failed no episode of the demo task"
    failed = {tuple(s.action for s in t.steps) for t in own if t.task_id == train[0] and not t.success}
    for pair in pairs:
        assert pair["task_id"] == train[0] and pair["level"] == "trajectory"
        assert actions(pair["chosen"]) == [s.action for s in demos[train[0]].steps]
        assert tuple(actions(pair["rejected"])) in failed
        assert pair["chosen_sources"] == ["expert"] and pair["rejected_sources"] == ["strong-sft"]
    # Best-of-N: one row per task that some strong episode won, from its best winning episode
    bon = rows(seed_dir / "best-of-n" / "sft.jsonl")
    won = {t.task_id for t in own if t.success}
    assert won, "no strong SFT episode won: nothing for Best-of-N"
    assert sorted(r["task_id"] for r in bon) == sorted(won)
    for row in bon:
        best = max((t for t in own if t.task_id == row["task_id"] and t.success), key=lambda t: t.return_)
        assert row["return"] == best.return_ and row["sources"] == ["strong-sft"]
        assert row["steps"] == min(
            len(t.steps)
            for t in own
            if t.task_id == row["task_id"] and t.success and t.return_ == best.return_
        )
    # both trained from the strong SFT agent, evaluated, and reported under their labels
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert {"eto", "best-of-n"} <= set(metrics["models"])
    for name in ("eto", "best-of-n"):
        assert metrics["models"][name]["episodes"] == 2
    report = (result.run_dir / "report.md").read_text()
    assert "| Strong SFT + ETO | " in report and "| Strong SFT + Best-of-N | " in report
    order = [
        report.index(f"| {label} | ")
        for label in ("Strong SFT", "Strong SFT + ETO", "Strong SFT + Best-of-N")
    ]
    assert order == sorted(order) and report.index("| Weak SFT | ") < order[0]
