"""Several weak supervisors in the pipeline (``weak_extra``, RAVEN): the config, the stage table, the metrics and
report section, and the two weak models of the shared miniature run (tests/pipeline_runs.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from w2s_agents.config import save_config
from w2s_agents.errors import ConfigError
from w2s_agents.pipeline import build_stages, stage_names
from w2s_agents.pipeline.cache import stage_keys
from w2s_agents.pipeline.experiment import load_experiment
from w2s_agents.pipeline.report import MODEL_LABELS, write_report
from w2s_agents.pipeline.weaks import weak_supervisor_metrics, weak_supervisors_section
from w2s_agents.store import read_trajectories
from w2s_agents.tree import TrajectoryTree

TWO_WEAK = "weak_extra=[{name: b, tiny_preset: weak}]"  # the default weak model is nano


# ------------------------------------------------------------------------------------------- config


def test_weak_extra_entries_parse_and_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "two.yaml"
    path.write_text(
        "weak: {tiny_preset: weak}\n"
        "weak_extra:\n"
        "  - {name: b, tiny_preset: nano}\n"
        "  - name: local\n"
        "    path: /models/weak-c\n"
    )
    cfg = load_experiment(path)
    assert [(w.name, w.tiny_preset, w.path) for w in cfg.weak_extra] == [
        ("b", "nano", None),
        ("local", "weak", "/models/weak-c"),
    ]
    assert cfg.weak.tiny_preset == "weak" and load_experiment(None).weak_extra == []
    assert load_experiment(save_config(cfg, tmp_path / "run")) == cfg
    # an override sets the list as YAML
    assert load_experiment(None, [TWO_WEAK]).weak_extra[0].name == "b"


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (
            "  - {name: b, tiny_preset: nano}\n  - {name: b, tiny_preset: small}\n",
            r"two\.yaml:1: config: 'weak_extra' names must be unique: 'b' names entries 0 and 1$",
        ),
        (
            "  - {name: b, tiny_preset: nano}\n  - {name: c, tiny_preset: huge}\n",
            r"two\.yaml:4: config key 'weak_extra\[1\]\.tiny_preset': expected one of 'nano', .*got 'huge'",
        ),
        ("  - {tiny_preset: nano}\n", r"two\.yaml:3: missing required config key 'weak_extra\[0\]\.name'$"),
        (
            "  - {name: a/b}\n",
            r"two\.yaml:3: config section 'weak_extra\[0\]': 'name' must be letters, digits, '_' or '-'",
        ),
        ("  - {name: search}\n", r"'name' must not be 'search': weak-sft-search is the source of online"),
        (
            "  - {name: b, tiny_prest: nano}\n",
            r"two\.yaml:3: unknown config key 'weak_extra\[0\]\.tiny_prest' \(did you mean 'tiny_preset'\?\)",
        ),
    ],
)
def test_bad_weak_extra_entries_are_refused_in_one_line(tmp_path: Path, entries: str, message: str) -> None:
    path = tmp_path / "two.yaml"
    path.write_text("weak: {tiny_preset: weak}\nweak_extra:\n" + entries)
    with pytest.raises(ConfigError, match=message) as err:
        load_experiment(path)
    assert "\n" not in str(err.value)


def test_an_extra_weak_models_missing_path_is_named(tmp_path: Path) -> None:
    from w2s_agents.errors import W2SError
    from w2s_agents.pipeline.cache import StageContext
    from w2s_agents.pipeline.stages import run_weak_model

    cfg = load_experiment(None, [f"weak_extra=[{{name: b}}, {{name: c, path: {tmp_path / 'absent'}}}]"])
    ctx = StageContext("models-c", tmp_path / "models-c", tmp_path, "key", {})
    with pytest.raises(W2SError, match=r"^weak_extra\[1\]\.path: .*absent is not a local model directory$"):
        run_weak_model(ctx, cfg, 0, index=1)
    assert not (tmp_path / "models-c").exists()


# ------------------------------------------------------------------------------------------- stage table


def test_one_weak_model_keeps_the_stage_keys() -> None:
    """The keys of the default run's stages, pinned (a change would make users' finished runs redo them, so it
    must be deliberate): a run with one weak model (``weak_extra`` empty, the default) has exactly these. The
    default's weak model changed deliberately from the ``weak`` preset to ``nano``; a run that names the
    ``weak`` preset keeps the keys it had."""
    expected = {
        (): {
            "models": "8eebd7fd84a7730b",
            "weak-sft": "f214c9b665c02236",
            "explore": "196387b0dc8936bf",
            "trees": "ac70c3797f77510c",
            "search": "4d742d4ebaf4436f",
        },
        # explore, trees and search changed deliberately when explorations got their own step limit
        # (explore.max_steps, twice tasks.max_steps by default)
        ("weak.tiny_preset=weak",): {
            "models": "ee5c011f8c1acff7",
            "weak-sft": "eae20da83adf703e",
            "explore": "a60f6904906e1048",
            "trees": "81651a79176fd733",
            "search": "867a442e7422f2b0",
        },
    }
    for base, pinned in expected.items():
        for overrides in ([*base], [*base, "weak_extra=[]"]):
            keys = stage_keys(build_stages(load_experiment(None, overrides), 0))
            assert {name: keys[name] for name in pinned} == pinned, overrides
    assert stage_names(load_experiment(None)) == [s.name for s in build_stages(load_experiment(None), 0)]


def test_stage_table_with_two_weak_models() -> None:
    one = load_experiment(None)
    two = load_experiment(None, [TWO_WEAK, "train.variants=[w2s-mcts, w2s-treedpo]"])
    stages = {s.name: s for s in build_stages(two, 0)}
    names = list(stages)
    assert names[: names.index("trees") + 1] == [
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
    ]
    deps = {n: s.deps for n, s in stages.items()}
    assert deps["models-b"] == ("demos",) and deps["weak-sft-b"] == ("models-b",)
    assert deps["explore-b"] == ("weak-sft-b",) and deps["trees"] == ("explore", "explore-b")
    # TreeDPO's reference and the weak baseline stay weak-sft; eval plays the extra weak SFT agent too
    assert deps["w2s-treedpo"] == ("search", "strong-sft", "weak-sft") and "weak-sft-b" in deps["eval"]
    # the extra weak model trains and explores with the first one's settings
    assert stages["weak-sft-b"].config["train"] == stages["weak-sft"].config["train"]
    assert stages["explore-b"].config == stages["explore"].config
    # the W2S stages learn per-source weights; the ceiling and the SFT baselines do not
    for name in ("w2s-mcts", "w2s-treedpo"):
        assert stages[name].config["train"]["sources"]["weights"], name
    for name in ("weak-sft", "strong-sft", "ceiling"):
        assert not stages[name].config["train"]["sources"]["weights"], name
    off = {
        s.name: s for s in build_stages(load_experiment(None, [TWO_WEAK, "train.source_weights=false"]), 0)
    }
    assert not off["w2s-mcts"].config["train"]["sources"]["weights"]
    # adding a weak model keeps the first one's models, SFT and exploration (cached), and changes the trees
    k1, k2 = stage_keys(build_stages(one, 0)), stage_keys(list(stages.values()))
    for name in ("models", "weak-sft", "strong-sft", "explore"):
        assert k1[name] == k2[name], name
    assert k1["trees"] != k2["trees"]


# ------------------------------------------------------------------------------------------- metrics


def _write(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, list):
        path.write_text("".join(json.dumps(x) + "\n" for x in data))
    else:
        path.write_text(json.dumps(data))


def test_metrics_count_each_sources_share_and_the_learned_weights(tmp_path: Path) -> None:
    cfg = load_experiment(None, [TWO_WEAK, "run.seeds=[0,1]"])
    for s, (a, b) in enumerate([((8, 2), (8, 6)), ((8, 0), (8, 4))]):
        seed = tmp_path / f"seed-{s}"
        _write(seed / "explore" / "explore.json", {"episodes": a[0], "successes": a[1]})
        _write(seed / "explore-b" / "explore.json", {"episodes": b[0], "successes": b[1]})
        _write(
            seed / "search" / "sft.jsonl",
            [{"sources": ["weak-sft"]}, {"sources": ["weak-sft", "weak-sft-b"]}, {"sources": ["weak-sft-b"]}],
        )
        _write(
            seed / "search" / "pairs.jsonl",
            [{"chosen_sources": ["weak-sft-b"], "rejected_sources": ["weak-sft-b"]}],
        )
        _write(
            seed / "w2s-mcts" / "model.json",
            {"source_weights": {"weak-sft": 0.2 + 0.2 * s, "weak-sft-b": 0.8 - 0.2 * s}},
        )
        _write(seed / "w2s-treedpo" / "model.json", {"skipped": "no preference pairs"})
    m = weak_supervisor_metrics(tmp_path, [0, 1], cfg)
    first, b = m["sources"]["weak-sft"], m["sources"]["weak-sft-b"]
    assert m["totals"] == {"trajectories": 32, "sft_rows": 6, "pairs": 2}
    assert (first["trajectories"], first["successes"], first["success_rate"]) == (16, 2, 2 / 16)
    assert (b["trajectories"], b["successes"], b["success_rate"]) == (16, 10, 10 / 16)
    assert first["trajectory_share"] == b["trajectory_share"] == 0.5
    assert (first["sft_rows"], first["sft_row_share"], b["sft_rows"]) == (4, 4 / 6, 4)
    assert (first["pairs"], b["pairs"], b["pair_share"]) == (0, 2, 1.0)
    assert (first["config"], first["model"], b["config"], b["model"]) == (
        "weak",
        "tiny preset nano",
        "b",
        "tiny preset weak",
    )
    assert list(m["weights"]) == ["w2s-mcts"]  # the skipped stage learned nothing
    assert m["weights"]["w2s-mcts"]["mean"] == pytest.approx({"weak-sft": 0.3, "weak-sft-b": 0.7})
    assert set(m["weights"]["w2s-mcts"]["per_seed"]) == {"0", "1"}
    lines = weak_supervisors_section({"weak_supervisors": m}, MODEL_LABELS)
    assert lines[0] == "## Weak supervisors"
    assert (
        "| `weak-sft-b` (b) | tiny preset weak | 16 (50.0%) | 62.5% | 4 (66.7%) | 2 (100.0%) | 0.700 |"
        in lines
    )
    assert any(line.startswith("| source |") and line.endswith("| weight: W2S-MCTS |") for line in lines)
    assert weak_supervisors_section({}, MODEL_LABELS) == []


# ------------------------------------------------------------------------------------------- a run


@pytest.mark.slow
def test_miniature_run_with_two_weak_models(feature_run: Any, tmp_path: Path) -> None:
    """On the shared feature run (tests/pipeline_runs.py): the weak models ``weak`` and ``b`` (weak_extra)."""
    cfg = feature_run.cfg
    assert [w.name for w in cfg.weak_extra] == ["b"]
    result = feature_run.result
    seed_dir = result.run_dir / "seed-0"
    train = json.loads((seed_dir / "tasks" / "tasks.json").read_text())["train"]
    per_explore = len(train) * len(cfg.explore.samplers) * cfg.explore.seeds  # episodes of one exploration
    # each weak model explored every train task; its episodes carry its SFT stage's name
    for stage, model in (("explore", "weak-sft"), ("explore-b", "weak-sft-b")):
        trajs = list(read_trajectories(seed_dir / stage / "trajectories.jsonl"))
        assert len(trajs) == per_explore and {t.task_id for t in trajs} == set(train), stage
        assert {t.source.model for t in trajs} == {model}, stage
    # one tree per task holds both sources
    trees = [TrajectoryTree.load(p) for p in sorted((seed_dir / "trees" / "trees").glob("*.json"))]
    assert len(trees) == len(train)
    per_task = per_explore // len(train)
    for tree in trees:
        assert tree.sources(0) == {"weak-sft": per_task, "weak-sft-b": per_task}
    rows = [json.loads(line) for line in (seed_dir / "search" / "sft.jsonl").read_text().splitlines()]
    assert {s for r in rows for s in r["sources"]} == {"weak-sft", "weak-sft-b"}
    # W2S-MCTS learned one weight per source, on the simplex, recorded with its model
    learned = json.loads((seed_dir / "w2s-mcts" / "model.json").read_text())["source_weights"]
    assert set(learned) == {"weak-sft", "weak-sft-b"} and sum(learned.values()) == pytest.approx(1.0)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert {"weak-sft", "weak-sft-b"} <= set(metrics["models"])
    assert metrics["models"]["weak-sft-b"]["label"] == "Weak SFT (b)"
    ws = metrics["weak_supervisors"]
    assert (
        ws["totals"]["trajectories"] == 2 * per_explore
    )  # both weak explorations (round 2's is no weak one)
    assert ws["sources"]["weak-sft-b"]["trajectories"] == per_explore
    assert ws["weights"]["w2s-mcts"]["mean"] == pytest.approx(learned)
    # both explorations, and round 2's (run.rounds: 2)
    assert metrics["search_cost"]["exploration_episodes"] == 3 * per_explore
    report = (result.run_dir / "report.md").read_text()
    assert "## Weak supervisors" in report and "| Weak SFT (b) | " in report
    assert report.index("| Weak SFT | ") < report.index("| Weak SFT (b) | ") < report.index("| Strong SFT | ")
    # the report written again over the run's (in a copy: the other tests read the shared run's)
    shutil.copy(result.run_dir / "report.md", tmp_path / "report.md")
    assert write_report(metrics, tmp_path, plots=False).read_text().count("## Weak supervisors") == 1
