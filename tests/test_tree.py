"""Trajectory trees: merge rule, statistics, canonical ids, networkx and file round trips, bad files."""

from __future__ import annotations

import json
import random

import networkx as nx
import pytest

from w2s_agents.errors import DataFormatError
from w2s_agents.tree import TREE_SCHEMA, TrajectoryTree, build_trees, normalize_text, tree_filename


@pytest.fixture
def golden(golden_trajectories) -> TrajectoryTree:
    return build_trees(golden_trajectories)["house/0"]


def test_normalize_text() -> None:
    assert normalize_text("  Take \t the   KEY\n") == "take the key"


def test_golden_tree_shape_and_texts(golden: TrajectoryTree) -> None:
    # canonical preorder, children sorted by action key: "look" < "take key"; "go south" < "open door";
    # "go north" < "go west" (see treedata.golden_trajectories)
    assert len(golden) == 7
    assert [golden.parent(n) for n in range(7)] == [-1, 0, 0, 2, 2, 4, 4]
    assert [golden.depth(n) for n in range(7)] == [0, 1, 1, 2, 2, 3, 3]
    assert [golden.action_key(n) for n in range(7)] == [
        "",
        "look",
        "take key",
        "go south",
        "open door",
        "go north",
        "go west",
    ]
    # "Take  Key" (T3) and "take key" (T1, T2) merged; the smallest raw spelling is shown
    assert golden.action(2) == "Take  Key"
    assert golden.observation(0) == "start"
    assert golden.observation(2) == "got key"
    assert golden.observation_before(4) == "got key"
    assert golden.observation(3) == "you fall in a pit"
    # thought of the highest-return trajectory through the node: T1 (return 1.0, no thought) beats
    # T3 ("grab it", 0.5) and T2 ("x", 0.0) at node 2
    assert golden.thought(2) == ""
    assert golden.thought(5) == "the exit is north"
    assert golden.instruction == "Leave the house."
    assert golden.children(0) == (1, 2)
    assert golden.children(4) == (5, 6)
    assert golden.path(6) == [0, 2, 4, 6]


def test_golden_statistics(golden: TrajectoryTree) -> None:
    # returns: T1 1.0 (won), T2 0.0 (lost), T3 0.5 (truncated, model "strong"), T4 0.0 (error)
    expected = {
        # node: (visits, return_sum, successes, failures, sources, terminal)
        0: (4, 1.0 + 0.0 + 0.5 + 0.0, 1, 3, {"strong": 1, "weak": 3}, {}),
        1: (1, 0.0, 0, 1, {"weak": 1}, {"error": 1}),  # T4
        2: (3, 1.0 + 0.0 + 0.5, 1, 2, {"strong": 1, "weak": 2}, {}),  # T1 T2 T3
        3: (1, 0.0, 0, 1, {"weak": 1}, {"lost": 1}),  # T2
        4: (2, 1.0 + 0.5, 1, 1, {"strong": 1, "weak": 1}, {}),  # T1 T3
        5: (1, 1.0, 1, 0, {"weak": 1}, {"won": 1}),  # T1
        6: (1, 0.5, 0, 1, {"strong": 1}, {"truncated": 1}),  # T3
    }
    for n, (visits, rsum, succ, fail, sources, terminal) in expected.items():
        assert golden.visits(n) == visits, n
        assert golden.return_sum(n) == rsum, n
        assert golden.successes(n) == succ, n
        assert golden.failures(n) == fail, n
        assert golden.sources(n) == sources, n
        assert golden.terminal(n) == terminal, n
    assert golden.mean_return(4) == (1.0 + 0.5) / 2


def test_golden_summary(golden: TrajectoryTree) -> None:
    s = golden.summary()
    assert (s.nodes, s.depth, s.leaves, s.trajectories) == (7, 3, 4, 4)  # leaves 1, 3, 5, 6
    assert (s.successes, s.failures) == (1, 3)
    assert s.mean_return == 1.5 / 4
    assert s.branch_points == 3  # nodes 0, 2, 4 have two children each
    assert (s.branching_mean, s.branching_max) == (2.0, 2)
    assert dict(s.sources) == {"strong": 1, "weak": 3}


def test_merge_needs_same_observation_before(make_traj) -> None:
    # same action on different observations: two children; same action on the same observation: one
    a = make_traj([("open door", "locked")], 0.0, "lost", seed=1)
    b = make_traj([("open door", "it opens")], 1.0, "won", seed=2)
    c = make_traj([("open door", "locked")], 0.0, "lost", seed=3, initial="another start")
    tree = build_trees([a, b, c])["house/0"]
    assert len(tree) == 3  # root, (open door | start), (open door | another start)
    first = next(n for n in tree.children(0) if tree.observation_before(n) == "start")
    assert tree.visits(first) == 2
    # the step's own observation after differs (stochastic env): shown text is the smallest key's
    assert tree.observation(first) == "it opens"


def test_custom_observation_key(make_traj) -> None:
    # a key that ignores a turn counter merges steps the default key keeps apart
    a = make_traj([("wait", "turn 1: rain"), ("wait", "turn 2: rain")], 0.0, "lost", seed=1)
    b = make_traj([("wait", "turn 7: rain"), ("wait", "turn 8: rain")], 0.0, "lost", seed=2)
    # default: the first "wait" (on "start") is shared, the second acts on "turn 1" vs "turn 7": 1 + 1 + 2
    assert len(build_trees([a, b])["house/0"]) == 4
    merged = build_trees([a, b], obs_key=lambda o: o.split(":", 1)[-1].strip())["house/0"]
    assert len(merged) == 1 + 2
    assert merged.visits(2) == 2


def test_wrong_task_is_refused(golden_trajectories) -> None:
    tree = TrajectoryTree("other")
    with pytest.raises(ValueError, match="house/0"):
        tree.add(golden_trajectories[0])


def random_trajectories(make_traj, n: int, seed: int) -> list:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        steps = []
        for _ in range(rng.randint(0, 5)):
            a = rng.choice(["go north", "Go North", "take key", "open door", "look"])
            steps.append((a, f"room {rng.randint(0, 2)}", rng.choice(["", "hmm", "ok"])))
        ret = rng.choice([0.0, 0.1, 0.3, 1.0])
        end = "won" if ret == 1.0 else rng.choice(["lost", "truncated", "error"])
        out.append(make_traj(steps, ret, end, seed=i, model=rng.choice(["a", "b"])))
    return out


def test_same_trajectories_in_any_order_give_the_same_tree(make_traj) -> None:
    trajs = random_trajectories(make_traj, 60, seed=1)
    reference = build_trees(trajs)["house/0"].to_json()
    assert len(reference["nodes"]) > 20
    for seed in range(5):
        shuffled = trajs[:]
        random.Random(seed).shuffle(shuffled)
        assert build_trees(shuffled)["house/0"].to_json() == reference


def test_incremental_adds_equal_one_build(make_traj) -> None:
    trajs = random_trajectories(make_traj, 40, seed=2)
    tree = TrajectoryTree("house/0")
    tree.extend(trajs[:20])
    tree.canonicalize()
    tree.extend(trajs[20:])
    assert tree.to_json() == build_trees(trajs)["house/0"].to_json()


@pytest.mark.parametrize("models", [2, 40])  # per-model counts as lists (few models) or dicts (many)
def test_statistics_summed_in_bulk_equal_step_by_step(make_traj, models: int) -> None:
    # many pending steps are summed with numpy, a few one node at a time: both must give the same tree,
    # whether the numpy pass starts from an empty tree or adds to summed statistics
    from w2s_agents.tree.tree import _BULK_STEPS

    rng = random.Random(3)
    trajs = []
    for i in range(3000):
        steps = [
            (
                rng.choice(["go north", "Go North", "take key", "open door", "look"]),
                f"room {rng.randint(0, 3)}",
                "",
            )
            for _ in range(rng.randint(0, 6))
        ]
        ret = rng.choice([0.0, 0.25, 1.0, 0.3])
        end = "won" if ret == 1.0 else rng.choice(["lost", "truncated", "error"])
        trajs.append(make_traj(steps, ret, end, seed=i, model=f"m{rng.randrange(models)}"))
    assert sum(t.num_steps for t in trajs[1500:]) > _BULK_STEPS

    one_by_one = TrajectoryTree("house/0")
    for traj in trajs:
        one_by_one.add(traj)
        one_by_one.update_statistics()
    bulk = TrajectoryTree("house/0")
    bulk.extend(trajs)
    two_passes = TrajectoryTree("house/0")
    two_passes.extend(trajs[:1500])
    two_passes.update_statistics()
    two_passes.extend(trajs[1500:])
    reference = one_by_one.to_json()
    assert bulk.to_json() == reference
    assert two_passes.to_json() == reference
    assert one_by_one.sources(0) == {
        f"m{i}": sum(t.source.model == f"m{i}" for t in trajs) for i in range(models)
    }


def test_networkx_round_trip_keeps_every_attribute(golden: TrajectoryTree, make_traj) -> None:
    golden.set_search_values(list(range(7)), [0.5 * i for i in range(7)], algorithm="test")
    g = golden.to_networkx()
    assert isinstance(g, nx.DiGraph)
    assert nx.is_arborescence(g)
    assert g.nodes[5]["action"] == "go north" and g.nodes[5]["terminal"] == {"won": 1}
    assert g.nodes[3]["mcts_visits"] == 3 and g.nodes[3]["mcts_value"] == 1.5
    expected_attrs = {
        "depth",
        "action",
        "thought",
        "observation",
        "visits",
        "return_sum",
        "successes",
        "failures",
        "sources",
        "mcts_visits",
        "mcts_value",
        "terminal",
    }
    assert expected_attrs <= set(g.nodes[0])
    back = TrajectoryTree.from_networkx(g)
    g2 = back.to_networkx()
    assert dict(g2.nodes(data=True)) == dict(g.nodes(data=True))
    assert sorted(g2.edges()) == sorted(g.edges())
    assert g2.graph == g.graph
    # the rebuilt tree still merges new trajectories like the original
    extra = make_traj([("take key", "got key"), ("go south", "you fall in a pit")], 0.0, "lost", seed=9)
    back.add(extra)
    golden.add(extra)
    assert back.to_json() == golden.to_json()


def test_save_load_round_trip(tmp_path, golden: TrajectoryTree) -> None:
    path = golden.save(tmp_path / "trees" / "t.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["schema"] == TREE_SCHEMA
    assert list(tmp_path.joinpath("trees").iterdir()) == [path]  # no temp file left
    loaded = TrajectoryTree.load(path)
    assert loaded.to_json() == golden.to_json()
    # the node-link part is readable by networkx itself
    g = nx.node_link_graph(data, edges="edges")
    assert g.number_of_nodes() == 7 and g.nodes[2]["visits"] == 3


def _saved(tmp_path, golden: TrajectoryTree) -> tuple:
    path = golden.save(tmp_path / "t.json")
    return path, json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(schema="w2s.tree/99"), "unsupported tree schema 'w2s.tree/99'"),
        (lambda d: d.pop("schema"), "missing field 'schema'"),
        (lambda d: d["nodes"][3].pop("visits"), "node 3: missing attribute 'visits'"),
        (lambda d: d["nodes"][2].update(visits="3"), "node 2: attribute 'visits' must be int"),
        (lambda d: d["nodes"][2].update(failures=9), "node 2: failures 9 != visits - successes"),
        (lambda d: d["edges"].pop(), "node 6: no parent"),
        (lambda d: d["edges"].append({"source": 1, "target": 6}), "node 6: more than one parent"),
        (lambda d: d["nodes"][4].update(terminal={"exploded": 1}), "unknown terminal outcome 'exploded'"),
        (lambda d: d["graph"].pop("task_id"), "graph attribute 'task_id'"),
    ],
)
def test_bad_tree_file_is_refused_with_file_and_problem(tmp_path, golden, edit, message) -> None:
    path, data = _saved(tmp_path, golden)
    edit(data)
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(DataFormatError) as info:
        TrajectoryTree.load(path)
    text = str(info.value)
    assert str(path) in text and message in text
    assert "\n" not in text


def test_tree_file_that_is_not_json(tmp_path) -> None:
    path = tmp_path / "t.json"
    path.write_text('{"schema": "w2s.tree/1",\n  "nodes": [', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"t\.json:2: invalid JSON"):
        TrajectoryTree.load(path)
    with pytest.raises(DataFormatError, match="tree file not found"):
        TrajectoryTree.load(tmp_path / "missing.json")


def test_tree_filename_is_safe_and_unique() -> None:
    a, b = tree_filename("tw/train/0"), tree_filename("tw_train_0")
    assert a != b
    assert a.startswith("tw_train_0-") and a.endswith(".json")
    assert "/" not in tree_filename("../../etc/passwd") and not tree_filename("..").startswith(".")


def test_empty_trajectory_ends_at_root(make_traj) -> None:
    tree = build_trees([make_traj([], 0.0, "error")])["house/0"]
    assert len(tree) == 1
    assert tree.terminal(0) == {"error": 1}
    assert tree.summary().leaves == 1
