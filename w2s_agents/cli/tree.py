"""``w2s tree``: build trajectory trees from trajectory files, summarise tree files."""

from __future__ import annotations

import argparse
import json

from w2s_agents.cli.args import check_output_dir, tree_files
from w2s_agents.errors import W2SError

__all__ = ["add_commands"]


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Declare ``w2s tree build|summary``."""
    p_tree = sub.add_parser("tree", help="build and inspect trajectory trees")
    tree_sub = p_tree.add_subparsers(dest="tree_command", metavar="SUBCOMMAND", required=True)
    p = tree_sub.add_parser(
        "build",
        help="merge trajectory files into one tree per task (DIR/<task>.json)",
        description="Merge the trajectories of one or more store files into one trajectory tree per task and "
        "save each as versioned node-link JSON in DIR.",
    )
    p.add_argument("files", nargs="+", metavar="STORE.jsonl")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="folder for the tree files")
    p.add_argument("--task", action="append", default=[], metavar="ID", help="only this task (repeatable)")
    p.set_defaults(func=_cmd_tree_build)
    p = tree_sub.add_parser("summary", help="nodes, depth, leaves, outcomes and branching of tree files")
    p.add_argument("trees", nargs="+", metavar="TREE.json|DIR")
    p.add_argument("--json", action="store_true", help="one JSON object per tree")
    p.set_defaults(func=_cmd_tree_summary)


def _cmd_tree_build(ns: argparse.Namespace) -> int:
    from w2s_agents.store import iter_trajectories
    from w2s_agents.tree import build_trees, tree_filename

    out = check_output_dir(ns.out, "-o/--out")
    wanted = set(ns.task)
    trajs = (t for t in iter_trajectories(ns.files) if not wanted or t.task_id in wanted)
    trees = build_trees(trajs)
    if not trees:
        raise W2SError(
            "no trajectories to build trees from" + (f" for tasks {sorted(wanted)}" if wanted else "")
        )
    for task_id, tree in trees.items():
        path = tree.save(out / tree_filename(task_id))
        s = tree.summary()
        print(
            f"{path}: task {task_id}, {s.nodes} nodes, {s.trajectories} trajectories "
            f"({s.successes} won), depth {s.depth}, {s.branch_points} branch points"
        )
    return 0


def _cmd_tree_summary(ns: argparse.Namespace) -> int:
    from w2s_agents.tree import TrajectoryTree

    for name in tree_files(ns.trees):
        s = TrajectoryTree.load(name).summary()
        if ns.json:
            print(json.dumps({"file": str(name), **s.to_dict()}))
            continue
        print(f"{name}: task {s.task_id}")
        print(f"  nodes {s.nodes}  leaves {s.leaves}  depth {s.depth}  branch points {s.branch_points}")
        print(f"  branching mean {s.branching_mean:.2f}  max {s.branching_max}")
        print(
            f"  trajectories {s.trajectories}  successes {s.successes}  failures {s.failures}  "
            f"mean return {s.mean_return:.3f}"
        )
        print(f"  sources {dict(s.sources)}")
    return 0
