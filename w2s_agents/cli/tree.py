"""``w2s tree``: build trajectory trees from trajectory files, summarise tree files."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from w2s_agents.cli.args import check_output_dir, tree_files
from w2s_agents.errors import ConfigError, W2SError

if TYPE_CHECKING:
    from w2s_agents.pipeline.experiment import TreeConfig

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
    p.add_argument(
        "--merge",
        choices=("exact", "similarity"),
        default="exact",
        help="exact (default): a step joins a child with the same normalised action and observation acted on; "
        "similarity: the same action and an observation whose embedding has cosine >= --xi-sim",
    )
    p.add_argument(
        "--xi-sim",
        type=float,
        default=None,
        metavar="X",
        help="similarity merge: least cosine of observations that merge, in (0, 1] (default 0.9)",
    )
    p.add_argument(
        "--embedder",
        default=None,
        metavar="DIR",
        help="similarity merge: a local sentence-embedding model folder (default: TF-IDF over character "
        "3- to 5-grams)",
    )
    p.set_defaults(func=_cmd_tree_build)
    p = tree_sub.add_parser("summary", help="nodes, depth, leaves, outcomes and branching of tree files")
    p.add_argument("trees", nargs="+", metavar="TREE.json|DIR")
    p.add_argument("--json", action="store_true", help="one JSON object per tree")
    p.set_defaults(func=_cmd_tree_summary)


def _tree_config(ns: argparse.Namespace) -> TreeConfig:
    """The ``tree`` config section of ``--merge`` / ``--xi-sim`` / ``--embedder`` (checked before any work)."""
    from w2s_agents.pipeline.experiment import TreeConfig

    if ns.merge == "exact" and (ns.xi_sim is not None or ns.embedder is not None):
        raise W2SError("--xi-sim and --embedder set the similarity merge: add --merge similarity")
    xi_sim = 0.9 if ns.xi_sim is None else ns.xi_sim
    try:
        return TreeConfig(merge=ns.merge, xi_sim=xi_sim, embedder=ns.embedder)
    except ConfigError as exc:
        raise W2SError(f"--xi-sim {xi_sim}: must be a number in (0, 1]") from exc


def _cmd_tree_build(ns: argparse.Namespace) -> int:
    from w2s_agents.pipeline.tree_merge import merge_trees
    from w2s_agents.store import iter_trajectories
    from w2s_agents.tree import tree_filename

    tree_cfg = _tree_config(ns)
    out = check_output_dir(ns.out, "-o/--out")
    wanted = set(ns.task)
    trajs = (t for t in iter_trajectories(ns.files) if not wanted or t.task_id in wanted)
    merged = merge_trees(trajs, tree_cfg)
    trees = merged.trees
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
            + (f"; {merged.nodes_exact[task_id]} nodes by the exact merge" if merged.nodes_exact else "")
        )
    if merged.info:
        print(
            f"similarity merge (xi_sim {merged.info['xi_sim']}, {merged.info['embedder']}): "
            f"{merged.info['nodes_similarity']} nodes in {len(trees)} trees; the exact merge gives "
            f"{merged.info['nodes_exact']}"
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
