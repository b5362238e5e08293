"""``w2s sweep``: the grid, point names, shared stages, the sweep's table and plot; ``explore.width``."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from types import ModuleType

import pytest

from w2s_agents.agents import Sampler
from w2s_agents.config import config_to_dict
from w2s_agents.errors import ConfigError
from w2s_agents.pipeline import build_stages, load_experiment
from w2s_agents.pipeline.cache import Stage, stage_keys
from w2s_agents.pipeline.stages.explore import _episode_groups, explore_pairs
from w2s_agents.pipeline.sweep import (
    link_shared_stages,
    parse_grid,
    plan_sweep,
    point_name,
    report_sweep,
    run_sweep,
    split_values,
)
from w2s_agents.pipeline.sweep_report import sweep_table
from w2s_agents.store import read_trajectories

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # what run.name accepts (w2s_agents.config.RunConfig)

# ------------------------------------------------------------------------------------------------ grid


def test_commas_outside_brackets_and_quotes_make_an_axis() -> None:
    axes, overrides = parse_grid(
        [
            "explore.width=2,4,6",
            "run.seeds=[0,1,2]",  # one value: its commas are inside brackets
            "train.variants=[w2s-mcts],[w2s-mcts, w2s-treedpo]",
            "tasks.env_kwargs={a: 1, b: 2}",
            "search.iterations=50",
            'run.log_level="DEBUG"',
        ]
    )
    assert axes == {
        "explore.width": ["2", "4", "6"],
        "train.variants": ["[w2s-mcts]", "[w2s-mcts, w2s-treedpo]"],
    }
    assert overrides == [
        "run.seeds=[0,1,2]",
        "tasks.env_kwargs={a: 1, b: 2}",
        "search.iterations=50",
        'run.log_level="DEBUG"',
    ]
    assert split_values("'a,b',c") == ["'a,b'", "c"]
    assert split_values("[1,2") is None  # unbalanced: no list of values, left to the config loader


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["explore.width"], "expected KEY=VALUE"),
        (["=1,2"], "expected KEY=VALUE"),
        (["explore.width=2,,4"], "an empty value"),
        (["explore.width=2,4,"], "an empty value"),
        (["explore.width=2,4,2"], "value '2' is given twice"),
        (["explore.width=2,4", "explore.width=1,3"], "already an axis"),
        (["explore.width=2,4", "explore.width=3"], "also a grid axis"),
        (["run.name=a,b"], "names the sweep's folder"),
        (["run.out_dir=a,b"], "names the sweep's folder"),
    ],
)
def test_malformed_grid_is_refused_naming_the_argument(args: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        parse_grid(args)
    assert "\n" not in str(info.value)
    assert args[-1] in str(info.value)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["explore.width=2,17"], "sweep point explore.width=17: "),  # above 4 samplers x 4 seeds
        (["explore.widht=2,4"], "unknown config key 'explore.widht'"),
        (["explore.width=2,four"], "override 'explore.width=four'"),
        (["explore.width=2,4"], ""),  # the valid sweep, for contrast
        (["explore.width=2"], "at least one grid axis"),
        (["explore.seeds=1,2", "explore.width=6"], "sweep point explore.seeds=1: "),  # only one point fails
    ],
)
def test_every_point_is_validated_before_anything_runs(
    tmp_path: Path, args: list[str], fragment: str
) -> None:
    args = [*args, f"run.out_dir={tmp_path / 'runs'}"]
    if not fragment:
        plan = plan_sweep(None, args)
        assert [p.config.explore.width for p in plan.points] == [2, 4]
        assert not (tmp_path / "runs").exists()  # planning writes nothing
        return
    with pytest.raises(ConfigError, match=re.escape(fragment)) as info:
        plan_sweep(None, args)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "runs").exists()


def test_points_are_the_product_first_axis_slowest_in_named_run_folders(tmp_path: Path) -> None:
    plan = plan_sweep(
        None,
        ["explore.width=2,4", "explore.seeds=2,3", f"run.out_dir={tmp_path}", "run.name=qs", "tasks.train=5"],
    )
    assert plan.directory == tmp_path / "qs-sweep"
    assert [p.values for p in plan.points] == [
        {"explore.width": "2", "explore.seeds": "2"},
        {"explore.width": "2", "explore.seeds": "3"},
        {"explore.width": "4", "explore.seeds": "2"},
        {"explore.width": "4", "explore.seeds": "3"},
    ]
    first = plan.points[0]
    assert first.name == "explore.width-2__explore.seeds-2"
    assert first.run_dir == tmp_path / "qs-sweep" / first.name
    assert first.config.run.name == first.name
    assert (first.config.explore.width, first.config.explore.seeds, first.config.tasks.train) == (2, 2, 5)


def test_point_names_are_readable_and_filesystem_safe() -> None:
    assert point_name({"explore.width": "4"}) == "explore.width-4"
    assert point_name({"explore.width": "4", "tasks.train": "20"}) == "explore.width-4__tasks.train-20"
    assert point_name({"train.variants": "[w2s-mcts, w2s-treedpo]"}) == "train.variants-w2s-mcts-w2s-treedpo"
    assert point_name({"weak.path": "/models/a b/c"}) == "weak.path-models-a-b-c"
    long = point_name({"tasks.env_kwargs": "{" + ", ".join(f"k{i}: {i}" for i in range(80)) + "}"})
    other = point_name({"tasks.env_kwargs": "{" + ", ".join(f"k{i}: {i}" for i in range(81)) + "}"})
    assert len(long) <= 200 and long != other  # cut, and told apart by a hash
    for name in ("explore.width-4", long, point_name({"search.value": "'mean'"})):
        assert RUN_NAME.fullmatch(name), name


def test_values_that_give_one_folder_name_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape("get the same folder name 'train.variants-w2s-mcts'")):
        plan_sweep(None, ["train.variants=[w2s-mcts],['w2s-mcts']", f"run.out_dir={tmp_path}"])


# ---------------------------------------------------------------------------------------- explore.width


def test_width_takes_sampler_seed_pairs_seed_major() -> None:
    a, b, c = (Sampler(temperature=t) for t in (0.0, 1.0, 1.5))
    assert explore_pairs([a, b, c], 2) == [(a, 0), (b, 0), (c, 0), (a, 1), (b, 1), (c, 1)]
    assert explore_pairs([a, b, c], 2, 6) == explore_pairs([a, b, c], 2)
    assert explore_pairs([a, b, c], 2, 2) == [(a, 0), (b, 0)]
    assert explore_pairs([a, b, c], 2, 4) == [(a, 0), (b, 0), (c, 0), (a, 1)]
    with pytest.raises(ValueError, match="between 0 and 6"):
        explore_pairs([a, b, c], 2, 7)
    # one rollout call per run of seeds that play the same samplers
    assert _episode_groups(explore_pairs([a, b, c], 3)) == [([a, b, c], [0, 1, 2])]
    assert _episode_groups(explore_pairs([a, b, c], 3, 7)) == [([a, b, c], [0, 1]), ([a], [2])]
    assert _episode_groups(explore_pairs([a, b, c], 3, 2)) == [([a, b], [0])]


def test_width_is_checked_against_samplers_times_seeds() -> None:
    assert load_experiment(None, ["explore.width=16"]).explore.width == 16  # 4 samplers x 4 seeds
    for bad in ("17", "-1"):
        with pytest.raises(
            ConfigError, match=r"'width' must be between 0 and len\(samplers\) x seeds = 4 x 4 = 16"
        ):
            load_experiment(None, [f"explore.width={bad}"])


def test_default_explore_key_is_the_key_without_the_width_setting() -> None:
    """Runs made before explore.width existed keep their explore stage (and every later one)."""
    cfg = load_experiment(None)
    stages = build_stages(cfg, 0)
    explore = config_to_dict(cfg.explore)
    explore.pop("width")
    explore["max_steps"] = cfg.explore_max_steps  # the key holds the resolved step limit
    old = [
        Stage(s.name, s.run, {"explore": explore, "agent": cfg.agent, "seed": 0}, s.deps, s.version)
        if s.name == "explore"
        else s
        for s in stages
    ]
    assert stage_keys(stages) == stage_keys(old)
    # a width is part of the key, and changes only exploration and what depends on it
    wide = stage_keys(build_stages(load_experiment(None, ["explore.width=4"]), 0))
    same = {n for n, k in stage_keys(stages).items() if wide[n] == k}
    assert same == {"tasks", "held-out", "demos", "models", "weak-sft", "strong-sft", "ceiling-sft"}


# ---------------------------------------------------------------------------------------- shared stages


def _finish(folder: Path, key: str) -> None:
    folder.mkdir(parents=True)
    (folder / "_done.json").write_text(json.dumps({"key": key, "stage": folder.name}))


def test_a_stage_finished_with_the_same_key_is_linked_not_rerun(tmp_path: Path) -> None:
    plan = plan_sweep(None, ["explore.width=2,4", f"run.out_dir={tmp_path}"])
    a, b = plan.points
    keys_a = stage_keys(build_stages(a.config, 0))
    for name, key in keys_a.items():
        _finish(a.run_dir / "seed-0" / name, key)
    (b.run_dir / "seed-0" / "strong-sft").mkdir(parents=True)  # a real folder of b's own is left to the run
    linked = link_shared_stages(plan, b)
    assert linked == [
        "seed-0/tasks",
        "seed-0/held-out",
        "seed-0/demos",
        "seed-0/models",
        "seed-0/weak-sft",
        "seed-0/ceiling-sft",
    ]
    models = b.run_dir / "seed-0" / "models"
    assert models.is_symlink() and not os.path.isabs(os.readlink(models))
    assert models.resolve() == (a.run_dir / "seed-0" / "models").resolve()
    assert (
        json.loads((models / "_done.json").read_text())["key"]
        == stage_keys(build_stages(b.config, 0))["models"]
    )
    assert not (b.run_dir / "seed-0" / "strong-sft").is_symlink()
    assert link_shared_stages(plan, b) == []  # links that hold the key stay
    # the first point's folder moved aside: the dangling link goes, the target's stage will run again
    (a.run_dir / "seed-0" / "models").rename(a.run_dir / "seed-0" / "models.stale-x")
    assert link_shared_stages(plan, b) == []
    assert not models.is_symlink() and not models.exists()
    assert (a.run_dir / "seed-0" / "models.stale-x" / "_done.json").is_file()  # never touched


# ---------------------------------------------------------------------------------------- outputs


def _interval(estimate: float, low: float, high: float, n: int = 20) -> dict:
    return {"estimate": estimate, "low": low, "high": high, "n": n, "level": 0.95}


def _summary(finished: bool = True) -> dict:
    point = {
        "name": "explore.width-2",
        "values": {"explore.width": "2"},
        "run_dir": "runs/x-sweep/explore.width-2",
        "finished": True,
        "split": "test",
        "tasks": 20,
        "seeds": [0],
        "models": {
            "weak-sft": {"label": "Weak SFT", "return": _interval(0.1, 0.0, 0.2)},
            "strong-sft": {"label": "Strong SFT", "return": _interval(0.5, 0.3, 0.7)},
            "w2s-mcts": {"label": "W2S-MCTS", "return": _interval(0.6, 0.4, 0.8)},
            "w2s-treedpo": {"label": "W2S-TreeDPO", "return": _interval(0.55, 0.35, 0.75)},
            "ceiling": {"label": "Ceiling", "return": _interval(0.7, 0.5, 0.9)},
        },
        "pgr": {"w2s-mcts": _interval(0.83, 0.5, 1.1), "w2s-treedpo": _interval(0.75, 0.4, 1.0)},
        "vs_strong": {"w2s-mcts": _interval(0.1, 0.02, 0.18), "w2s-treedpo": _interval(0.05, -0.05, 0.15)},
        "best_w2s": "w2s-mcts",
    }
    second = {"name": "explore.width-4", "values": {"explore.width": "4"}, "run_dir": "r", "finished": False}
    if finished:
        second = {**point, "name": "explore.width-4", "values": {"explore.width": "4"}}
    return {"schema": "w2s.sweep/1", "axes": {"explore.width": ["2", "4"]}, "points": [point, second]}


def test_the_table_has_a_row_per_point_and_the_best_w2s_pgr() -> None:
    lines = sweep_table(_summary(finished=False))
    assert lines[0] == (
        "| `explore.width` | Weak SFT x100 (CI) | Strong SFT x100 (CI) | W2S-TreeDPO x100 (CI) | W2S-MCTS x100 (CI) "
        "| Ceiling x100 (CI) | best W2S | PGR (CI) | best W2S - strong SFT x100 (CI) |"
    )
    assert lines[2] == (
        "| 2 | 10.0 [0.0, 20.0] | 50.0 [30.0, 70.0] | 55.0 [35.0, 75.0] | 60.0 [40.0, 80.0] | 70.0 [50.0, 90.0] "
        "| W2S-MCTS | 0.83 [0.50, 1.10] | 10.0 [2.0, 18.0] |"
    )
    assert lines[3].startswith("| 4 | not finished |") and lines[3].count("|") == lines[2].count("|")


def _fake_run(point, returns: dict[str, float]) -> None:
    """A finished run's metrics.json for ``point`` (the sweep reads nothing else)."""
    from w2s_agents.config import config_hash

    models = {n: {"label": n, "return": _interval(r, r - 0.1, r + 0.1)} for n, r in returns.items()}
    metrics = {
        "schema": "w2s.metrics/1",
        "config_hash": config_hash(point.config),
        "split": "test",
        "tasks": 20,
        "seeds": [0],
        "models": models,
        "pgr": {"w2s-mcts": _interval(0.5, 0.2, 0.8)},
        "vs_strong": {"w2s-mcts": _interval(0.0, -0.1, 0.1)},
    }
    point.run_dir.mkdir(parents=True)
    (point.run_dir / "metrics.json").write_text(json.dumps(metrics))


def test_report_only_reads_the_points_metrics_written_for_their_config(tmp_path: Path) -> None:
    plan = plan_sweep(None, ["explore.width=2,4,6", "explore.seeds=2,3", f"run.out_dir={tmp_path}"])
    for i, point in enumerate(plan.points[:4]):
        _fake_run(point, {"weak-sft": 0.1, "strong-sft": 0.5, "w2s-mcts": 0.5 + 0.05 * i, "ceiling": 0.8})
    stale = plan.points[4]
    _fake_run(stale, {"weak-sft": 0.1})
    data = json.loads((stale.run_dir / "metrics.json").read_text())
    (stale.run_dir / "metrics.json").write_text(json.dumps({**data, "config_hash": "0" * 16}))
    result = report_sweep(plan)
    assert [f.name for f in result.files] == ["sweep.json", "sweep.md", "sweep.png"]
    summary = json.loads((plan.directory / "sweep.json").read_text())
    assert summary == result.summary
    assert [p["finished"] for p in summary["points"]] == [True] * 4 + [False] * 2
    assert "written for another config" in summary["points"][4]["reason"]
    assert "no metrics.json" in summary["points"][5]["reason"]
    assert summary["points"][3]["models"]["w2s-mcts"]["return"]["estimate"] == pytest.approx(0.65)
    assert summary["points"][3]["best_w2s"] == "w2s-mcts"
    assert summary["points"][0]["values"] == {"explore.width": "2", "explore.seeds": "2"}
    md = (plan.directory / "sweep.md").read_text()
    assert "4 of 6 points finished" in md and md.count("\n| 6 | ") == 2
    assert (plan.directory / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_sweep_shares_stages_writes_its_table_and_resumes(
    tmp_path: Path, w2s_cache: Path, pipeline_runs: ModuleType
) -> None:
    config = tmp_path / "mini.yaml"
    config.write_text(pipeline_runs.MINI.format(out=tmp_path / "runs"))
    # the MINI explores with 2 samplers x 1 seed: width 1 is the greedy sampler alone, width 2 both
    args = [
        "explore.width=1,2",
        "train.variants=[w2s-mcts]",
        "train.ceiling=false",
        "eval.misfit_states=0",
        "eval.train_tasks=false",
    ]
    plan = plan_sweep(config, args)
    result = run_sweep(plan)
    first, second = plan.points
    shared = ["tasks", "held-out", "demos", "models", "weak-sft", "strong-sft"]
    assert result.linked == {first.name: [], second.name: [f"seed-0/{s}" for s in shared]}
    status = {r.name: r.status for r in result.records[second.name][0]}
    assert {s for s, v in status.items() if v == "cached"} == set(shared)  # reused, not rerun
    assert all(r.status == "done" for r in result.records[first.name][0])
    samplers = {
        p.name: {
            t.source.sampler
            for t in read_trajectories(p.run_dir / "seed-0" / "explore" / "trajectories.jsonl")
        }
        for p in plan.points
    }
    assert samplers == {first.name: {"greedy"}, second.name: {"greedy", "t1.5-p1"}}
    summary = json.loads((plan.directory / "sweep.json").read_text())
    assert [p["finished"] for p in summary["points"]] == [True, True]
    assert set(summary["points"][1]["models"]) == {"weak-sft", "strong-sft", "w2s-mcts"}
    assert summary["points"][1]["best_w2s"] == "w2s-mcts"
    assert summary["points"][1]["run_dir"] == str(second.run_dir)
    md = (plan.directory / "sweep.md").read_text()
    assert "| 1 | " in md and "| 2 | " in md and "2 of 2 points finished" in md
    assert (plan.directory / "sweep.png").stat().st_size > 0
    # the same command again: every point and stage reused
    again = run_sweep(plan_sweep(config, args))
    for point in plan.points:
        assert {r.status for r in again.records[point.name][0]} == {"cached"}
    assert again.linked == {first.name: [], second.name: []}
    assert json.loads((plan.directory / "sweep.json").read_text()) == summary


def test_cli_sweep_refuses_a_bad_point_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from w2s_agents.cli import main

    assert main(["sweep", "explore.width=4,17", f"run.out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("w2s: error: sweep point explore.width=17: ") and "\n" not in err
    assert not any(tmp_path.iterdir())
    assert main(["sweep", "explore.width=4,6", f"run.out_dir={tmp_path}", "--report-only", "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "0 of 2 points finished" in out
    assert sorted(p.name for p in (tmp_path / "quickstart-sweep").iterdir()) == ["sweep.json", "sweep.md"]
