"""Trajectory trees: merge rule, statistics, canonical ids, networkx and file round trips, bad files."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import networkx as nx
import pytest

from w2s_agents.errors import DataFormatError
from w2s_agents.tree import TREE_SCHEMA, TrajectoryTree, build_trees, normalize_text, tree_filename
from w2s_agents.types import END_REASONS, Source, Step, Trajectory


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
    from w2s_agents.tree.merge import _BULK_STEPS

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
    assert g.nodes[3]["search_visits"] == 3 and g.nodes[3]["search_value_sum"] == 1.5
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
        "search_visits",
        "search_value_sum",
        "state_key",
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


def test_tree_with_a_lone_surrogate_is_not_saved(tmp_path, make_traj) -> None:
    # a lone surrogate cannot be written as UTF-8: one error naming the file, and no file or temp file left
    tree = build_trees([make_traj([("take \ud800 key", "got it")], 1.0, "won")])["house/0"]
    with pytest.raises(
        DataFormatError, match=r"t\.json: the tree of task 'house/0' holds text that is not valid"
    ):
        tree.save(tmp_path / "trees" / "t.json")
    assert list((tmp_path / "trees").iterdir()) == []


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


# ----------------------------------------------------------------------- the build against a reference


def test_normalize_text_equals_split_join_lower() -> None:
    # ASCII text takes a faster way (byte translation, split at double spaces): it must give the plain rule's
    # result on any text, every ASCII whitespace and control character included
    rng = random.Random(0)
    alphabet = [chr(i) for i in range(128)] + ["\x85", "\xa0", "\u2003", "\u3000", "É", "İ", "ß"]
    texts = ["", " ", "\x1c", "a\x1fb", "  A  \n\n B\t", "Score: 3    Moves: 7\n"]
    for _ in range(20_000):
        texts.append(
            "".join(
                rng.choice(alphabet) if rng.random() < 0.3 else rng.choice(" \t\nAb")
                for _ in range(rng.randint(0, 14))
            )
        )
    for text in texts:
        assert normalize_text(text) == " ".join(text.split()).lower(), repr(text)


def _reference_json(trajectories: list, obs_key=normalize_text) -> str:
    """The saved tree of one task built the straightforward way: every action and observation keyed as it
    comes, a node per (parent, action key, observation key), children sorted when written."""
    scale = 2**32  # returns are summed in fixed point
    obs_text: dict = {}  # key -> smallest raw text
    action_text: dict = {"": ""}

    def okey(raw: str):
        k = obs_key(raw)
        obs_text[k] = min(obs_text.get(k, raw), raw)
        return k

    def akey(raw: str) -> str:
        k = normalize_text(raw)
        action_text[k] = min(action_text.get(k, raw), raw)
        return k

    def new_node(depth: int, key: tuple) -> dict:
        return {"key": key, "depth": depth, "children": {}, "after": set(), "visits": 0, "ret": 0, "succ": 0,
                "sources": {}, "terminal": {}, "best": None}  # fmt: skip

    root = new_node(0, ("", None))
    for traj in trajectories:
        r = round(traj.return_ * scale)
        node, before = root, okey(traj.initial_observation)
        path = [root]
        root["after"].add(before)
        for step in traj.steps:
            key = (akey(step.action), before)
            node = node["children"].setdefault(key, new_node(node["depth"] + 1, key))
            before = okey(step.observation)
            node["after"].add(before)
            best = node["best"]  # (return, thought): the highest return's, the smallest text on ties
            if best is None or r > best[0] or (r == best[0] and step.thought < best[1]):
                node["best"] = (r, step.thought)
            path.append(node)
        for n in path:
            n["visits"] += 1
            n["ret"] += r
            n["succ"] += traj.success
            n["sources"][traj.source.model] = n["sources"].get(traj.source.model, 0) + 1
        node["terminal"][traj.end] = node["terminal"].get(traj.end, 0) + 1
    nodes, edges = [], []

    def write(node: dict, parent: int) -> None:
        i = len(nodes)
        if parent >= 0:
            edges.append({"source": parent, "target": i})
        nodes.append(
            {
                "id": i,
                "depth": node["depth"],
                "action": action_text[node["key"][0]],
                "thought": node["best"][1] if node["best"] else "",
                "observation": obs_text[min(node["after"])],
                "observation_before": "" if parent < 0 else obs_text[node["key"][1]],
                "visits": node["visits"],
                "return_sum": node["ret"] / scale,
                "successes": node["succ"],
                "failures": node["visits"] - node["succ"],
                "sources": dict(sorted(node["sources"].items())),
                "search_visits": 0,
                "search_value_sum": 0.0,
                "state_key": None,
                "terminal": {e: node["terminal"][e] for e in END_REASONS if e in node["terminal"]},
                "thought_return": node["best"][0] / scale if node["best"] else 0.0,
            }
        )
        for key in sorted(node["children"]):
            write(node["children"][key], i)

    write(root, -1)
    edges.sort(key=lambda e: (e["source"], e["target"]))  # node-link order: by source, as networkx lists them
    graph = {
        "task_id": trajectories[0].task_id,
        "env_id": trajectories[0].env_id,
        "instruction": min(t.instruction for t in trajectories),
        "sources": sorted({t.source.model for t in trajectories}),
        "search": {},
    }
    data = {"schema": TREE_SCHEMA, "directed": True, "multigraph": False, "graph": graph, "nodes": nodes,
            "edges": edges}  # fmt: skip
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def _noisy_trajectories(n: int, seed: int) -> list[Trajectory]:
    """Trajectories of one task whose observations are distinct per state (room, carried items, moves), written
    in several spellings of the same key (case, whitespace), and sometimes not the same after the same step."""
    rng = random.Random(seed)
    spellings = [
        lambda o: o,
        str.upper,
        lambda o: "  " + o.replace(" ", " \t ") + "\n",
        lambda o: o.replace("\n", "\n\n"),
        lambda o: o + "\x1c",
    ]
    out = []
    for i in range(n):
        room, carried, steps = 0, 0, []
        for move in range(1, rng.randrange(0, 7) + 1):
            action = rng.choice(["go north", "Go  North", "take coin", "open door", "LOOK"])
            room = (room * 3 + len(action) + (rng.random() < 0.15)) % 5  # now and then another outcome
            carried += action == "take coin"
            obs = f"Room {room}: a dusty room.\nYou carry {carried} coins.\nMoves: {move}"
            if rng.random() < 0.3:
                obs = rng.choice(spellings)(obs)
            steps.append(Step(action=action, observation=obs, thought=rng.choice(["", "hm", "go", "Go"])))
        ret, success, end = rng.choice(
            [(1.0, True, "won"), (0.0, False, "lost"), (0.3, False, "truncated"), (0.1, False, "error")]
        )
        out.append(
            Trajectory(
                task_id="house/0",
                env_id="w2s/Fake-v0",
                source=Source(model=rng.choice(["weak-a", "weak-b", "strong"]), role="weak", seed=i),
                instruction=rng.choice(["Leave the house.", "leave the house."]),
                initial_observation=rng.choice(["Start.", "START.", " start. "]),
                steps=tuple(steps),
                return_=ret,
                success=success,
                end=end,
            )
        )
    return out


def _saved_bytes(tree: TrajectoryTree, tmp_path, name: str) -> str:
    return tree.save(tmp_path / name).read_text(encoding="utf-8")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_build_equals_a_straightforward_reference(tmp_path, seed: int) -> None:
    # the build keys an observation only when its text differs from the first seen at its node, and settles
    # the rest when a text is read: the saved file must be byte for byte the reference's, which keys every
    # observation as it comes, however the trajectories are added and whenever texts are read
    trajs = _noisy_trajectories(600, seed)
    expected = _reference_json(trajs)
    assert len(json.loads(expected)["nodes"]) > 300
    assert _saved_bytes(build_trees(trajs)["house/0"], tmp_path, "built.json") == expected

    rng = random.Random(seed)
    tree = TrajectoryTree("house/0")
    assert tree.observation(0) == ""  # read while empty: the first text is settled later all the same
    shuffled = trajs[:]
    rng.shuffle(shuffled)
    for i, traj in enumerate(shuffled):
        leaf = tree.add(traj)
        if i % 53 == 0 and leaf:  # reads between adds, a renumbering now and then
            assert normalize_text(tree.observation_before(leaf)) == tree.obs_key_before(leaf)
            if i % 3 == 0:
                tree.canonicalize()
    assert _saved_bytes(tree, tmp_path, "added.json") == expected

    loaded = TrajectoryTree.load(build_trees(trajs[:250])["house/0"].save(tmp_path / "half.json"))
    loaded.extend(trajs[250:])
    assert _saved_bytes(loaded, tmp_path, "loaded.json") == expected


def test_build_with_a_custom_key_equals_the_reference(tmp_path) -> None:
    def room_only(obs: str) -> str:  # merges the observations of a room whatever the coins and moves
        return normalize_text(obs.split(":", 1)[0])

    trajs = _noisy_trajectories(400, seed=4)
    tree = build_trees(trajs, obs_key=room_only)["house/0"]
    assert _saved_bytes(tree, tmp_path, "t.json") == _reference_json(trajs, room_only)


def test_a_first_version_tree_file_is_read(tmp_path, golden: TrajectoryTree) -> None:
    """``w2s.tree/1`` files (N and W named mcts_visits / mcts_value, no state keys) still load."""
    golden.set_search_values([6, 2, 4, 1, 3, 2, 1], [2.5, 0.0, 2.5, 0.0, 2.5, 2.0, 0.5], algorithm="x")
    data = golden.to_json()
    old = dict(data, schema="w2s.tree/1", nodes=[])
    for rec in data["nodes"]:
        rec = dict(rec)
        rec["mcts_visits"], rec["mcts_value"] = rec.pop("search_visits"), rec.pop("search_value_sum")
        del rec["state_key"]
        old["nodes"].append(rec)
    (tmp_path / "old.json").write_text(json.dumps(old), encoding="utf-8")
    loaded = TrajectoryTree.load(tmp_path / "old.json")
    assert loaded.to_json() == data and loaded.search_value_sum(2) == 2.5


def test_state_keys_per_node_and_conflicts(tmp_path, make_traj) -> None:
    """A node keeps the state key its trajectories agree on; two different keys make it unknown, in any order."""

    def keyed(steps, keys, ret, end, seed):
        t = make_traj(steps, ret, end, seed=seed)
        new_steps = tuple(replace(s, state_key=k) for s, k in zip(t.steps, keys, strict=True))
        return replace(t, steps=new_steps, initial_state_key="s0")

    a = keyed([("go east", "hall"), ("go west", "start")], ["s1", "s0"], 0.0, "truncated", 1)
    b = keyed([("go east", "hall"), ("take key", "got key")], ["s1", "s2"], 0.5, "truncated", 2)
    c = keyed([("go east", "hall"), ("take key", "got key")], ["s1", "s3"], 0.5, "truncated", 3)  # disagrees
    plain = make_traj([("look", "start")], 0.0, "lost", seed=4)  # no keys: changes nothing
    trees = [build_trees(order)["house/0"] for order in ([a, b, c, plain], [plain, c, b, a])]
    assert trees[0].to_json() == trees[1].to_json()
    tree = trees[0]
    keys = {tuple(tree.action(n) for n in tree.path(i)[1:]): tree.state_key(i) for i in range(len(tree))}
    assert keys == {
        (): "s0",
        ("go east",): "s1",
        ("go east", "go west"): "s0",
        ("go east", "take key"): None,
        ("look",): None,
    }
    path = tree.save(tmp_path / "t.json")
    back = TrajectoryTree.load(path)
    assert back.to_json() == tree.to_json()
    back.add(b)  # a conflict stays a conflict after a reload
    assert [back.state_key(n) for n in range(len(back))] == [tree.state_key(n) for n in range(len(tree))]
