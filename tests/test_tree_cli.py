"""``w2s tree`` and ``w2s search`` from trajectory files to tree files and datasets."""

from __future__ import annotations

import json

import pytest

from w2s_agents.cli import main
from w2s_agents.store import TrajectoryStore
from w2s_agents.tree import TrajectoryTree, tree_filename


@pytest.fixture
def store(tmp_path, golden_trajectories, make_traj):
    path = tmp_path / "runs" / "trajectories.jsonl"
    with TrajectoryStore(path, fsync=False) as st:
        for traj in golden_trajectories:
            st.append(traj)
        st.append(make_traj([("go up", "a roof")], 0.0, "lost", task="tw/other task", seed=7))
        st.append(
            make_traj(
                [("take key", "got key"), ("open door", "door open"), ("go north", "you win")],
                1.0,
                "won",
                model="gold",
                role="expert",
                seed=8,
            )
        )
    return path


def test_tree_build_summary_and_search(tmp_path, store, capsys) -> None:
    trees = tmp_path / "trees"
    assert main(["tree", "build", str(store), "-o", str(trees)]) == 0
    files = sorted(p.name for p in trees.iterdir())
    assert files == sorted([tree_filename("house/0"), tree_filename("tw/other task")])
    out = capsys.readouterr().out
    assert "task house/0, 7 nodes, 5 trajectories (2 won)" in out  # the expert walks T1's path

    house = trees / tree_filename("house/0")
    assert main(["tree", "summary", str(house), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["nodes"], summary["leaves"], summary["successes"]) == (7, 4, 2)

    data = tmp_path / "data"
    args = ["search", str(trees), "-o", str(data), "--iterations", "50", "--set", "tie_break=order"]
    assert main([*args, "--trajectories", str(store)]) == 0
    tree = TrajectoryTree.load(house)
    assert tree.search_visits(0) == 50 and tree.search_info["iterations"] == 50
    sft = [json.loads(line) for line in (data / "sft.jsonl").read_text().splitlines()]
    assert {r["task_id"] for r in sft} == {"house/0", "tw/other task"}
    house_row = next(r for r in sft if r["task_id"] == "house/0")
    assert house_row["messages"][-1]["content"].endswith("go north")
    pairs = [json.loads(line) for line in (data / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(r["value_gap"] >= 0.1 for r in pairs)
    expert = [json.loads(line) for line in (data / "expert_pairs.jsonl").read_text().splitlines()]
    assert [r["rejected_value"] for r in expert] == [0.0, 0.0, 0.5]  # T2, T4 (lost, error), T3 (0.5)
    meta = json.loads((data / "search.json").read_text())
    assert meta["config"]["iterations"] == 50 and meta["pair_rows"] == len(pairs)


def test_bad_tree_file_gives_one_line_error(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "w2s.tree/7", "nodes": [], "edges": []}), encoding="utf-8")
    assert main(["tree", "summary", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("w2s: error: ") and str(bad) in err and "unsupported tree schema" in err
    assert main(["search", str(tmp_path / "nowhere"), "-o", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err


def test_search_rejects_unknown_setting(tmp_path, store, capsys) -> None:
    trees = tmp_path / "trees"
    assert main(["tree", "build", str(store), "-o", str(trees), "--task", "house/0"]) == 0
    assert len(list(trees.iterdir())) == 1
    assert main(["search", str(trees), "-o", str(tmp_path / "d"), "--set", "iteratons=5"]) == 2
    assert "iteratons" in capsys.readouterr().err
