"""``w2s search --online``: the expand stage on given tree files, resumable, with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from w2s_agents.cli import main
from w2s_agents.tree import ROOT, TrajectoryTree

TASK = "test-tw-simple/train/0"


def _online(trees: Path, out: Path, model: Path, cache: Path, *extra: str) -> list[str]:
    """The arguments of a small online expansion of the test suite's games."""
    return [
        "search",
        "--online",
        str(trees),
        "-o",
        str(out),
        "--model",
        str(model),
        "--suite",
        "test-tw-simple",
        "--max-steps",
        "4",
        "--iterations",
        "2",
        "--set",
        f"tasks.env_kwargs={{cache_dir: {cache}}}",
        "--set",
        "run.threads=1",
        *extra,
    ]


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_online_grows_copies_of_the_trees_and_a_second_call_resumes(
    tmp_path: Path, nano_model_dir: Path, game_cache_dir: Path, tw_test_suites: dict, capsys
) -> None:
    trees = tmp_path / "trees"
    for i in range(2):
        TrajectoryTree(f"test-tw-simple/train/{i}", env_id="w2s/TextWorld-v0").save(trees / f"t{i}.json")
    inputs = _snapshot(trees)
    out = tmp_path / "grown"
    args = _online(trees, out, nano_model_dir, game_cache_dir)

    assert main(args) == 0
    assert _snapshot(trees) == inputs  # the inputs are only read
    totals = json.loads((out / "expand.json").read_text())
    stats = [json.loads((out / "stats" / f"t{i}.json").read_text()) for i in range(2)]
    assert totals["trees"] == 2
    for key in ("iterations", "env_steps", "new_nodes", "successes"):
        assert totals[key] == sum(s[key] for s in stats), key
    for i, s in enumerate(stats):
        grown = TrajectoryTree.load(out / "trees" / f"t{i}.json")
        assert grown.task_id == s["task_id"] == f"test-tw-simple/train/{i}"
        assert s["iterations"] == 2 and s["new_nodes"] == len(grown) - 1 > 0
        assert grown.sources(ROOT) == {"weak-sft-search": 2}  # the expand stage's source of new branches
        assert max(grown.depth(n) for n in range(len(grown))) <= 4  # --max-steps: explore.max_steps
    printed = capsys.readouterr().out
    assert f"{out}: 2 trees (0 grown before), 4 episodes" in printed

    # a second call with the same settings grows nothing again and leaves every file as it was
    first = _snapshot(out)
    assert main(args) == 0
    assert _snapshot(out) == first
    assert f"{out}: 2 trees (2 grown before)" in capsys.readouterr().out

    # a call stopped after the first tree: the second is grown again, the same as before (seeded per task)
    (out / "stats" / "t1.json").unlink()
    (out / "trees" / "t1.json").unlink()
    assert main(args) == 0
    assert _snapshot(out) == first
    assert f"{out}: 2 trees (1 grown before)" in capsys.readouterr().out

    # other settings on a folder with grown trees: refused, nothing touched
    assert main([*args, "--set", "expand.c_puct=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("w2s: error: ") and "\n" not in err and "expand differ" in err
    assert _snapshot(out) == first


def _tree(folder: Path, name: str = "t.json", env_id: str = "w2s/TextWorld-v0") -> Path:
    return TrajectoryTree(TASK, env_id=env_id).save(folder / name)


@pytest.mark.parametrize(
    "case, message",
    [
        ("no-model", "--online needs --model DIR"),
        ("model-missing", "not a local model folder"),
        ("offline-option", "--gamma, --keep-values: offline MCTS options"),
        ("model-without-online", "--model is the prior of online expansion"),
        ("no-iterations", "expand.iterations is 0"),
        ("out-is-a-file", "is an existing file"),
        ("same-name", "two trees named t.json"),
        ("input-inside-out", "an input inside -o/--out"),
        ("other-env", "a tree of env w2s/ScienceWorld-v0, but tasks.suite=test-tw-simple"),
        ("unknown-key", "expand.c_pucts"),
    ],
)
def test_bad_online_calls_get_one_line_and_write_nothing(
    case: str, message: str, tmp_path: Path, nano_model_dir: Path, tw_test_suites: dict, capsys
) -> None:
    trees, out = tmp_path / "trees", tmp_path / "out"
    _tree(trees)

    def call(*more_trees: Path) -> list[str]:
        names = [str(trees), *map(str, more_trees)]
        return [
            "search",
            "--online",
            *names,
            "-o",
            str(out),
            "--suite",
            "test-tw-simple",
            "--iterations",
            "2",
        ]

    base = call()
    model = ["--model", str(nano_model_dir)]
    # built for this case only: some of them write the trees they name
    make_args = {
        "no-model": lambda: base,
        "model-missing": lambda: [*base, "--model", str(tmp_path / "nowhere")],
        "offline-option": lambda: [*base, *model, "--gamma", "2", "--keep-values"],
        "model-without-online": lambda: ["search", str(trees), "-o", str(out), *model],
        "no-iterations": lambda: [*base[:-2], *model],
        "out-is-a-file": lambda: [*base, *model],
        "same-name": lambda: [*call(_tree(tmp_path / "more")), *model],
        "input-inside-out": lambda: [*call(_tree(out / "in", "u.json")), *model],
        "other-env": lambda: [*call(_tree(tmp_path / "sw", "s.json", "w2s/ScienceWorld-v0")), *model],
        "unknown-key": lambda: [*base, *model, "--set", "expand.c_pucts=2"],
    }
    args = make_args[case]()
    if case == "out-is-a-file":
        out.write_text("x")
    before = _snapshot(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("w2s: error: ") and "\n" not in err and "Traceback" not in err
    assert message in err
    assert _snapshot(tmp_path) == before
