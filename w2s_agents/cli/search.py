"""``w2s search``: offline MCTS over tree files; best-path SFT rows and TreeDPO pairs as JSONL.

``w2s search --online`` instead grows the trees in the env by PUCT with an agent's prior: the pipeline's
``expand`` stage (:func:`w2s_agents.pipeline.stages.expand.expand_tree_files`) on the given tree files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from w2s_agents.atomic import atomic_write
from w2s_agents.cli.args import check_output_dir, tree_files
from w2s_agents.errors import W2SError

if TYPE_CHECKING:
    from w2s_agents.pipeline.experiment import ExperimentConfig

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
        "replays every shortened path before it becomes a row. With --online, the trees are instead grown in the "
        "env (the pipeline's expand stage): see --online.",
    )
    p.add_argument("trees", nargs="+", metavar="TREE.json|DIR")
    p.add_argument(
        "-o",
        "--out",
        required=True,
        metavar="DIR",
        help="folder for the datasets (with --online: for the grown trees, OUT/trees/*.json)",
    )
    p.add_argument(
        "--online",
        action="store_true",
        help="grow the trees online instead: PUCT episodes played in the env of tasks.suite with the agent "
        "of --model as the prior, as the pipeline's expand stage does; --config is then an experiment config "
        "(its tasks, agent, expand and run.seed sections are used) and --set takes its keys (expand.c_puct=2); "
        "the input files are only read, the grown trees go to OUT/trees/, and a stopped or repeated call "
        "skips the trees already grown (OUT/stats/)",
    )
    p.add_argument(
        "--model",
        default=None,
        metavar="DIR",
        help="with --online: local model folder of the prior's agent (the pipeline uses the weak SFT agent)",
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="YAML",
        help="SearchConfig values (with --online: an experiment config)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    p.add_argument(
        "--iterations",
        type=int,
        default=None,
        help="MCTS simulations per tree (with --online: PUCT episodes per tree, expand.iterations)",
    )
    p.add_argument("--gamma", type=float, default=None, help="UCB exploration weight")
    p.add_argument(
        "--seed", type=int, default=None, help="seed of the tie-breaking order (with --online: run.seed)"
    )
    p.add_argument("--value", default=None, choices=["mcts", "mean", "max", "success"], help="node value")
    p.add_argument("--margin", type=float, default=None, help="smallest value gap of a pair")
    p.add_argument(
        "--suite",
        default=None,
        metavar="SUITE",
        help="the task suite of the trees: its env replays shortened best paths (search.paths); without it the "
        "rows are the greedy tree paths (with --online: tasks.suite, whose env plays the episodes)",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="step limit of a replayed path (with --suite; default 50); with --online: explore.max_steps, the "
        "longest episode (default: twice tasks.max_steps)",
    )
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
    if ns.online:
        return _cmd_online(ns)
    if ns.model is not None:
        raise W2SError("--model is the prior of online expansion; it goes with --online")
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

        env = suite_env(ns.suite, max_steps=50 if ns.max_steps is None else ns.max_steps)
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


# ------------------------------------------------------------------------------------------- online

_ONLINE_SCHEMA = "w2s.online/1"
"""Schema of ``OUT/online.json``, the settings a ``w2s search --online`` folder was grown with."""

_OFFLINE_ONLY = ("gamma", "value", "margin", "keep_values", "trajectories")
"""Options of the offline MCTS that online expansion does not take."""


def _cmd_online(ns: argparse.Namespace) -> int:
    """``w2s search --online``: the pipeline's expand stage on the given tree files, into ``OUT``."""
    from w2s_agents.pipeline.experiment import load_experiment
    from w2s_agents.pipeline.stage_io import read_json, write_json
    from w2s_agents.pipeline.stages.expand import expand_tree_files

    given = [f"--{k.replace('_', '-')}" for k in _OFFLINE_ONLY if getattr(ns, k) not in (None, False, [])]
    if given:
        raise W2SError(
            f"{', '.join(given)}: offline MCTS options, not taken with --online (its settings are the expand "
            "section: --set expand.KEY=VALUE)"
        )
    if ns.model is None:
        raise W2SError(
            "--online needs --model DIR: the local model folder of the agent whose prior guides PUCT"
        )
    model = Path(ns.model)
    if not model.is_dir():
        raise W2SError(f"--model {model}: not a local model folder")
    overrides = list(ns.set)
    for flag, key in (
        ("iterations", "expand.iterations"),
        ("seed", "run.seed"),
        ("suite", "tasks.suite"),
        ("max_steps", "explore.max_steps"),
    ):
        if getattr(ns, flag) is not None:
            overrides.append(f"{key}={getattr(ns, flag)}")
    cfg = load_experiment(ns.config, overrides)
    if cfg.expand.iterations == 0:
        raise W2SError(
            "expand.iterations is 0, so no tree would grow: give --iterations N (PUCT episodes per tree)"
        )
    out = check_output_dir(ns.out, "-o/--out")
    files = tree_files(ns.trees)
    settings = _online_settings(cfg, model, files, out)
    record = out / "online.json"
    if any((out / "stats").glob("*.json")):  # trees grown before, which are skipped: same settings only
        _check_same_settings(record, settings, out)
    write_json(record, settings)
    if cfg.run.threads:
        import torch

        torch.set_num_threads(cfg.run.threads)
    skipped = sum(1 for f in files if (out / "stats" / f.name).is_file())
    totals = expand_tree_files(cfg, model, files, out, cfg.run.seed)
    for f in files:
        stats = read_json(out / "stats" / f.name)
        print(
            f"{out / 'trees' / f.name}: task {stats['task_id']}, {stats['iterations']} episodes, "
            f"{stats['new_nodes']} new nodes, {stats['successes']} won"
        )
    print(
        f"{out}: {len(files)} trees ({skipped} grown before), {totals['iterations']} episodes, "
        f"{totals['env_steps']} env steps, {totals['new_nodes']} new nodes, {totals['successes']} won; "
        f"search them with: w2s search {out / 'trees'} -o DIR"
    )
    return 0


def _online_settings(cfg: ExperimentConfig, model: Path, files: list[Path], out: Path) -> dict[str, Any]:
    """What ``OUT/online.json`` records (JSON values): the settings, the model and the inputs' hashes.

    Reads and checks every input first. Raises W2SError: two inputs share a name (the grown trees keep their
    inputs' names), an input lies inside ``out``, or a tree's env is not the one ``tasks.suite`` plays.
    """
    import hashlib

    from w2s_agents.config import config_to_dict
    from w2s_agents.envs.suites import get_suite
    from w2s_agents.tree import TrajectoryTree

    names: dict[str, Path] = {}
    for f in files:
        if f.name in names:
            raise W2SError(
                f"{names[f.name]} and {f}: two trees named {f.name}; the grown trees are named as their inputs"
            )
        if out.resolve() in f.resolve().parents:
            raise W2SError(f"{f}: an input inside -o/--out {out}; grow into another folder")
        names[f.name] = f
    env_id = get_suite(cfg.tasks.suite).env_id
    for f in files:
        tree = TrajectoryTree.load(f)
        if tree.env_id and tree.env_id != env_id:
            raise W2SError(
                f"{f}: a tree of env {tree.env_id}, but tasks.suite={cfg.tasks.suite} plays {env_id} (set --suite)"
            )
    settings = {
        "schema": _ONLINE_SCHEMA,
        "model": str(model.resolve()),
        "seed": cfg.run.seed,
        "device": cfg.agent_device,
        "dtype": cfg.agent_dtype,
        "tasks": {
            "suite": cfg.tasks.suite,
            "max_steps": cfg.explore_max_steps,  # the online episodes' limit
            "env_kwargs": cfg.tasks.env_kwargs,
        },
        "agent": config_to_dict(cfg.agent),
        "expand": config_to_dict(cfg.expand),
        "inputs": {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files},
    }
    return json.loads(json.dumps(settings, default=str))  # as the file holds them


def _check_same_settings(record: Path, settings: dict[str, Any], out: Path) -> None:
    """Raise W2SError unless ``record`` holds ``settings``: the trees grown in ``out`` are skipped, which is
    right only when they were grown from the same inputs with the same settings."""
    from w2s_agents.pipeline.stage_io import read_json

    try:
        old = read_json(record)
    except (OSError, ValueError):
        old = None
    if not isinstance(old, dict):
        raise W2SError(
            f"{record}: missing or unreadable, so the trees grown in {out} cannot be resumed; grow into "
            "another folder"
        )
    if old != settings:
        keys = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
        raise W2SError(
            f"{out}: trees grown with other settings ({', '.join(keys)} differ from {record}); grow into "
            "another folder or give the same ones"
        )
