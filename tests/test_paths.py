"""Best paths without detours: loop erasure and stitching over state keys, verified by replay."""

from __future__ import annotations

from dataclasses import replace

from w2s_agents.search.paths import (
    PathOutcome,
    StateGraph,
    choose_path,
    is_tree_path,
    loop_erase,
    replay_path,
    stitched_path,
)
from w2s_agents.tree import TrajectoryTree, build_trees
from w2s_agents.types import Source, Trajectory

SOURCE = Source(model="check", role="search")


def _nodes_of(tree: TrajectoryTree, traj: Trajectory) -> set[int]:
    """The tree nodes of ``traj``'s path (found by its actions)."""
    node, out = 0, {0}
    for step in traj.steps:
        node = next(c for c in tree.children(node) if tree.action(c) == step.action)
        out.add(node)
    return out


def _actions(tree: TrajectoryTree, nodes: list[int]) -> list[str]:
    return [tree.action(n) for n in nodes[1:]]


def test_a_cycle_is_cut_out_of_a_path(vault_play) -> None:
    play = vault_play
    # east, west, east, east, east: the first two moves go round in a circle back to the hall
    won = play(["go east", "go west", "go east", "go east", "go east"], seed=1, door_closes=9)
    assert won.success
    tree = build_trees([won])["vault/0"]
    path = tree.path(len(tree) - 1)
    assert len(path) == 6
    erased = loop_erase(tree, path)
    assert _actions(tree, erased) == ["go east", "go east", "go east"]
    assert not is_tree_path(tree, erased)  # the kept nodes jump over the cut
    # nested and repeated cycles: hall -> side -> hall -> cellar -> hall -> cellar -> stairs
    t2 = play(["go north", "go south", "go east", "go west", "go east", "go east"], seed=2, door_closes=9)
    tree2 = build_trees([t2])["vault/0"]
    assert _actions(tree2, loop_erase(tree2, tree2.path(len(tree2) - 1))) == ["go east", "go east"]
    # without state keys nothing merges and nothing is cut
    keyless = replace(won, initial_state_key=None, steps=tuple(replace(s, state_key=None) for s in won.steps))
    tree3 = build_trees([keyless])["vault/0"]
    assert loop_erase(tree3, tree3.path(len(tree3) - 1)) == tree3.path(len(tree3) - 1)


def test_two_failed_trajectories_stitch_into_a_win_verified_by_replay(vault_play, vault_game) -> None:
    play, VaultGame = vault_play, vault_game
    # A wastes two moves, then walks east to the vault on move 5: the door has closed, A loses with half the
    # points (for the stairs). B goes straight to the cellar, then wanders back and forth until its step limit.
    a = play(["go north", "go south", "go east", "go east", "go east"], seed=1)
    b = play(["go east", "go west", "go east", "go west"], seed=2)
    assert (a.success, a.end, a.return_) == (False, "lost", 0.5) and (b.success, b.return_) == (False, 0.0)
    tree = build_trees([a, b])["vault/0"]
    graph = StateGraph.build(tree)
    assert graph.merged > 0
    path = stitched_path(tree, graph)
    assert path is not None
    # the best outcome observed (A's half points, ended in the vault) is reached fastest by east, east, east
    assert _actions(tree, path) == ["go east", "go east", "go east"]
    # a prefix of B (its first move) and the suffix of A from the cellar: a path across branches
    assert not is_tree_path(tree, path)
    assert path[1] in _nodes_of(tree, b) and set(path[2:]) <= _nodes_of(tree, a)
    # taken for A's 0.5, the stitched path replays to a win: neither trajectory won, their stitch does
    outcome = replay_path(VaultGame(), tree, path, expected_return=0.5, source=SOURCE)
    assert outcome.verified and outcome.trajectory is not None and outcome.trajectory.success
    assert outcome.trajectory.return_ == 1.0
    assert [s.action for s in outcome.trajectory.steps] == ["go east"] * 3
    assert outcome.trajectory.steps[-1].state_key == "vault"


def test_a_stitched_path_that_does_not_replay_is_dropped(vault_play, vault_game) -> None:
    play, VaultGame = vault_play, vault_game
    a = play(["go east", "go east", "go east"], seed=1)
    assert a.success
    tree = build_trees([a])["vault/0"]
    path = stitched_path(tree)
    assert path is not None and _actions(tree, path) == ["go east"] * 3
    # the same path replayed where the door closes after 2 moves: the outcome it was taken for is not reached
    bad = replay_path(VaultGame(door_closes=2), tree, path, expected_return=1.0, source=SOURCE)
    assert not bad.verified and bad.trajectory is not None and bad.trajectory.end == "lost"
    good = replay_path(VaultGame(), tree, path, expected_return=1.0, source=SOURCE)
    assert good.verified


def test_stitching_finds_the_fewest_moves_to_the_best_outcome(vault_play) -> None:
    play = vault_play
    long_win = play(["go north", "go south", "go east", "go west", "go east", "go east", "go east"], 1, 9)
    short_fail = play(["go east", "go east", "go west"], 2, 9)
    tree = build_trees([long_win, short_fail])["vault/0"]
    path = stitched_path(tree)
    assert path is not None and _actions(tree, path) == ["go east"] * 3
    assert stitched_path(TrajectoryTree("vault/0")) is None  # nothing ended anywhere: no path


def test_steps_without_keys_merge_with_nothing(vault_play) -> None:
    play = vault_play
    t = play(["go east", "go west"], seed=3)
    steps = (t.steps[0], replace(t.steps[1], state_key=None))
    tree = build_trees([replace(t, steps=steps)])["vault/0"]
    graph = StateGraph.build(tree)
    leaf = len(tree) - 1
    assert graph.state[leaf] == f"#{leaf}" and graph.merged == 0
    assert loop_erase(tree, tree.path(leaf)) == tree.path(leaf)
    # a keyless state in the middle of a path keeps its moves out
    steps = (replace(t.steps[0], state_key=None), t.steps[1])
    tree = build_trees([replace(t, steps=steps)])["vault/0"]
    graph = StateGraph.build(tree)
    middle, leaf = tree.path(len(tree) - 1)[1:]
    assert graph.moves(f"#{middle}") == [("go west", graph.state[leaf], leaf)]
    assert graph.moves(graph.state[0]) == [("go east", f"#{middle}", middle)]


def test_choose_path_falls_back_when_a_replay_fails(vault_play, vault_game) -> None:
    play, VaultGame = vault_play, vault_game
    a = play(["go north", "go south", "go east", "go east", "go east"], seed=1)  # lost, 0.5
    b = play(["go east", "go west", "go east", "go west"], seed=2)
    tree = build_trees([a, b])["vault/0"]
    raw = tree.path(max(_nodes_of(tree, a)))  # A's whole path, as the greedy tree path would be

    def replayer(door: int):
        def replay(t: TrajectoryTree, nodes, target: float):
            return replay_path(VaultGame(door), t, nodes, expected_return=target, source=SOURCE)

        return replay

    won = choose_path(tree, raw, mode="stitched", replay=replayer(3))
    assert (won.kind, won.steps, won.raw_steps, won.tried) == ("stitched", 3, 5, ())
    assert won.trajectory is not None and won.trajectory.success
    assert won.nodes[1] in _nodes_of(tree, b)  # it starts on B's branch

    # replays that fail on B's branch: the stitched path is dropped, A's path without its north-south circle
    # (east, east, east on A's own nodes) comes next and verifies
    def not_on_b(t: TrajectoryTree, nodes, target: float) -> PathOutcome:
        if nodes[1] in _nodes_of(tree, b):
            return PathOutcome(None, False)
        return replayer(3)(t, nodes, target)

    erased = choose_path(tree, raw, mode="stitched", replay=not_on_b)
    assert (erased.kind, erased.tried) == ("loop-erased", ("stitched",))
    assert _actions(tree, erased.nodes) == ["go east"] * 3 and set(erased.nodes) <= _nodes_of(tree, a)
    # replays that all fail: the tree path stays, and both tries are counted
    kept = choose_path(tree, raw, mode="stitched", replay=lambda t, nodes, target: PathOutcome(None, False))
    assert (kept.kind, kept.nodes, kept.tried, kept.trajectory) == (
        "tree",
        raw,
        ("stitched", "loop-erased"),
        None,
    )
    assert choose_path(tree, raw, mode="tree", replay=None).nodes == raw
