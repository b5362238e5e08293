"""The run report from a metrics dict: table rows, weak-to-strong section, plots."""

from __future__ import annotations

from w2s_agents.pipeline.report import METRICS_SCHEMA, write_report
from w2s_agents.pipeline.stats import Interval, bootstrap_interval, misfit, transfer


def metrics() -> dict:
    def model(values):
        return {
            "return": bootstrap_interval(values).as_dict(),
            "success": bootstrap_interval([v == 1.0 for v in values]).as_dict(),
            "steps": bootstrap_interval([5, 7, 9, 11][: len(values)]).as_dict(),
            "episodes": len(values),
        }

    return {
        "schema": METRICS_SCHEMA,
        "run": "demo",
        "suite": "tw-simple",
        "split": "test",
        "tasks": 4,
        "seeds": [0, 1, 2],
        "models": {
            "ceiling": model([1.0, 1.0, 1.0, 0.5]),
            "weak-sft": model([0.0, 0.5, 0.0, 0.5]),
            "w2s-mcts": model([1.0, 0.5, 1.0, 0.5]),
            "strong-sft": model([0.5, 0.5, 1.0, 0.0]),
            "w2s-treedpo": model([0.5, 0.5, 0.5, 0.5]),
        },
        "pgr": {"w2s-mcts": Interval(0.8, 0.5, 1.1, 12).as_dict()},
        "gain": {"w2s-mcts": 0.5},
        "misfit": {"w2s-mcts": misfit([[0.5, 0.5]], [[0.2, 0.8]]).as_dict()},
        "transfer": {
            "w2s-mcts": transfer({"a": False, "b": False}, {"a": True}, {"a": True, "b": False}).as_dict()
        },
        "search_cost": {"env_steps": 1200, "tokens": 34000},
        "trees": {
            "trees": 2,
            "per_tree": [{"nodes": 10, "depth": 4, "success_leaves": 1}, {"nodes": 30, "depth": 6}],
        },
        "curves": {"weak-sft": {"loss": [[1, 2.0], [2, 1.5]], "valid": [[1, 0.2], [2, 0.4]]}},
    }


def test_report_has_every_row_in_the_paper_order(tmp_path):
    path = write_report(metrics(), tmp_path)
    text = path.read_text()
    rows = [
        line
        for line in text.splitlines()
        if line.startswith("| ") and "model" not in line and "---" not in line
    ]
    labels = [r.split("|")[1].strip() for r in rows[:5]]
    assert labels == ["Weak SFT", "Strong SFT", "W2S-TreeDPO", "W2S-MCTS", "Ceiling"]
    assert "| Weak SFT | 25.0 [" in text  # mean return 0.25 x100
    assert "4 held-out test tasks of `tw-simple`, seeds 0, 1, 2" in text
    w2s_row = next(r for r in rows if r.startswith("| W2S-MCTS | 0.80 [0.50, 1.10]"))
    assert "0.50 (1/2)" in w2s_row  # correction: a of {a, b}
    assert "| env_steps | 1200 |" in text
    for name in ("returns", "curves", "trees"):
        png = tmp_path / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![{name}](plots/{name}.png)" in text


def test_report_without_optional_sections(tmp_path):
    m = {
        "schema": METRICS_SCHEMA,
        "models": {"weak-sft": {"return": {"estimate": 0.5, "low": 0.4, "high": 0.6, "n": 3}}},
    }
    text = write_report(m, tmp_path, plots=False).read_text()
    assert "| Weak SFT | 50.0 [40.0, 60.0] | n/a | n/a | n/a |" in text
    assert "Weak-to-strong" not in text and not (tmp_path / "plots").exists()


def test_metrics_are_strict_json_and_the_report_gives_the_reasons(tmp_path):
    import json
    import math

    from w2s_agents.pipeline.metrics import write_metrics
    from w2s_agents.pipeline.stats import paired_pgr

    m = metrics()
    units = list(range(8))
    m["pgr"]["w2s-mcts"] = paired_pgr(  # ceiling 0.001 above weak: no PGR
        dict.fromkeys(units, 0.5), dict.fromkeys(units, 0.7), {**dict.fromkeys(units, 0.5), 0: 0.508}
    ).as_dict()
    m["pgr"]["w2s-treedpo"] = {**Interval(0.5, 0.1, 0.9, 8).as_dict(), "dropped_resamples": 0.125}
    m["misfit"]["w2s-mcts"] = misfit([], []).as_dict()
    m["search_cost"]["ratio"] = math.nan  # a NaN nobody explained: null with a generic reason
    m["curves"]["weak-sft"]["loss"].append([3, math.inf])  # inside a list: the list's dict explains it
    path = write_metrics(tmp_path / "metrics.json", m)

    def refuse(constant):
        raise AssertionError(f"{constant} in metrics.json")

    back = json.loads(path.read_text(), parse_constant=refuse)
    assert back["pgr"]["w2s-mcts"]["estimate"] is None
    assert back["search_cost"]["ratio"] is None and back["search_cost"]["reason"]
    assert back["curves"]["weak-sft"]["loss"][-1] == [3, None] and back["curves"]["weak-sft"]["reason"]
    text = write_report(back, tmp_path).read_text()  # plots of curves with a null too
    assert "| W2S-MCTS | n/a |" in text
    assert (
        "- PGR of W2S-MCTS: n/a, ceiling - weak = 0.0010 in average return, below the minimum gap 0.05"
        in text
    )
    assert "- PGR of W2S-TreeDPO: 12.5% of the bootstrap resamples dropped" in text
    assert "- misfit of W2S-MCTS: n/a, no held-out weak states" in text


def test_each_run_seeds_return_is_in_the_metrics_and_the_results_table(tmp_path):
    from w2s_agents.pipeline.metrics import _model_metrics

    def unit(seed, task, ret):
        return {
            "run_seed": seed,
            "task_id": task,
            "sampler": 0,
            "seed": 0,
            "return": ret,
            "success": ret == 1.0,
            "steps": 5,
            "tokens": 10,
        }

    per_seed = {
        0: {"models": {"w2s-mcts": [unit(0, "a", 1.0), unit(0, "b", 0.0)]}},
        1: {"models": {"w2s-mcts": [unit(1, "a", 1.0), unit(1, "b", 1.0)]}},
        2: {"models": {}},  # a seed that did not evaluate the model
    }
    models, _ = _model_metrics(per_seed, ["w2s-mcts"], level_seed=0)
    assert models["w2s-mcts"]["return_per_seed"] == {"0": 0.5, "1": 1.0}
    m = metrics()
    m["models"]["w2s-mcts"]["return_per_seed"] = models["w2s-mcts"]["return_per_seed"]
    text = write_report(m, tmp_path, plots=False).read_text()
    assert "| return x100 per seed (0 / 1 / 2) |" in text
    assert next(r for r in text.splitlines() if r.startswith("| W2S-MCTS | 75.0")).endswith(
        "| 50 / 100 / - |"
    )
    single = {**metrics(), "seeds": [0]}
    assert "per seed" not in write_report(single, tmp_path / "one", plots=False).read_text()
