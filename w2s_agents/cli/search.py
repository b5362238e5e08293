"""``w2s search``: offline MCTS over tree files; best-path SFT rows and TreeDPO pairs as JSONL."""

from __future__ import annotations

import argparse
import json

from w2s_agents.atomic import atomic_write
from w2s_agents.cli.args import check_output_dir, tree_files

__all__ = ["add_commands"]


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Declare ``w2s search``."""
    p = sub.add_parser(
        "search",
        help="MCTS over trees; write values into the trees and best-path SFT rows and pairs as JSONL",
        description="Run the offline MCTS on every tree (files or folders of *.json), store the search "
        "statistics (search_visits, search_value_sum) in the tree files, and write OUT/sft.jsonl (best "
        "paths), OUT/pairs.jsonl (TreeDPO pairs, step and continuation level) and OUT/search.json. Settings: "
        "the keys of SearchConfig (--config YAML, --set KEY=VALUE, or the flags below). Best paths are "
        "loop-erased or stitched over the trees' state keys (search.paths) only with --suite, whose env "
        "replays every shortened path before it becomes a row.",
    )
    p.add_argument("trees", nargs="+", metavar="TREE.json|DIR")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="folder for the datasets")
    p.add_argument("--config", default=None, metavar="YAML", help="SearchConfig values")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    p.add_argument("--iterations", type=int, default=None, help="MCTS simulations per tree")
    p.add_argument("--gamma", type=float, default=None, help="UCB exploration weight")
    p.add_argument("--seed", type=int, default=None, help="seed of the tie-breaking order")
    p.add_argument("--value", default=None, choices=["mcts", "mean", "max", "success"], help="node value")
    p.add_argument("--margin", type=float, default=None, help="smallest value gap of a pair")
    p.add_argument(
        "--suite",
        default=None,
        metavar="SUITE",
        help="the task suite of the trees: its env replays shortened best paths (search.paths); without it the "
        "rows are the greedy tree paths",
    )
    p.add_argument("--max-steps", type=int, default=50, help="step limit of a replayed path (with --suite)")
    p.add_argument(
        "--keep-values",
        action="store_true",
        help="with a value other than mcts, leave the trees' search values as they are (no search)",
    )
    p.add_argument(
        "--trajectories",
        action="append",
        default=[],
        metavar="STORE.jsonl",
        help="also write expert-vs-failed trajectory pairs (ETO) from these files to OUT/expert_pairs.jsonl",
    )
    p.set_defaults(func=_cmd_search)


def _cmd_search(ns: argparse.Namespace) -> int:
    from w2s_agents.config import config_to_dict, load_config
    from w2s_agents.search import (
        SearchConfig,
        env_replayer,
        expert_failure_pairs,
        node_values,
        search_tree,
        tree_rows,
        unique_rows,
        write_rows,
    )
    from w2s_agents.store import iter_trajectories
    from w2s_agents.tree import TrajectoryTree

    overrides = list(ns.set)
    for key in ("iterations", "gamma", "seed", "value", "margin"):
        if getattr(ns, key) is not None:
            overrides.append(f"{key}={getattr(ns, key)}")
    cfg = load_config(SearchConfig, ns.config, overrides)
    out = check_output_dir(ns.out, "-o/--out")
    files = tree_files(ns.trees)
    # every tree is read (and checked) before any is rewritten with its search statistics
    trees = [TrajectoryTree.load(path) for path in files]
    eto = (
        list(
            expert_failure_pairs(
                iter_trajectories(ns.trajectories), margin=cfg.margin, per_task=cfg.pairs_per_node
            )
        )
        if ns.trajectories
        else []
    )
    env = None
    if cfg.paths != "tree" and ns.suite is None:
        print(
            f"w2s: search.paths={cfg.paths} replays shortened paths in the env of --suite; without it the rows are tree paths"
        )
    elif cfg.paths != "tree":
        from w2s_agents.envs.demos import suite_env

        env = suite_env(ns.suite, max_steps=ns.max_steps)
    sft_rows, pair_rows = [], []
    try:
        replay = env_replayer(env) if env is not None else None
        for path, tree in zip(files, trees, strict=True):
            if cfg.value == "mcts" or not ns.keep_values:
                search_tree(tree, cfg)
                tree.save(path)
            data = tree_rows(tree, node_values(tree, cfg.value, cfg.discount), cfg, replay=replay)
            if data.row is not None:
                sft_rows.append(data.row)
            pair_rows.extend(data.pairs)
            choice = data.choice
            shortened = (
                f" ({choice.kind}, {choice.raw_steps} -> {choice.steps} steps)"
                if choice.kind != "tree"
                else ""
            )
            print(
                f"{path}: task {tree.task_id}, {len(tree)} nodes, best path {'kept' if data.row else 'skipped'}"
                f"{shortened}, {len(data.pairs)} pairs"
            )
    finally:
        if env is not None:
            env.close()
    n_sft = write_rows(unique_rows(sft_rows), out / "sft.jsonl")
    n_pairs = write_rows(unique_rows(pair_rows), out / "pairs.jsonl")
    summary = {"trees": len(files), "sft_rows": n_sft, "pair_rows": n_pairs, "config": config_to_dict(cfg)}
    if ns.trajectories:
        summary["expert_pair_rows"] = write_rows(eto, out / "expert_pairs.jsonl")
    with atomic_write(out / "search.json") as fh:
        fh.write(json.dumps(summary, indent=2) + "\n")
    print(
        f"{out}: sft.jsonl {n_sft} rows, pairs.jsonl {n_pairs} rows"
        + (f", expert_pairs.jsonl {summary['expert_pair_rows']} rows" if ns.trajectories else "")
    )
    return 0
