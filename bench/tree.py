"""Benchmark of trajectory trees and offline MCTS against a straightforward baseline, side by side in one run.

Data: synthetic text games (one per task) with ~400-character room descriptions; a biased random "weak agent"
plays 10 steps per episode. Trajectories are written as JSON lines and parsed back, so equal strings are
distinct objects, as when reading a store. Two data sets, each measured in its own section of the same run:

1. repeated room texts: an observation is the room's description, the same text at every visit;
2. distinct observations: the same games and the same choices, but each observation adds the inventory and a
   score/moves line, so that its text differs per state, as in real games (the trees have the same shape).

Measured on each data set:

* build: steps/s merging every trajectory into one tree per task (ours: ``add_trajectories`` and
  ``update_statistics``, every statistic, then separately the canonical renumbering that ``build_trees``
  adds, then the settling of the texts nodes show, which ours does on the first read of a text; baseline:
  Python node objects, children found by a linear scan comparing raw strings, visits and return sum only),
  and the ratio; best of 5 each (``--repeat``), alternating, with the parsed input frozen out of the garbage
  collector (``gc.freeze``). Ours groups the trajectories by task in chunks before merging
  (``add_trajectories``) and pauses the collector while it merges; the baseline takes them in file order with
  the collector on, and is also timed on them grouped by task and with the collector paused, to show what
  each of those alone would give it;
* memory: bytes per node of each tree structure, strings excluded (sizes of every non-string object the
  trees hold, shared objects counted once).

After data set 3, the merge by observation similarity (``tree.merge: similarity``, TF-IDF embedding, xi_sim 0.9)
against the exact merge on data set 2 with a noisy line added to every observation (a clock showing a random
minute, so that the same history reaches different texts), ``--similarity-trajectories`` of them (one task by
default): the time and nodes of each build, and the TF-IDF's share.

On the first data set only:

* MCTS: simulations/s on the tree closest to 10,000 nodes (ours: ``run_mcts``; baseline: node objects with
  the UCB denominator recomputed as the sum of the children's visits at every selection), and the ratio;
* pairs: TreeDPO rows/s (step and continuation level) from the searched trees.

Run ``python bench/tree.py`` (full: 100,000 trajectories per data set) or ``python bench/tree.py --quick``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import sys
import time
import types
from typing import Any

import numpy as np

from w2s_agents.search import (
    StateGraph,
    best_path,
    choose_path,
    node_values,
    replay_path,
    run_mcts,
    search_tree,
    tree_pairs,
)
from w2s_agents.search.mcts import SearchConfig
from w2s_agents.tree import TrajectoryTree, add_trajectories
from w2s_agents.types import Source, Trajectory

WORDS = [
    "old",
    "wooden",
    "dusty",
    "narrow",
    "bright",
    "dark",
    "cold",
    "damp",
    "quiet",
    "large",
    "small",
    "broken",
    "shiny",
    "heavy",
    "red",
    "green",
    "blue",
    "table",
    "chair",
    "shelf",
    "lamp",
    "rug",
    "window",
    "door",
    "chest",
    "bottle",
    "book",
    "key",
    "coin",
    "knife",
    "box",
    "candle",
    "painting",
    "mirror",
    "north",
    "south",
    "east",
    "west",
    "corridor",
    "kitchen",
    "cellar",
    "garden",
    "attic",
    "pantry",
    "hallway",
    "study",
    "bedroom",
    "library",
]
ACTIONS = [
    "go north",
    "go south",
    "go east",
    "go west",
    "take key",
    "take coin",
    "open chest",
    "open door",
    "look",
    "inventory",
    "examine table",
    "examine shelf",
    "put key in box",
    "light candle",
    "read book",
    "drop knife",
    "unlock door with key",
]


def make_games(n_tasks: int, n_states: int, rng: random.Random) -> list[dict[str, Any]]:
    """A random text game per task: states with ~400-char descriptions and 5 actions each."""
    games = []
    for t in range(n_tasks):
        obs = []
        for s in range(n_states):
            words = []
            while sum(len(w) + 1 for w in words) < 380:
                words.append(rng.choice(WORDS))
            obs.append(f"-= Room {s} of game {t} =- You are in a " + " ".join(words) + ".")
        trans = []
        for _s in range(n_states):
            acts = rng.sample(ACTIONS, 5)
            trans.append([(a, rng.randrange(n_states), rng.random()) for a in acts])
        games.append({"task": f"bench-game/train/{t}", "obs": obs, "trans": trans, "goal": n_states - 1})
    return games


ITEMS = {"take key": "a brass key", "take coin": "a gold coin"}  # what the take actions add to the inventory
DROPS = {"put key in box": "a brass key", "drop knife": "a knife"}  # what some actions remove from it


def play(
    game: dict[str, Any],
    seed: int,
    rng: random.Random,
    steps: int = 10,
    distinct: bool = False,
    keys: bool = False,
) -> str:
    """One episode of the biased weak agent as a JSON line of the trajectory format.

    With ``distinct``, each observation is the room's description followed by the inventory and a
    score/moves line, as in real games, so that its text differs per state (the same choices are made for
    the same ``rng`` state either way: only the texts differ). With ``keys``, every step carries the state
    key of :class:`BenchEnv` (room and score), as an env that reports keys gives them."""
    state = 0
    out_steps = []
    reached = 0
    won = False
    carrying = ["a knife"]
    for move in range(1, steps + 1):
        options = game["trans"][state]
        weights = [0.2 + w * w for _, _, w in options]  # preferences of the weak policy
        action, nxt, _ = rng.choices(options, weights)[0]
        state = nxt
        if state % 7 == 0:
            reached += 1
        won = state == game["goal"]
        observation = game["obs"][state]
        if distinct:
            if action in ITEMS and ITEMS[action] not in carrying:
                carrying.append(ITEMS[action])
            elif action in DROPS and DROPS[action] in carrying:
                carrying.remove(DROPS[action])
            observation = (
                f"{observation}\n\nYou are carrying: {', '.join(carrying) or 'nothing'}.\n"
                f"Score: {reached} of 10    Moves: {move}"
            )
        out_steps.append(
            {
                "observation": observation,
                "thought": f"I should {action} because the room suggests it.",
                "action": action,
                "reward": 0.0,
                "score": 0.0,
            }
        )
        if keys:
            out_steps[-1]["state_key"] = f"{state}/{min(reached, 4)}"
        if won:
            break
    ret = 1.0 if won else min(reached, 4) / 5
    record = {
        "schema": "w2s.trajectory/1",
        "task_id": game["task"],
        "env_id": "w2s/Bench-v0",
        "source": {"model": f"weak-{seed % 3}", "role": "weak", "sampler": f"s{seed % 6}", "seed": seed},
        "instruction": "Find the treasure and bring it to the study.",
        "initial_observation": game["obs"][0],
        "steps": out_steps,
        "return": ret,
        "success": won,
        "end": "won" if won else "truncated",
    }
    if keys:
        record["initial_state_key"] = "0/0"
    return json.dumps(record)


# ------------------------------------------------------------------------------------------------ baseline


class BaselineNode:
    """A tree node as in the paper's released code: a Python object with a list of children."""

    def __init__(self, action: str, observation: str, thought: str, parent: BaselineNode | None) -> None:
        self.action = action
        self.observation = observation
        self.thought = thought
        self.parent = parent
        self.children: list[BaselineNode] = []
        self.visits = 0
        self.reward_sum = 0.0
        self.mcts_n = 0
        self.mcts_q = 0.0


def baseline_build(trajs: list[Trajectory]) -> dict[str, BaselineNode]:
    """One tree per task; a child matches when its raw action and observation strings are equal."""
    roots: dict[str, BaselineNode] = {}
    for traj in trajs:
        root = roots.get(traj.task_id)
        if root is None:
            root = roots[traj.task_id] = BaselineNode("", traj.initial_observation, "", None)
        node = root
        node.visits += 1
        node.reward_sum += traj.return_
        for step in traj.steps:
            found = None
            for child in node.children:
                if child.action == step.action and child.observation == step.observation:
                    found = child
                    break
            if found is None:
                found = BaselineNode(step.action, step.observation, step.thought, node)
                node.children.append(found)
            found.visits += 1
            found.reward_sum += traj.return_
            node = found
    return roots


def baseline_mcts(root: BaselineNode, iterations: int, gamma: float = 1.41) -> None:
    """The paper's MCTS on node objects: unvisited first, else UCB with C_M = sum of the children's visits."""
    for _ in range(iterations):
        node = root
        path = [root]
        while node.children:
            unvisited = [c for c in node.children if c.mcts_n == 0]
            if unvisited:
                node = unvisited[0]
            else:
                total = sum(c.mcts_n for c in node.children)
                node = max(
                    node.children,
                    key=lambda c, total=total: (
                        c.mcts_q / c.mcts_n + gamma * math.sqrt(math.log(total) / c.mcts_n)
                    ),
                )
            path.append(node)
        value = node.reward_sum / node.visits
        for n in path:
            n.mcts_n += 1
            n.mcts_q += value


def baseline_reset(root: BaselineNode) -> None:
    """Zero the search statistics of every node."""
    stack = [root]
    while stack:
        node = stack.pop()
        node.mcts_n, node.mcts_q = 0, 0.0
        stack.extend(node.children)


def baseline_count(root: BaselineNode) -> int:
    n, stack = 0, [root]
    while stack:
        node = stack.pop()
        n += 1
        stack.extend(node.children)
    return n


# --------------------------------------------------------------------------------------------------- sizes


def size_without_text(objs: list[Any]) -> int:
    """Bytes of every object reachable from ``objs`` except strings (and code), each counted once."""
    seen: set[int] = set()
    stack = list(objs)
    total = 0
    skip = (str, types.FunctionType, types.BuiltinFunctionType, types.ModuleType, type)
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, skip):
            continue
        total += sys.getsizeof(o)
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)):
            stack.extend(o)
        elif isinstance(o, np.ndarray):
            pass  # getsizeof includes the buffer of an owning array
        elif hasattr(o, "__dict__"):
            stack.append(o.__dict__)
    return total


def baseline_build_grouped(trajs: list[Trajectory]) -> dict[str, BaselineNode]:
    """The baseline given the trajectories grouped by task (as ours groups them), for comparison."""
    groups: dict[str, list[Trajectory]] = {}
    for traj in trajs:
        groups.setdefault(traj.task_id, []).append(traj)
    roots: dict[str, BaselineNode] = {}
    for group in groups.values():
        roots.update(baseline_build(group))
    return roots


def baseline_build_no_gc(trajs: list[Trajectory]) -> dict[str, BaselineNode]:
    """The baseline with the garbage collector paused, as ours pauses it while it merges (for comparison)."""
    was = gc.isenabled()
    gc.disable()
    try:
        return baseline_build(trajs)
    finally:
        if was:
            gc.enable()


def add_all(trajs: list[Trajectory]) -> dict[str, TrajectoryTree]:
    """Merge every trajectory into its task's tree (node ids in insertion order), statistics summed."""
    trees = add_trajectories(trajs)  # grouped by task in chunks, then merged tree by tree
    for tree in trees.values():
        tree.update_statistics()  # sum the statistics that add() defers, inside the timed build
    return trees


def machine() -> str:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} cores (nproc), CPU {cpu}, Python {platform.python_version()}, numpy {np.__version__}"


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def generate(
    n_traj: int, per_task: int, seed: int, distinct: bool, keys: bool = False
) -> tuple[list[Trajectory], int, list[dict[str, Any]]]:
    """The data set: ``n_traj`` trajectories written as JSON lines and parsed back; returns them, the steps and
    the games."""
    t0 = time.perf_counter()
    rng = random.Random(seed)
    games = make_games(max(1, n_traj // per_task), 60, rng)
    lines = [play(games[i % len(games)], i, rng, distinct=distinct, keys=keys) for i in range(n_traj)]
    trajs = [Trajectory.from_dict(json.loads(line)) for line in lines]
    del lines
    steps = sum(t.num_steps for t in trajs)
    obs = [s.observation for t in trajs for s in t.steps]
    print(
        f"data: {n_traj:,} trajectories, {steps:,} steps, {len(games)} tasks, mean observation "
        f"{np.mean([len(o) for o in obs[:10_000]]):.0f} chars, {len(set(obs)):,} distinct observation texts "
        f"(generated and parsed in {time.perf_counter() - t0:.1f} s)"
    )
    return trajs, steps, games


def bench_build(
    trajs: list[Trajectory], steps: int, repeat: int
) -> tuple[dict[str, TrajectoryTree], dict[str, BaselineNode], float]:
    """Time both builds side by side (best of ``repeat`` each, alternating) and print the build lines."""
    t_base = t_group = t_nogc = t_add = t_canon = t_text = math.inf
    trees: dict[str, TrajectoryTree] = {}
    for _ in range(repeat):
        base_roots = trees = None
        gc.collect()
        base_roots, t = timed(baseline_build, trajs)
        t_base = min(t_base, t)
        base_roots = None
        gc.collect()
        base_roots, t = timed(baseline_build_grouped, trajs)
        t_group = min(t_group, t)
        base_roots = None
        gc.collect()
        base_roots, t = timed(baseline_build_no_gc, trajs)
        t_nogc = min(t_nogc, t)
        base_roots = None
        gc.collect()
        trees, t = timed(add_all, trajs)
        _, tc = timed(lambda trees=trees: [t.canonicalize() for t in trees.values()])
        # the texts a node shows (and the keys they come from) are settled on the first read of a text
        _, tt = timed(lambda trees=trees: [t.observation(0) for t in trees.values()])
        if t + tc < t_add + t_canon:
            t_add, t_canon, t_text = t, tc, tt
    gc.collect()
    base_roots = baseline_build(trajs)
    n_nodes = sum(len(t) for t in trees.values())
    n_base = sum(baseline_count(r) for r in base_roots.values())
    print(
        f"build   ours {steps / t_add:>12,.0f} steps/s  baseline {steps / t_base:>12,.0f} steps/s  "
        f"ratio {t_base / t_add:5.2f}x   (merge + every statistic; {n_nodes:,} nodes; baseline {n_base:,})"
    )
    print(
        f"        baseline given the trajectories grouped by task {steps / t_group:>12,.0f} steps/s   "
        f"ratio {t_group / t_add:5.2f}x"
    )
    print(
        f"        baseline with the garbage collector paused      {steps / t_nogc:>12,.0f} steps/s   "
        f"ratio {t_nogc / t_add:5.2f}x"
    )
    t_build = t_add + t_canon
    print(
        f"        ours {steps / t_build:>12,.0f} steps/s  with canonical node ids (+{t_canon:.2f} s)   "
        f"ratio {t_base / t_build:5.2f}x"
    )
    t_build += t_text
    print(
        f"        ours {steps / t_build:>12,.0f} steps/s  and the texts shown settled (+{t_text:.2f} s)   "
        f"ratio {t_base / t_build:5.2f}x"
    )
    ours_bytes = size_without_text(list(trees.values()))
    base_bytes = size_without_text(list(base_roots.values()))
    print(
        f"memory  ours {ours_bytes / n_nodes:>8.0f} bytes/node     baseline {base_bytes / n_base:>8.0f} bytes/node "
        "(strings excluded; ours as built, texts settled)"
    )
    return trees, base_roots, t_build


def bench_search(trees: dict[str, TrajectoryTree], base_roots: dict[str, BaselineNode], sims: int) -> None:
    """Time MCTS on the tree closest to 10,000 nodes against the baseline's, then TreeDPO pair extraction."""
    n_nodes = sum(len(t) for t in trees.values())
    # -- MCTS on the tree closest to 10,000 nodes
    task = min(trees, key=lambda k: abs(len(trees[k]) - 10_000))
    tree: TrajectoryTree = trees[task]
    root = base_roots[task]
    for iters in (1000, sims):
        t_o = t_b = math.inf
        for _ in range(3):  # best of 3 for both, same conditions
            gc.collect()
            result, t = timed(run_mcts, tree, iters, 1.41, seed=0)
            t_o = min(t_o, t)
            baseline_reset(root)
            gc.collect()
            _, t = timed(baseline_mcts, root, iters)
            t_b = min(t_b, t)
        print(
            f"mcts    ours {iters / t_o:>12,.0f} sims/s   baseline {iters / t_b:>12,.0f} sims/s   "
            f"ratio {t_b / t_o:5.2f}x   ({iters:,} simulations, tree of {len(tree):,} nodes, "
            f"{tree.summary().branch_points:,} branch points; best of 3)"
        )
    ours_path = [tree.action(n) for n in best_path(tree, result.values())]
    base_path = []
    node = root
    while node.children:
        node = max(node.children, key=lambda c: c.mcts_q / c.mcts_n if c.mcts_n else -1.0)
        base_path.append(node.action)
    print(f"        best paths after {sims:,} simulations agree: {ours_path[1:] == base_path}")

    # -- pairs
    cfg = SearchConfig()
    for t in trees.values():
        search_tree(t, cfg)
    gc.collect()
    t0 = time.perf_counter()
    rows = 0
    for t in trees.values():
        rows += len(tree_pairs(t, node_values(t, "mcts"), margin=cfg.margin, per_node=cfg.pairs_per_node))
    t_pairs = time.perf_counter() - t0
    print(f"pairs   ours {rows / t_pairs:>12,.0f} rows/s   ({rows:,} rows from {len(trees)} trees)")
    ours_bytes = size_without_text(list(trees.values()))
    print(
        f"memory  ours {ours_bytes / n_nodes:>8.0f} bytes/node after search (with the children lists "
        "and search statistics)"
    )


class BenchEnv:
    """A bench game as an env: the transitions of :func:`make_games`, the return of :func:`play` and its keys."""

    def __init__(self, game: dict[str, Any]) -> None:
        self.game = game
        self.state = self.reached = 0

    def _info(self) -> dict[str, Any]:
        won = self.state == self.game["goal"]
        score = 1.0 if won else min(self.reached, 4) / 5
        return {
            "score": score,
            "won": won,
            "lost": False,
            "state_key": f"{self.state}/{min(self.reached, 4)}",
        }

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[str, dict]:
        self.state = self.reached = 0
        return self.game["obs"][0], self._info()

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        moves = {a: nxt for a, nxt, _ in self.game["trans"][self.state]}
        if action in moves:
            self.state = moves[action]
            self.reached += self.state % 7 == 0
        info = self._info()
        return self.game["obs"][self.state], 0.0, info["won"], False, info


def bench_paths(
    trees: dict[str, TrajectoryTree], games: dict[str, dict[str, Any]], t_build: float, repeat: int = 3
) -> None:
    """Time the state graph and the replay of every tree's stitched best path against the build and search.

    Each part is timed ``repeat`` times and the best counts, as for the build it is compared with."""
    cfg = SearchConfig(iterations=1000)
    source = Source(model="replay", role="search")
    best: dict[str, float] = {}
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        for tree in trees.values():
            search_tree(tree, cfg)
        t_search = time.perf_counter() - t0
        t_graph = t_choose = t_replay = 0.0
        kinds: dict[str, int] = {}
        before = after = dropped = 0
        for task, tree in sorted(trees.items()):
            env = BenchEnv(games[task])
            raw = best_path(tree, node_values(tree, "mcts"))
            t0 = time.perf_counter()
            graph = StateGraph.build(tree)
            t1 = time.perf_counter()
            spent = [0.0]

            def replay(tr, nodes, target, env=env, spent=spent):  # type: ignore[no-untyped-def]
                s0 = time.perf_counter()
                out = replay_path(env, tr, nodes, expected_return=target, source=source)
                spent[0] += time.perf_counter() - s0
                return out

            choice = choose_path(tree, raw, mode="stitched", replay=replay, graph=graph)
            t2 = time.perf_counter()
            t_graph += t1 - t0
            t_replay += spent[0]
            t_choose += t2 - t1 - spent[0]
            kinds[choice.kind] = kinds.get(choice.kind, 0) + 1
            before += choice.raw_steps
            after += choice.steps
            dropped += len(choice.tried)
        for name, t in (("search", t_search), ("graph", t_graph), ("choose", t_choose), ("replay", t_replay)):
            best[name] = min(best.get(name, math.inf), t)
    n = len(trees)
    base = t_build + best["search"]
    extra = best["graph"] + best["choose"] + best["replay"]
    print(
        f"paths   state graph {best['graph']:.2f} s, stitched paths and loop erasure {best['choose']:.2f} s, "
        f"replays {best['replay']:.2f} s for {n} trees: {100 * extra / base:.1f}% of the build and search "
        f"({t_build:.2f} s + {best['search']:.2f} s for {cfg.iterations} simulations a tree; each best of "
        f"{repeat})   target < 10%"
    )
    print(
        f"        best paths: {kinds}; mean length {before / n:.2f} -> {after / n:.2f} actions; "
        f"{dropped} shortened paths dropped by their replay"
    )


def freeze_input(freeze: bool) -> None:
    """Move the objects alive now (the parsed input) out of the garbage collector's generations."""
    gc.unfreeze()
    gc.collect()
    if freeze:
        gc.freeze()
    print(f"        parsed input {'frozen out of' if freeze else 'left in'} the garbage collector")


def bench_similarity(n_traj: int, per_task: int, seed: int) -> None:
    """Time the exact and the similarity build of data set 2 with a random clock line in every observation."""
    import dataclasses

    from w2s_agents.tree import SimilarityMerge, TfidfEmbedder, build_trees

    trajs, steps, _ = generate(n_traj, per_task, seed, distinct=True)
    rng = random.Random(seed)
    trajs = [
        dataclasses.replace(
            t,
            steps=tuple(
                dataclasses.replace(
                    s, observation=f"{s.observation}\nThe clock shows 10:{rng.randrange(60):02d}."
                )
                for s in t.steps
            ),
        )
        for t in trajs
    ]
    timed_embed = [0, 0.0]

    class TimedTfidf(TfidfEmbedder):
        def embed(self, texts):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            out = super().embed(texts)
            timed_embed[0] += len(texts)
            timed_embed[1] += time.perf_counter() - t0
            return out

    gc.collect()
    exact, t_exact = timed(build_trees, trajs)
    gc.collect()
    sim, t_sim = timed(build_trees, trajs, similarity=SimilarityMerge(0.9, TimedTfidf()))
    print(
        f"similarity merge  exact {steps / t_exact:>10,.0f} steps/s ({sum(map(len, exact.values())):,} nodes)  "
        f"similarity {steps / t_sim:>10,.0f} steps/s ({sum(map(len, sim.values())):,} nodes)  "
        f"{t_sim / t_exact:5.1f}x the time; TF-IDF of {timed_embed[0]:,} texts {timed_embed[1]:.2f} s"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small run (10,000 trajectories per data set)")
    ap.add_argument(
        "--trajectories", type=int, default=None, help="trajectories per data set (default 100,000)"
    )
    ap.add_argument("--per-task", type=int, default=2000, help="trajectories per task")
    ap.add_argument("--simulations", type=int, default=None, help="MCTS simulations timed (default 20,000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--similarity-trajectories", type=int, default=2000, help="trajectories of the similarity-merge line"
    )
    ap.add_argument("--similarity-only", action="store_true", help="only the similarity-merge line")
    ap.add_argument("--repeat", type=int, default=5, help="builds timed per side (the best counts)")
    ap.add_argument(
        "--no-freeze",
        action="store_true",
        help="leave the parsed input in the garbage collector's generations during the builds",
    )
    args = ap.parse_args(argv)
    n_traj = args.trajectories or (10_000 if args.quick else 100_000)
    sims = args.simulations or (5_000 if args.quick else 20_000)
    per_task = min(args.per_task, n_traj)

    print(f"machine: {machine()}")
    if args.similarity_only:
        bench_similarity(args.similarity_trajectories, per_task, args.seed)
        return 0
    print("== data set 1: repeated room texts (a room's description is the same text at every visit)")
    trajs, steps, _ = generate(n_traj, per_task, args.seed, distinct=False)
    freeze_input(not args.no_freeze)
    trees, base_roots, _ = bench_build(trajs, steps, args.repeat)
    bench_search(trees, base_roots, sims)
    del trajs, trees, base_roots

    print(
        "== data set 2: distinct observations (the same games and choices; each observation adds the "
        "inventory and a score/moves line, so its text differs per state)"
    )
    trajs, steps, _ = generate(n_traj, per_task, args.seed, distinct=True)
    freeze_input(not args.no_freeze)
    bench_build(trajs, steps, args.repeat)
    del trajs

    print(
        "== data set 3: data set 2 with state keys (every step names its room and score, as envs that report "
        "keys do): the build, then best paths over the state graph, replayed in the game"
    )
    trajs, steps, games = generate(n_traj, per_task, args.seed, distinct=True, keys=True)
    freeze_input(not args.no_freeze)
    trees, _, t_build = bench_build(trajs, steps, args.repeat)
    bench_paths(trees, {g["task"]: g for g in games}, t_build)
    del trajs, trees

    print(
        "== data set 2 with a random clock line in every observation: the merge by observation similarity "
        "(TF-IDF, xi_sim 0.9) and the exact merge"
    )
    bench_similarity(args.similarity_trajectories, per_task, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
