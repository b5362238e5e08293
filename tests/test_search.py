"""Offline MCTS, node values, best paths and pair extraction, checked against values computed by hand."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from w2s_agents.errors import ConfigError
from w2s_agents.messages import SYSTEM_PROMPT
from w2s_agents.search import (
    SearchConfig,
    backup,
    best_path,
    best_path_row,
    expert_failure_pairs,
    max_values,
    mean_values,
    node_values,
    run_mcts,
    search_tree,
    select_child,
    success_values,
    tie_orders,
    tree_pairs,
    unique_rows,
    write_rows,
)
from w2s_agents.tree import TrajectoryTree, build_trees

G = 1.41


def ucb(r: float, c: int, parent: int) -> float:
    return r / c + G * math.sqrt(math.log(parent) / c)


@pytest.fixture
def golden(golden_trajectories) -> TrajectoryTree:
    # 0 root; 1 look (leaf, mean 0.0); 2 take key; 3 go south (leaf 0.0); 4 open door; 5 go north (leaf 1.0);
    # 6 go west (leaf 0.5)
    return build_trees(golden_trajectories)["house/0"]


def test_golden_mcts_after_six_iterations(golden: TrajectoryTree) -> None:
    # By hand, tie order = canonical order, gamma 1.41:
    # it1: root's children unvisited -> 1 (look), leaf 0.0.                     root c1 r0; n1 c1 r0
    # it2: root's 2nd unvisited -> 2, its first unvisited -> 3 (go south) 0.0.   root c2; n2 c1; n3 c1
    # it3: root c=2: UCB(1) = 0 + 1.41*sqrt(ln2/1) = UCB(2): tie -> 1, leaf 0.0. root c3; n1 c2
    # it4: UCB(1) = 0 + 1.41*sqrt(ln3/2) = 1.0450 < UCB(2) = 0 + 1.41*sqrt(ln3/1) = 1.4779 -> 2;
    #      n2 has an unvisited child 4, then 4's first unvisited 5 (go north) 1.0.
    #      root c4 r1; n2 c2 r1; n4 c1 r1; n5 c1 r1
    # it5: UCB(1) = 0 + 1.41*sqrt(ln4/2) = 1.1739 < UCB(2) = 1/2 + 1.1739 -> 2;
    #      at 2 (c=2): UCB(3) = 0 + 1.41*sqrt(ln2) = 1.1739 < UCB(4) = 1/1 + 1.1739 -> 4;
    #      4's unvisited 6 (go west) 0.5.  root c5 r1.5; n2 c3 r1.5; n4 c2 r1.5; n6 c1 r0.5
    # it6: UCB(1) = 0 + 1.41*sqrt(ln5/2) = 1.2648 < UCB(2) = 1.5/3 + 1.41*sqrt(ln5/3) = 1.5328 -> 2;
    #      at 2 (c=3): UCB(3) = 0 + 1.41*sqrt(ln3/1) = 1.4779 < UCB(4) = 1.5/2 + 1.41*sqrt(ln3/2) = 1.7950 -> 4;
    #      at 4 (c=2): UCB(5) = 1 + 1.1739 > UCB(6) = 0.5 + 1.1739 -> 5, leaf 1.0.
    # the it3 tie (both children r0 c1) goes to 1, the first in canonical order: after 3 iterations 1 has 2 visits
    assert run_mcts(golden, 3, G, tie_break="order").visits.tolist() == [3, 2, 1, 1, 0, 0, 0]
    assert ucb(0, 2, 3) < ucb(0, 1, 3)
    assert ucb(0, 2, 5) < ucb(1.5, 3, 5)
    assert ucb(0, 1, 3) < ucb(1.5, 2, 3)
    result = run_mcts(golden, 6, G, tie_break="order")
    assert result.visits.tolist() == [6, 2, 4, 1, 3, 2, 1]
    assert result.value_sum.tolist() == [2.5, 0.0, 2.5, 0.0, 2.5, 2.0, 0.5]
    # best path by r/c: 1 (0/2) < 2 (2.5/4); 3 (0/1) < 4 (2.5/3); 5 (2/2) > 6 (0.5/1)
    assert best_path(golden, result.values()) == [0, 2, 4, 5]


def test_mcts_equals_the_plain_algorithm_on_random_trees(make_traj) -> None:
    rng = random.Random(5)
    trajs = []
    for i in range(120):
        steps = [(rng.choice(["a", "b", "c"]), "s") for _ in range(rng.randint(1, 6))]
        ret = rng.choice([0.0, 0.25, 0.5, 1.0])
        trajs.append(make_traj(steps, ret, "won" if ret == 1.0 else "lost", seed=i))
    canonical = build_trees(trajs)["house/0"]
    assert any(len(canonical.children(n)) == 1 for n in range(len(canonical)))  # chains are contracted
    insertion = TrajectoryTree("house/0")  # ids in insertion order: searched through a preorder view
    insertion.extend(reversed(trajs))
    assert not insertion.is_canonical
    for tree, tie_break, seed in [
        (canonical, "order", 0),
        (canonical, "random", 0),
        (canonical, "random", 7),
        (insertion, "order", 0),
        (insertion, "random", 3),
    ]:
        orders = tie_orders(tree, tie_break, seed)
        visits, sums = [0] * len(tree), [0.0] * len(tree)
        for _ in range(300):
            path = [0]
            while orders[path[-1]]:
                path.append(select_child(orders[path[-1]], visits, sums, visits[path[-1]], G))
            backup(path, tree.mean_return(path[-1]), visits, sums)
        result = run_mcts(tree, 300, G, seed=seed, tie_break=tie_break)
        assert result.visits.tolist() == visits
        assert result.value_sum.tolist() == sums


def test_discounted_mcts_equals_the_plain_algorithm_on_random_trees(make_traj) -> None:
    rng = random.Random(11)
    trajs = []
    for i in range(120):
        steps = [(rng.choice(["a", "b", "c"]), "s") for _ in range(rng.randint(1, 6))]
        ret = rng.choice([0.0, 0.5, 1.0])
        trajs.append(make_traj(steps, ret, "won" if ret == 1.0 else "lost", seed=i))
    tree = build_trees(trajs)["house/0"]
    d = 0.8
    depth = [tree.depth(n) for n in range(len(tree))]
    orders = tie_orders(tree, "random", 2)
    visits, sums = [0] * len(tree), [0.0] * len(tree)  # sums of d^depth(leaf) * return (absolute)
    for _ in range(300):
        path = [0]
        while orders[path[-1]]:
            relative = [sums[n] / d ** depth[n] for n in range(len(tree))]  # each child from its own depth
            path.append(select_child(orders[path[-1]], visits, relative, visits[path[-1]], G))
        backup(path, tree.mean_return(path[-1]) * d ** depth[path[-1]], visits, sums)
    result = run_mcts(tree, 300, G, seed=2, tie_break="random", discount=d)
    assert result.visits.tolist() == visits
    want = [sums[n] / d ** depth[n] for n in range(len(tree))]
    assert result.value_sum.tolist() == pytest.approx(want, rel=1e-12)
    # discount 1 is the paper's search, bit for bit
    plain = run_mcts(tree, 300, G, seed=2, tie_break="random")
    same = run_mcts(tree, 300, G, seed=2, tie_break="random", discount=1.0)
    assert plain.value_sum.tolist() == same.value_sum.tolist()


def test_a_discount_prefers_the_shorter_of_two_successes(make_traj) -> None:
    # both branches win; the detour takes two more steps. Tree: 0 root; "go east" -> a -> "take coin" (won);
    # "go west" -> b -> "go east" -> c -> "go east" -> d -> "take coin" (won)
    trajs = [
        make_traj([("go east", "coin room"), ("take coin", "won")], 1.0, "won", seed=1),
        make_traj(
            [("go west", "hall"), ("go east", "start"), ("go east", "coin room"), ("take coin", "won")],
            1.0,
            "won",
            seed=2,
        ),
    ]
    tree = build_trees(trajs)["house/0"]
    east, west = sorted(tree.children(0), key=tree.action)
    assert tree.action(east) == "go east" and tree.action(west) == "go west"
    # undiscounted, both are worth 1.0; with d = 0.5, a return k steps below counts 0.5^k:
    # go east: 0.5^1 (one more step); go west: 0.5^3; root: mean of 0.5^2 and 0.5^4
    for kind in ("mean", "max"):
        assert node_values(tree, kind)[[east, west]].tolist() == [1.0, 1.0]
        got = node_values(tree, kind, discount=0.5)
        assert got[[east, west]].tolist() == [0.5, 0.125], kind
    assert mean_values(tree, 0.5)[0] == pytest.approx((0.25 + 0.0625) / 2)
    assert max_values(tree, 0.5)[0] == pytest.approx(0.25)
    searched = run_mcts(tree, 200, G, tie_break="order", discount=0.5)
    values = searched.values()
    assert values[east] == pytest.approx(0.5) and values[west] == pytest.approx(0.125)
    assert best_path(tree, values)[1] == east
    search_tree(tree, SearchConfig(iterations=50, discount=0.5))
    assert tree.search_info["discount"] == 0.5
    assert best_path(tree, node_values(tree, "mcts"))[1] == east
    with pytest.raises(ConfigError, match="discount"):
        SearchConfig(discount=0.0)


def test_mcts_is_deterministic_for_a_seed(golden: TrajectoryTree) -> None:
    a = run_mcts(golden, 50, seed=3)
    b = run_mcts(golden, 50, seed=3)
    assert a.visits.tolist() == b.visits.tolist() and a.value_sum.tolist() == b.value_sum.tolist()
    # on the golden tree, seeds differ in which tied child goes first at some node
    firsts = {tuple(tie_orders(golden, "random", s)[0]) for s in range(8)}
    assert firsts == {(1, 2), (2, 1)}


def test_one_success_among_many_failures_is_the_best_path(make_traj) -> None:
    rng = random.Random(0)
    actions = ["go north", "go south", "go east", "go west", "take lamp", "open box"]
    trajs = []
    for i in range(200):
        steps = [(rng.choice(actions), f"room {rng.randint(0, 3)}") for _ in range(6)]
        trajs.append(make_traj(steps, 0.0, "lost", seed=i))
    winning = [
        ("take lamp", "lamp taken"),
        ("go east", "a door"),
        ("open box", "a key"),
        ("go north", "outside"),
    ]
    trajs.append(make_traj(winning, 1.0, "won", seed=999))
    tree = build_trees(trajs)["house/0"]
    search_tree(tree, SearchConfig(iterations=3000))
    path = best_path(tree, node_values(tree, "mcts"))
    assert [tree.action(n) for n in path[1:]] == [a for a, _ in winning]
    assert tree.terminal(path[-1]) == {"won": 1}
    for kind in ("mean", "max", "success"):
        assert best_path(tree, node_values(tree, kind))[-1] == path[-1], kind


def test_alternative_values_by_hand(golden: TrajectoryTree) -> None:
    # mean return: node -> return_sum / visits
    assert mean_values(golden).tolist() == [1.5 / 4, 0.0, 1.5 / 3, 0.0, 1.5 / 2, 1.0, 0.5]
    # success probability: successes / visits
    assert success_values(golden).tolist() == [1 / 4, 0.0, 1 / 3, 0.0, 1 / 2, 1.0, 0.0]
    # max (Bellman): leaves keep their mean; 4 = max(1.0, 0.5); 2 = max(0.0, 1.0); 0 = max(0.0, 1.0)
    assert max_values(golden).tolist() == [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.5]


def test_max_value_counts_trajectories_that_end_inside(make_traj) -> None:
    # a trajectory that won after one step, and one that went on and lost: the node is worth 1.0
    trajs = [
        make_traj([("open door", "you escape")], 1.0, "won", seed=1),
        make_traj([("open door", "you escape"), ("go back", "trapped")], 0.0, "lost", seed=2),
    ]
    tree = build_trees(trajs)["house/0"]
    assert max_values(tree).tolist() == [1.0, 1.0, 0.0]


def test_mcts_values_need_a_search(golden: TrajectoryTree) -> None:
    with pytest.raises(ValueError, match="no search values"):
        node_values(golden, "mcts")


def _golden_searched(golden: TrajectoryTree) -> np.ndarray:
    search_tree(golden, SearchConfig(iterations=6, tie_break="order"))
    # values r/c after 6 iterations (see test_golden_mcts_after_six_iterations)
    values = node_values(golden, "mcts")
    assert values.tolist() == [2.5 / 6, 0.0, 2.5 / 4, 0.0, 2.5 / 3, 1.0, 0.5]
    return values


def test_golden_pairs(golden: TrajectoryTree) -> None:
    values = _golden_searched(golden)
    rows = [r.to_dict() for r in tree_pairs(golden, values, margin=0.1, per_node=4)]
    # divergence points: node 0 (1 vs 2, same observation "start"), node 2 (3 vs 4, "got key"),
    # node 4 (5 vs 6, "door open"). Gaps: 0.625 - 0 = 0.625; 0.8333 - 0 = 0.8333; 1.0 - 0.5 = 0.5.
    # Each gives a step row and a continuation row, except at node 4 where both children are leaves and
    # the continuation row would repeat the step row (dropped as a duplicate).
    got = [(r["level"], r["node"], r["chosen_node"], r["rejected_node"]) for r in rows]
    assert got == [
        ("step", 0, 2, 1),
        ("continuation", 0, 2, 1),
        ("step", 2, 4, 3),
        ("continuation", 2, 4, 3),
        ("step", 4, 5, 6),
    ]
    gaps = [r["value_gap"] for r in rows]
    assert gaps == [2.5 / 4, 2.5 / 4, 2.5 / 3, 2.5 / 3, 0.5]
    sys = {"role": "system", "content": SYSTEM_PROMPT}
    task = {"role": "user", "content": "Task: Leave the house.\n\nstart"}
    step4 = rows[4]
    assert step4["prompt"] == [
        sys,
        task,
        {"role": "assistant", "content": "Take  Key"},
        {"role": "user", "content": "got key"},
        {"role": "assistant", "content": "open door"},
        {"role": "user", "content": "door open"},
    ]
    assert step4["chosen"] == [
        {"role": "assistant", "content": "Thought: the exit is north\nAction: go north"}
    ]
    assert step4["rejected"] == [{"role": "assistant", "content": "go west"}]
    assert step4["chosen_sources"] == ["weak"] and step4["rejected_sources"] == ["strong"]
    cont = rows[3]
    assert cont["chosen"] == [
        {"role": "assistant", "content": "open door"},
        {"role": "user", "content": "door open"},
        {"role": "assistant", "content": "Thought: the exit is north\nAction: go north"},
    ]
    assert cont["rejected"] == [{"role": "assistant", "content": "go south"}]
    # a margin above 0.625 keeps only the pair at node 2 (gap 0.8333); per_node caps each node
    assert [r.node for r in tree_pairs(golden, values, margin=0.7, continuation=False)] == [2]
    assert len(tree_pairs(golden, values, margin=0.0, per_node=1, continuation=False)) == 3


def test_pairs_only_between_children_on_the_same_observation(make_traj) -> None:
    # two first steps from different starting observations never pair with each other
    trajs = [
        make_traj([("open door", "out")], 1.0, "won", seed=1),
        make_traj([("sleep", "zzz")], 0.0, "lost", seed=2, initial="another start"),
    ]
    tree = build_trees(trajs)["house/0"]
    assert tree_pairs(tree, mean_values(tree), margin=0.0) == []


def test_cap_per_node_keeps_largest_gaps(make_traj) -> None:
    trajs = [make_traj([(f"act {i}", f"o{i}")], i / 4, "won" if i == 4 else "lost", seed=i) for i in range(5)]
    tree = build_trees(trajs)["house/0"]
    rows = [
        r.to_dict() for r in tree_pairs(tree, mean_values(tree), margin=0.3, per_node=3, continuation=False)
    ]
    # values 0, .25, .5, .75, 1; gaps >= 0.3: (4,0)=1, (3,0)=.75, (4,1)=.75, (2,0)=.5, (3,1)=.5, (4,2)=.5
    # largest three, ties by better child's then worse child's canonical position
    got = [(tree.action(r["chosen_node"]), tree.action(r["rejected_node"])) for r in rows]
    assert got == [("act 4", "act 0"), ("act 3", "act 0"), ("act 4", "act 1")]
    assert len({json.dumps([r["prompt"], r["chosen"], r["rejected"]]) for r in rows}) == len(rows)


def test_best_path_sft_row(golden: TrajectoryTree) -> None:
    values = _golden_searched(golden)
    typed = best_path_row(golden, values)
    assert typed is not None
    row = typed.to_dict()
    assert [m["content"] for m in row["messages"][2:]] == [
        "Take  Key",
        "got key",
        "open door",
        "door open",
        "Thought: the exit is north\nAction: go north",
    ]
    assert (row["node"], row["steps"], row["return"], row["value"]) == (5, 3, 1.0, 1.0)
    assert best_path_row(golden, values, min_return=1.0) is not None
    assert best_path_row(TrajectoryTree("x"), values[:1]) is None  # a tree without steps


def test_expert_failure_pairs(make_traj) -> None:
    expert = make_traj(
        [("take key", "got key"), ("open door", "out")], 1.0, "won", role="expert", model="gold"
    )
    weak_fail = make_traj([("look", "start")], 0.0, "lost", seed=1)
    weak_half = make_traj([("take key", "got key")], 0.5, "truncated", seed=2)
    weak_win = make_traj([("take key", "got key"), ("open door", "out")], 1.0, "won", seed=3)
    rows = [
        r.to_dict()
        for r in expert_failure_pairs([weak_half, expert, weak_win, weak_fail], margin=0.1, per_task=4)
    ]
    # failed (not won) weak trajectories, lowest return first; the won weak one is never rejected
    assert [r["rejected_value"] for r in rows] == [0.0, 0.5]
    assert rows[0]["chosen"] == [
        {"role": "assistant", "content": "take key"},
        {"role": "user", "content": "got key"},
        {"role": "assistant", "content": "open door"},
    ]
    assert rows[0]["rejected"] == [{"role": "assistant", "content": "look"}]
    assert rows[0]["level"] == "trajectory" and rows[0]["chosen_sources"] == ["gold"]
    assert len(expert_failure_pairs([expert, weak_half], margin=0.6)) == 0


def test_rows_load_with_hf_datasets(tmp_path, golden: TrajectoryTree, make_traj) -> None:
    datasets = pytest.importorskip("datasets")
    values = _golden_searched(golden)
    pairs = tree_pairs(golden, values)
    eto = expert_failure_pairs(
        [
            make_traj([("take key", "got key")], 1.0, "won", role="expert", model="gold"),
            make_traj([("look", "start")], 0.0, "lost", seed=1),
        ]
    )
    assert write_rows([*pairs, *eto], tmp_path / "pairs.jsonl") == len(pairs) + len(eto)
    assert write_rows([best_path_row(golden, values)], tmp_path / "sft.jsonl") == 1
    ds = datasets.load_dataset("json", data_files=str(tmp_path / "pairs.jsonl"), split="train")
    assert ds.num_rows == len(pairs) + 1
    assert ds[0]["prompt"][0]["role"] == "system" and ds[0]["chosen"][0]["role"] == "assistant"
    assert ds[len(pairs)]["level"] == "trajectory"
    sft = datasets.load_dataset("json", data_files=str(tmp_path / "sft.jsonl"), split="train")
    assert sft[0]["messages"][-1]["content"].endswith("go north")


def test_unique_rows_drops_repeats(golden: TrajectoryTree) -> None:
    rows = tree_pairs(golden, mean_values(golden), margin=0.1)
    assert list(unique_rows(rows + rows)) == rows


def test_search_config_validation() -> None:
    assert SearchConfig().gamma == 1.41 and SearchConfig().iterations == 1000
    with pytest.raises(ConfigError, match="'margin'"):
        SearchConfig(margin=-1)
    with pytest.raises(ConfigError, match="'pairs_per_node'"):
        SearchConfig(pairs_per_node=0)


def test_search_writes_values_into_the_tree_and_file(tmp_path, golden: TrajectoryTree) -> None:
    search_tree(golden, SearchConfig(iterations=6, tie_break="order"))
    loaded = TrajectoryTree.load(golden.save(tmp_path / "t.json"))
    assert [loaded.search_visits(n) for n in range(7)] == [6, 2, 4, 1, 3, 2, 1]
    assert loaded.search_info["iterations"] == 6
    assert node_values(loaded, "mcts").tolist() == node_values(golden, "mcts").tolist()


def test_search_never_imports_torch() -> None:
    import subprocess
    import sys

    code = "import sys, w2s_agents.search, w2s_agents.tree; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
