"""Statistics that ``TrajectoryTree.add`` defers give the same tree however and whenever they are summed."""

from __future__ import annotations

import json
import random

import pytest

import w2s_agents.tree.counts as counts_module
from w2s_agents.tree import TrajectoryTree, build_trees, normalize_text
from w2s_agents.types import Source, Step, Trajectory

ROOMS = [f"Room {i}: a {'dusty ' * (i % 3)}room with {i} doors." for i in range(8)]
ACTIONS = ["go north", "Go  North", "take key", "open door", "look"]


def _trajectories(n: int, seed: int) -> list[Trajectory]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randrange(0, 7)
        steps = []
        for _ in range(length):
            obs = rng.choice(ROOMS)
            if rng.random() < 0.2:
                obs = obs.upper()  # another spelling of the same key
            steps.append(
                Step(action=rng.choice(ACTIONS), observation=obs, thought=rng.choice(["", "a", "b"]))
            )
        outcome = rng.choice(
            [("won", True, 1.0), ("lost", False, 0.0), ("truncated", False, rng.choice([0.25, 0.3, 0.1]))]
        )
        out.append(
            Trajectory(
                task_id="house/0",
                env_id="w2s/Test-v0",
                source=Source(
                    model=rng.choice(["m-a", "m-b", "m-c", "m-d"]), role="weak", sampler="s", seed=i
                ),
                instruction="Find the key.",
                initial_observation=rng.choice(ROOMS[:2]),
                steps=tuple(steps),
                return_=outcome[2],
                success=outcome[1],
                end=outcome[0],
            )
        )
    return out


def _saved(tree: TrajectoryTree) -> str:
    return json.dumps(tree.to_json(), sort_keys=True)


def _build(trajs: list[Trajectory], read_every: int) -> TrajectoryTree:
    tree = TrajectoryTree("house/0")
    for i, traj in enumerate(trajs, 1):
        leaf = tree.add(traj)
        if read_every and i % read_every == 0:
            assert tree.visits(leaf) >= 1 and tree.depth(leaf) == traj.num_steps
            assert sum(tree.terminal(leaf).values()) >= 1
        if read_every and i % (7 * read_every) == 0:
            tree.canonicalize()
    return tree


@pytest.mark.slow
def test_reads_between_adds_do_not_change_the_tree() -> None:
    trajs = _trajectories(3000, seed=1)
    reference = _saved(build_trees(trajs)["house/0"])
    for read_every in (1, 5, 97, 1000):
        shuffled = list(trajs)
        random.Random(read_every).shuffle(shuffled)
        assert _saved(_build(shuffled, read_every)) == reference


def test_statistics_equal_step_by_step_counts() -> None:
    trajs = _trajectories(2500, seed=2)
    tree = build_trees(trajs)["house/0"]
    visits: dict[int, int] = {}
    wins: dict[int, int] = {}
    rets: dict[int, int] = {}
    models: dict[int, dict[str, int]] = {}
    for t in trajs:
        for node in _path_nodes(tree, t):
            visits[node] = visits.get(node, 0) + 1
            wins[node] = wins.get(node, 0) + t.success
            rets[node] = rets.get(node, 0) + round(t.return_ * 2**32)  # the fixed point of the sums
            per = models.setdefault(node, {})
            per[t.source.model] = per.get(t.source.model, 0) + 1
    assert sorted(visits) == list(range(len(tree)))
    for node in range(len(tree)):
        assert tree.visits(node) == visits[node]
        assert tree.successes(node) == wins[node]
        assert tree.return_sum(node) == rets[node] / 2**32
        assert tree.sources(node) == dict(sorted(models[node].items()))


def _path_nodes(tree: TrajectoryTree, traj: Trajectory) -> set[int]:
    node = 0
    out = {0}
    okey = tree.obs_key(traj.initial_observation)
    for step in traj.steps:
        node = next(
            c
            for c in tree.children(node)
            if tree.action_key(c) == normalize_text(step.action) and tree.obs_key_before(c) == okey
        )
        out.add(node)
        okey = tree.obs_key(step.observation)
    return out


def test_many_models_use_sparse_counts(monkeypatch) -> None:
    trajs = _trajectories(3000, seed=3)
    reference = _saved(build_trees(trajs)["house/0"])
    monkeypatch.setattr(counts_module, "_DENSE_MODELS", 2)
    assert _saved(build_trees(trajs)["house/0"]) == reference
    assert _saved(_build(trajs, 50)) == reference


def test_loaded_tree_keeps_counting(tmp_path) -> None:
    trajs = _trajectories(3000, seed=4)
    reference = _saved(build_trees(trajs)["house/0"])
    first = build_trees(trajs[:1200])["house/0"]
    loaded = TrajectoryTree.load(first.save(tmp_path / "t.json"))
    loaded.extend(trajs[1200:])
    assert _saved(loaded) == reference


def test_models_arriving_one_by_one_past_the_dense_limit(monkeypatch) -> None:
    # per-model counts start in dense columns and move to dicts once a model past the limit goes through a
    # node; reads in between (one-by-one sums) and big batches (numpy sums) must give the counts of a naive
    # pass over the paths
    monkeypatch.setattr(counts_module, "_DENSE_MODELS", 3)
    trajs = _trajectories(3000, seed=5)
    trajs = [
        Trajectory.from_dict(
            {**t.to_dict(), "source": {**t.source.to_dict(), "model": f"m{i * 6 // len(trajs)}"}}
        )
        for i, t in enumerate(trajs)
    ]
    tree = TrajectoryTree("house/0")
    for i in range(0, len(trajs), 500):
        tree.extend(trajs[i : i + 250])  # a numpy pass (more pending steps than _BULK_STEPS)...
        tree.update_statistics()
        for traj in trajs[i + 250 : i + 500]:  # ... then one by one
            tree.add(traj)
            tree.update_statistics()
    canonical = build_trees(trajs)["house/0"]
    assert _saved(tree) == _saved(canonical)
    counts: dict[int, dict[str, int]] = {}
    for t in trajs:
        for node in _path_nodes(canonical, t):
            per = counts.setdefault(node, {})
            per[t.source.model] = per.get(t.source.model, 0) + 1
    assert any(len(per) > 3 for per in counts.values())
    for node, per in counts.items():
        assert canonical.sources(node) == dict(sorted(per.items()))


def _tracked(obj: object) -> int:
    """Objects the garbage collector tracks among those reachable from ``obj`` (``obj`` included)."""
    import gc

    seen: set[int] = set()
    stack = [obj]
    n = 0
    while stack:
        o = stack.pop()
        if id(o) in seen or not gc.is_tracked(o):
            continue
        seen.add(id(o))
        n += 1
        stack.extend(gc.get_referents(o))
    return n


@pytest.mark.slow
def test_a_tree_holds_a_few_objects_for_the_garbage_collector_whatever_its_size() -> None:
    # every full collection walks the tracked objects: a tree must not add one per node (it used to hold
    # a list per node for its per-model and end counts)
    import gc

    sizes = []
    for n in (300, 3000):
        tree = build_trees(_trajectories(n, seed=6))["house/0"]
        tree.update_statistics()
        gc.collect()  # the collector stops tracking tuples and dicts of untracked values
        sizes.append((len(tree), _tracked(tree)))
    (small_nodes, small), (big_nodes, big) = sizes
    assert big_nodes > 3 * small_nodes
    assert big == small


def test_children_and_preorder_of_a_tree_in_insertion_order() -> None:
    # before canonicalize, ids are in insertion order: children() must still come sorted by (action key,
    # observation key) and canonical_order() must be the preorder over them, as a recursive walk gives it
    trajs = _trajectories(2000, seed=7)
    random.Random(7).shuffle(trajs)
    tree = TrajectoryTree("house/0")
    tree.extend(trajs)
    assert not tree.is_canonical
    by_parent: dict[int, list[int]] = {}
    for node in range(1, len(tree)):
        by_parent.setdefault(tree.parent(node), []).append(node)
    for node in range(len(tree)):
        expected = sorted(by_parent.get(node, []), key=lambda c: (tree.action_key(c), tree.obs_key_before(c)))
        assert list(tree.children(node)) == expected
    order: list[int] = []

    def walk(node: int) -> None:
        order.append(node)
        for c in tree.children(node):
            walk(c)

    walk(0)
    assert tree.canonical_order() == order
    saved = _saved(tree)  # canonicalizes
    assert tree.is_canonical and _saved(build_trees(trajs)["house/0"]) == saved
