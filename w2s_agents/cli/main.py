"""The ``w2s`` command line.

Only commands that work are listed by ``w2s --help``. Every error caused by input (a bad config key, a
malformed file, a model path that is not a local directory) is printed as one line ``w2s: error: ...`` with
exit status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from w2s_agents import __version__
from w2s_agents.errors import W2SError

__all__ = ["main"]


def _split_config_args(args: Sequence[str]) -> tuple[str | None, list[str]]:
    """Split positional arguments into an optional config path and ``key=value`` overrides."""
    paths = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    if len(paths) > 1:
        raise W2SError(f"expected at most one config file, got {', '.join(paths)} (overrides are KEY=VALUE)")
    return (paths[0] if paths else None), overrides


# ------------------------------------------------------------------------------------------- config


def _cmd_config_show(ns: argparse.Namespace) -> int:
    from w2s_agents.config import config_hash, dump_config
    from w2s_agents.pipeline.experiment import load_experiment

    path, overrides = _split_config_args(ns.args)
    cfg = load_experiment(path, overrides)
    print(f"# {path or 'embedded default config'} (hash {config_hash(cfg)})")
    print(dump_config(cfg), end="")
    return 0


def _cmd_config_keys(ns: argparse.Namespace) -> int:
    from w2s_agents.config import describe_config
    from w2s_agents.pipeline.experiment import ExperimentConfig

    rows = describe_config(ExperimentConfig)
    for key, type_name, default, help_text in rows:
        if ns.grep and ns.grep not in key:
            continue
        print(f"{key}  ({type_name}, default {json.dumps(default)})\n    {help_text}")
    return 0


# ------------------------------------------------------------------------------------------- run


def _cmd_run(ns: argparse.Namespace) -> int:
    from w2s_agents.pipeline.experiment import load_experiment
    from w2s_agents.pipeline import run_pipeline, stage_names

    path, overrides = _split_config_args(ns.args)
    cfg = load_experiment(path, overrides)
    if ns.list_stages:
        print("\n".join(stage_names(cfg)))
        return 0
    result = run_pipeline(cfg, from_stage=ns.from_stage, until=ns.until)
    if not result.metrics:
        print(f"{result.run_dir}: stopped after stage {ns.until}")
        return 0
    from w2s_agents.pipeline.report import MODEL_LABELS, interval

    print(f"{result.run_dir}: report {result.report}")
    for name, m in result.metrics["models"].items():
        label = MODEL_LABELS.get(name, name)
        print(
            f"  {label:<18} return {interval(m['return']).format(3)}  success {interval(m['success']).format(3)}"
        )
    for name, pgr in result.metrics.get("pgr", {}).items():
        print(f"  PGR {MODEL_LABELS.get(name, name):<14} {interval(pgr).format(2)}")
    return 0


def _cmd_report(ns: argparse.Namespace) -> int:
    from w2s_agents.pipeline.report import write_report

    run_dir = Path(ns.run_dir)
    metrics_file = run_dir / "metrics.json"
    try:
        metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise W2SError(f"{metrics_file}: no metrics (has `w2s run` finished its eval stage?)") from None
    except json.JSONDecodeError as exc:
        raise W2SError(f"{metrics_file}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    print(write_report(metrics, run_dir, plots=not ns.no_plots))
    return 0


# ------------------------------------------------------------------------------------------- model


def _texts_from_files(text_files: Sequence[str], trajectory_files: Sequence[str]) -> list[str]:
    from w2s_agents.store import iter_trajectories

    texts: list[str] = []
    for name in text_files:
        p = Path(name)
        try:
            texts.extend(line for line in p.read_text(encoding="utf-8").splitlines() if line.strip())
        except (OSError, UnicodeDecodeError) as exc:
            raise W2SError(f"cannot read text file {p}: {exc}") from None
    for traj in iter_trajectories(trajectory_files):
        texts.extend([traj.instruction, traj.initial_observation])
        for step in traj.steps:
            texts.extend(t for t in (step.thought, step.action, step.observation) if t)
    if not texts:
        raise W2SError("no training text: give --text FILE and/or --trajectories FILE with some content")
    return texts


def _cmd_model_tiny(ns: argparse.Namespace) -> int:
    from w2s_agents.agents.models import create_tiny_model
    from w2s_agents.seeding import seed_everything

    texts = _texts_from_files(ns.text, ns.trajectories)
    seed_everything(ns.seed)
    try:
        out = create_tiny_model(
            ns.out_dir,
            texts,
            preset=ns.preset,
            vocab_size=ns.vocab_size,
            seed=ns.seed,
            overwrite=ns.overwrite,
        )
    except FileExistsError as exc:
        raise W2SError(f"{exc}; use --overwrite") from None
    meta = json.loads((out / "w2s_model.json").read_text(encoding="utf-8"))
    print(
        f"{out}: tiny {meta['preset']} model, {meta['parameters']:,} parameters, vocabulary {meta['vocab_size']}"
    )
    return 0


def _cmd_model_info(ns: argparse.Namespace) -> int:
    from w2s_agents.agents.models import count_parameters, load_model

    lm = load_model(ns.path, device=ns.device, dtype=ns.dtype)
    cfg = lm.model.config
    print(f"path        {lm.path}")
    print(f"class       {type(lm.model).__name__} ({cfg.model_type})")
    print(f"parameters  {count_parameters(lm.model):,}")
    print(f"vocabulary  {len(lm.tokenizer)}")
    print(f"context     {getattr(cfg, 'max_position_embeddings', 'unknown')}")
    print(f"device      {lm.device}  dtype {str(lm.dtype).removeprefix('torch.')}")
    print(
        f"tokens      bos={lm.tokenizer.bos_token!r} eos={lm.tokenizer.eos_token!r} pad={lm.tokenizer.pad_token!r}"
    )
    print(f"chat        {'template present' if lm.tokenizer.chat_template else 'no chat template'}")
    return 0


# ------------------------------------------------------------------------------------------- envs


def _env_kwargs(ns: argparse.Namespace) -> dict:
    """Constructor arguments from the command line: only those given, so plugin envs need not accept them."""
    kwargs: dict = {"max_steps": ns.max_steps}
    if ns.no_admissible:
        kwargs["admissible_commands"] = False
    if ns.cache_dir:
        kwargs["cache_dir"] = ns.cache_dir
    return kwargs


def _cmd_envs_list(ns: argparse.Namespace) -> int:
    from w2s_agents.envs import registered_envs

    for entry in registered_envs():
        print(f"{entry.env_id}  {entry.entry_point}  ({entry.source})")
    return 0


def _cmd_envs_suites(ns: argparse.Namespace) -> int:
    from w2s_agents.envs.suites import TextWorldSuite, get_suite, suite_names

    for name in suite_names():
        suite = get_suite(name)
        if isinstance(suite, TextWorldSuite):
            sizes = " / ".join(f"{suite.sizes.get(s, 0)} {s}" for s in ("train", "valid", "test"))
        else:
            sizes = (
                " / ".join(
                    f"{'all' if suite.sizes.get(s) is None else suite.sizes[s]} {s}"
                    for s in ("train", "valid", "test")
                )
                + " variations per task"
            )
        print(f"{name}  {suite.env_id}  {sizes}  {suite.description}")
    return 0


def _cmd_envs_tasks(ns: argparse.Namespace) -> int:
    from w2s_agents.envs.demos import suite_task_ids

    for task_id in suite_task_ids(ns.suite, ns.split):
        print(task_id)
    return 0


def _cmd_envs_play(ns: argparse.Namespace) -> int:
    from w2s_agents.envs import make_env

    env = make_env(ns.env_id, **_env_kwargs(ns))
    try:
        obs, info = env.reset(options={"task": ns.task} if ns.task else None)
        print(f"# {info['task_id']}: {info.get('instruction', '')}")
        print(obs.rstrip())
        total = 0.0
        while True:
            if info.get("admissible_commands") and ns.show_admissible:
                print(f"[admissible: {' | '.join(info['admissible_commands'])}]")
            print("> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line or line.strip().lower() in ("quit", "exit", "q"):
                print()
                break
            obs, reward, terminated, truncated, info = env.step(line.rstrip("\n"))
            total += reward
            print(obs.rstrip())
            if reward:
                print(f"[reward {reward:+.3f}, score {info['score']:.3f}]")
            if terminated or truncated:
                end = "won" if info["won"] else "lost" if info["lost"] else "step limit reached"
                print(f"[{end} after {info['moves']} steps, return {total:.3f}]")
                break
    finally:
        env.close()
    return 0


def _cmd_envs_demos(ns: argparse.Namespace) -> int:
    from w2s_agents.envs.demos import export_demos

    kwargs = {"cache_dir": ns.cache_dir} if ns.cache_dir else {}
    written, won = export_demos(
        ns.suite,
        ns.split,
        ns.out,
        limit=ns.limit,
        max_steps=ns.max_steps,
        admissible_commands=not ns.no_admissible,
        **kwargs,
    )
    print(f"{ns.out}: wrote {written} expert trajectories of {ns.suite}/{ns.split} ({won} won)")
    return 0 if won == written else 1


# ------------------------------------------------------------------------------------------- store


def _cmd_store_check(ns: argparse.Namespace) -> int:
    from w2s_agents.store import TrajectoryStore, read_trajectories, scan_store

    status = 0
    for name in ns.files:
        path = Path(name)
        if not path.is_file():
            raise W2SError(f"trajectory file not found: {path}")
        scan = scan_store(path)
        if scan.torn_bytes:
            if ns.repair:
                TrajectoryStore(path, fsync=True, allow_duplicates=True).close()
                print(f"{path}: removed a torn last record ({scan.torn_bytes} bytes)")
            else:
                print(f"{path}: torn last record ({scan.torn_bytes} bytes); run with --repair to remove it")
                status = 1
        trajs = list(read_trajectories(path))
        n = len(trajs)
        if n == 0:
            print(f"{path}: 0 trajectories")
            continue
        roles = Counter(t.source.role for t in trajs)
        ends = Counter(t.end for t in trajs)
        print(
            f"{path}: {n} trajectories, {len({t.task_id for t in trajs})} tasks, "
            f"success {sum(t.success for t in trajs) / n:.3f}, "
            f"mean return {statistics.fmean(t.return_ for t in trajs):.3f}, "
            f"mean steps {statistics.fmean(t.num_steps for t in trajs):.1f}"
        )
        print(f"  roles: {dict(roles)}  ends: {dict(ends)}")
        if scan.duplicates:
            print(f"  {len(scan.duplicates)} duplicated episode keys, e.g. {scan.duplicates[0]}")
            status = 1
    return status


# ------------------------------------------------------------------------------------------- tree


def _cmd_tree_build(ns: argparse.Namespace) -> int:
    from w2s_agents.store import iter_trajectories
    from w2s_agents.tree import build_trees, tree_filename

    wanted = set(ns.task)
    trajs = (t for t in iter_trajectories(ns.files) if not wanted or t.task_id in wanted)
    trees = build_trees(trajs)
    if not trees:
        raise W2SError(
            "no trajectories to build trees from" + (f" for tasks {sorted(wanted)}" if wanted else "")
        )
    out = Path(ns.out)
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

    for name in _tree_files(ns.trees):
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


def _tree_files(names: Sequence[str]) -> list[Path]:
    """Tree files named directly or found (``*.json``) in named folders, sorted; W2SError when none."""
    files: list[Path] = []
    for name in names:
        p = Path(name)
        if p.is_dir():
            found = sorted(p.glob("*.json"))
            if not found:
                raise W2SError(f"no tree files (*.json) in folder {p}")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise W2SError(f"tree file or folder not found: {p}")
    return files


# ------------------------------------------------------------------------------------------- search


def _cmd_search(ns: argparse.Namespace) -> int:
    from w2s_agents.config import config_to_dict, load_config
    from w2s_agents.search import (
        SearchConfig,
        best_path_row,
        expert_failure_pairs,
        node_values,
        search_tree,
        tree_pairs,
        unique_rows,
        write_jsonl,
    )
    from w2s_agents.store import iter_trajectories
    from w2s_agents.tree import TrajectoryTree

    overrides = list(ns.set)
    for key in ("iterations", "gamma", "seed", "value", "margin"):
        if getattr(ns, key) is not None:
            overrides.append(f"{key}={getattr(ns, key)}")
    cfg = load_config(SearchConfig, ns.config, overrides)
    files = _tree_files(ns.trees)
    sft_rows, pair_rows = [], []
    for path in files:
        tree = TrajectoryTree.load(path)
        if cfg.value == "mcts" or not ns.keep_values:
            search_tree(tree, cfg)
            tree.save(path)
        values = node_values(tree, cfg.value, cfg.discount)
        row = best_path_row(tree, values, min_return=cfg.sft_min_value)
        if row is not None:
            sft_rows.append(row)
        pairs = tree_pairs(
            tree,
            values,
            margin=cfg.margin,
            per_node=cfg.pairs_per_node,
            step=cfg.step_pairs,
            continuation=cfg.continuation_pairs,
        )
        pair_rows.extend(pairs)
        print(
            f"{path}: task {tree.task_id}, {len(tree)} nodes, best path {'kept' if row else 'skipped'}, "
            f"{len(pairs)} pairs"
        )
    out = Path(ns.out)
    n_sft = write_jsonl(unique_rows(sft_rows), out / "sft.jsonl")
    n_pairs = write_jsonl(unique_rows(pair_rows), out / "pairs.jsonl")
    summary = {"trees": len(files), "sft_rows": n_sft, "pair_rows": n_pairs, "config": config_to_dict(cfg)}
    if ns.trajectories:
        eto = expert_failure_pairs(
            iter_trajectories(ns.trajectories), margin=cfg.margin, per_task=cfg.pairs_per_node
        )
        summary["expert_pair_rows"] = write_jsonl(eto, out / "expert_pairs.jsonl")
    (out / "search.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(
        f"{out}: sft.jsonl {n_sft} rows, pairs.jsonl {n_pairs} rows"
        + (f", expert_pairs.jsonl {summary['expert_pair_rows']} rows" if ns.trajectories else "")
    )
    return 0


# ------------------------------------------------------------------------------------------- viz


def _cmd_viz(ns: argparse.Namespace) -> int:
    from w2s_agents.config import load_config
    from w2s_agents.search import SearchConfig
    from w2s_agents.tree import TrajectoryTree
    from w2s_agents.viz import (
        VizConfig,
        export_static,
        find_tree_files,
        read_pair_rows,
        read_path_rows,
        render_run_index,
        render_tree_html,
    )

    viz_over = list(ns.set)
    for key in ("depth", "max_children", "color", "expand_depth"):
        if getattr(ns, key) is not None:
            viz_over.append(f"{key}={getattr(ns, key)}")
    viz_cfg = load_config(VizConfig, None, viz_over)
    search_over = [f"{key}={getattr(ns, key)}" for key in ("margin",) if getattr(ns, key) is not None]
    search_cfg = load_config(SearchConfig, ns.search_config, search_over)
    target = Path(ns.target)
    fmt = ns.format
    if ns.dpi < 10:
        raise W2SError(f"--dpi must be at least 10, got {ns.dpi}")
    pairs = read_pair_rows(ns.pairs) if ns.pairs else None
    paths = read_path_rows(ns.paths) if ns.paths else None
    common = {"search": search_cfg, "value": ns.value, "pairs": pairs, "paths": paths, "config": viz_cfg}

    if target.is_file():
        tree = TrajectoryTree.load(target)
        out = Path(ns.out) if ns.out else target.with_suffix(f".{fmt}")
        if out.is_dir():
            out = out / target.with_suffix(f".{fmt}").name
        if fmt == "html":
            render_tree_html(tree, out, title=ns.title, file=str(target), **common)
        else:
            export_static(tree, out, fmt, dpi=ns.dpi, **common)
        print(f"{out}: {fmt} of task {tree.task_id} ({len(tree)} nodes, {out.stat().st_size:,} bytes)")
        return 0
    if not target.is_dir():
        raise W2SError(f"tree file or run folder not found: {target}")
    out_dir = Path(ns.out) if ns.out else target / "viz"
    if fmt == "html":
        index, entries = render_run_index(target, out_dir, **common)
        bad = [e for e in entries if e.error]
        for e in bad:
            print(f"w2s: error: {e.error}", file=sys.stderr)
        print(
            f"{index}: index of {len(entries) - len(bad)} tree pages"
            + (f" ({len(bad)} unreadable)" if bad else "")
        )
        return 1 if bad else 0
    status = 0
    files = find_tree_files(target, exclude=out_dir)
    if not files:
        raise W2SError(f"no tree files in run folder {target}")
    for f in files:
        try:
            tree = TrajectoryTree.load(f)
        except W2SError as exc:
            print(f"w2s: error: {exc}", file=sys.stderr)
            status = 1
            continue
        name = "__".join(f.relative_to(target).with_suffix("").parts)
        out = export_static(tree, out_dir / f"{name}.{fmt}", fmt, dpi=ns.dpi, **common)
        print(f"{out}: {fmt} of task {tree.task_id} ({len(tree)} nodes)")
    return status


# ------------------------------------------------------------------------------------------- train


def _cmd_train(ns: argparse.Namespace) -> int:
    from w2s_agents.config import load_config, load_yaml
    from w2s_agents.trainers import TrainJobConfig, train_dpo, train_sft

    method = ns.method
    written = load_yaml(ns.config).get("train", {})
    if isinstance(written, dict) and written.get("method", method) != method:
        raise W2SError(
            f"{ns.config}: train.method is {written['method']!r} but the command trains {method!r}; "
            f"run `w2s train {written['method']}` or change the file"
        )
    job = load_config(TrainJobConfig, ns.config, [*ns.overrides, f"train.method={method}"])
    cfg = job.train
    if cfg.is_dpo:
        result = train_dpo(
            job.model,
            job.data,
            job.out_dir,
            cfg,
            reference_path=job.reference_path(),
            valid_pairs_or_path=job.valid_data or None,
            resume=job.resume,
        )
    else:
        result = train_sft(
            job.model,
            job.data,
            job.out_dir,
            cfg,
            valid_rows_or_path=job.valid_data or None,
            resume=job.resume,
        )
    if os.environ.get("RANK", "0") != "0":  # under accelerate launch / torchrun the main process reports
        return 0
    first, last = result.loss_curve[0][1], result.loss_curve[-1][1]
    print(
        f"{result.out_dir}: {result.method}, {result.rows} rows ({result.skipped_rows} too long), "
        f"{result.steps} steps, loss {first:.4f} -> {last:.4f}, {result.tokens_per_second:,.0f} tokens/s"
    )
    if result.best_step is not None:
        print(f"  best {result.valid_metric} {result.best_value:.4f} at step {result.best_step}")
    if result.source_weights:
        print("  source weights " + ", ".join(f"{k}={v:.4f}" for k, v in result.source_weights.items()))
    print(f"  model {result.model_dir} (step {result.exported_step})")


# ------------------------------------------------------------------------------------------- rollout


def _terminate(signum: int, frame: object) -> None:
    print("w2s: terminated; finished episodes are stored, run the same command to resume", file=sys.stderr)
    raise SystemExit(128 + signum)


def _cmd_rollout(ns: argparse.Namespace) -> int:
    from w2s_agents.rollout import load_job, run_job

    path, overrides = _split_config_args([ns.config, *ns.overrides])
    if path is None or "=" in ns.config:
        raise W2SError(
            "w2s rollout needs a config file (e.g. configs/rollout-tiny.yaml) before KEY=VALUE overrides"
        )
    cfg = load_job(path, overrides)
    # a scheduler's SIGTERM (preemption) stops the run in order: the store is closed, Ray shut down
    before = signal.signal(signal.SIGTERM, _terminate)
    try:
        summary, output = run_job(cfg)
    finally:
        signal.signal(signal.SIGTERM, before)
    s = summary
    print(
        f"{output}: {s.episodes} episodes run, {s.skipped} already stored ({s.planned} planned); "
        f"{s.steps} steps, success {s.success_rate:.3f}, mean return {s.mean_return:.3f}"
    )
    print(
        f"  ends {dict(sorted(s.ends.items()))}, unparseable steps {s.unparseable}, tokens in {s.tokens_in:,} "
        f"out {s.tokens_out:,}, {s.wall_s:.1f} s ({s.steps_per_s:.1f} steps/s)"
        + (f", {s.workers} Ray workers ({s.worker_failures} died)" if s.workers else "")
    )
    return 0


# ------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The ``w2s`` argument parser (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(
        prog="w2s",
        description="Train a strong LLM agent from a weak agent's trajectory trees.",
    )
    parser.add_argument("--version", action="version", version=f"w2s-agents {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p_config = sub.add_parser("config", help="show and document experiment configs")
    config_sub = p_config.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    p = config_sub.add_parser(
        "show",
        help="print the resolved config (validated)",
        description="Print the resolved config of CONFIG (default: the embedded quickstart defaults) "
        "with KEY=VALUE overrides applied.",
    )
    p.add_argument("args", nargs="*", metavar="[CONFIG] [KEY=VALUE ...]")
    p.set_defaults(func=_cmd_config_show)
    p = config_sub.add_parser("keys", help="list every config key with its type, default and help")
    p.add_argument("--grep", default="", help="only keys containing this text")
    p.set_defaults(func=_cmd_config_keys)

    p = sub.add_parser(
        "run",
        help="run the whole weak-to-strong pipeline (default: the CPU quickstart)",
        description="Run every stage of the experiment in CONFIG (default: the embedded quickstart) with "
        "KEY=VALUE overrides: demos, weak/strong SFT, exploration, trees, MCTS, W2S training, ceiling, "
        "evaluation and report. Finished stages are reused; a killed run resumes.",
    )
    p.add_argument("args", nargs="*", metavar="[CONFIG] [KEY=VALUE ...]")
    p.add_argument("--from", dest="from_stage", metavar="STAGE", help="redo this stage and every later one")
    p.add_argument("--until", metavar="STAGE", help="stop after this stage")
    p.add_argument("--list-stages", action="store_true", help="print the stage names and exit")
    p.set_defaults(func=_cmd_run)
    p = sub.add_parser("report", help="rewrite report.md and its plots from a run's metrics.json")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--no-plots", action="store_true", help="leave the PNG plots out")
    p.set_defaults(func=_cmd_report)

    p_model = sub.add_parser("model", help="build tiny models, inspect local models")
    model_sub = p_model.add_subparsers(dest="model_command", metavar="SUBCOMMAND", required=True)
    p = model_sub.add_parser(
        "tiny",
        help="build a tiny Llama model with a tokenizer trained on local text",
        description="Train a byte-level BPE tokenizer on the given texts, build a randomly initialised tiny "
        "Llama model of a size preset, and save both with save_pretrained.",
    )
    p.add_argument("out_dir", help="folder to write the model to")
    from w2s_agents.agents.models import TINY_PRESETS  # no torch import

    p.add_argument("--preset", default="weak", choices=list(TINY_PRESETS), help="model size")
    p.add_argument("--text", action="append", default=[], metavar="FILE", help="text file, one text a line")
    p.add_argument(
        "--trajectories", action="append", default=[], metavar="FILE", help="trajectory .jsonl file"
    )
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    p.set_defaults(func=_cmd_model_tiny)
    p = model_sub.add_parser("info", help="load a local model and describe it")
    p.add_argument("path", help="local model folder")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.set_defaults(func=_cmd_model_info)

    p_envs = sub.add_parser(
        "envs",
        help="list, play and export demos of text environments",
        description="Without a subcommand: list the registered text envs, one a line (built-in and plugins).",
    )
    p_envs.set_defaults(func=_cmd_envs_list)
    envs_sub = p_envs.add_subparsers(dest="envs_command", metavar="SUBCOMMAND")
    p = envs_sub.add_parser("list", help="list the registered text envs, one a line")
    p.set_defaults(func=_cmd_envs_list)
    p = envs_sub.add_parser("suites", help="list the task suites, one a line")
    p.set_defaults(func=_cmd_envs_suites)
    p = envs_sub.add_parser("tasks", help="list the task ids of a suite split")
    p.add_argument("suite")
    p.add_argument("--split", default="train", choices=["train", "valid", "test"])
    p.set_defaults(func=_cmd_envs_tasks)
    p = envs_sub.add_parser(
        "play",
        help="play a task in the terminal (commands from stdin; 'quit' or end of input stops)",
    )
    p.add_argument("env_id", metavar="ID", help="env id, e.g. w2s/TextWorld-v0")
    p.add_argument("--task", default=None, help="task id, e.g. tw-simple/train/0 or boil/0")
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--show-admissible", action="store_true", help="print the admissible commands each turn")
    p.add_argument("--no-admissible", action="store_true", help="do not compute admissible commands")
    p.add_argument("--cache-dir", default=None, help="game cache folder (TextWorld)")
    p.set_defaults(func=_cmd_envs_play)
    p = envs_sub.add_parser(
        "demos",
        help="write the expert trajectories of a suite split to a .jsonl file (exit 1 if one fails to win)",
    )
    p.add_argument("suite", help="task suite, e.g. tw-simple (see `w2s envs suites`)")
    p.add_argument("--split", default="train", choices=["train", "valid", "test"])
    p.add_argument("-o", "--out", required=True, metavar="FILE", help="trajectory .jsonl file (appended)")
    p.add_argument("--limit", type=int, default=None, help="only the first N tasks")
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--no-admissible", action="store_true", help="do not record admissible commands")
    p.add_argument("--cache-dir", default=None, help="TextWorld game cache folder")
    p.set_defaults(func=_cmd_envs_demos)

    p = sub.add_parser(
        "rollout",
        help="run an LLM agent on a task suite and store its trajectories (resumable; Ray with workers > 0)",
        description="Run every (task, sampler, seed) episode of the config that the trajectory file does not "
        "hold yet, writing each as it ends. Sections: run, model, agent, rollout (see configs/rollout-tiny.yaml "
        "and docs/rollout.md). Running the same command again resumes.",
    )
    p.add_argument("config", metavar="CONFIG", help="YAML file (e.g. configs/rollout-tiny.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override a key, e.g. rollout.workers=2")
    p.set_defaults(func=_cmd_rollout)

    p_store = sub.add_parser("store", help="check trajectory files")
    store_sub = p_store.add_subparsers(dest="store_command", metavar="SUBCOMMAND", required=True)
    p = store_sub.add_parser(
        "check",
        help="validate trajectory .jsonl files and summarise them (exit 1 on a torn record or duplicates)",
    )
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--repair", action="store_true", help="remove a torn last record left by a killed writer")
    p.set_defaults(func=_cmd_store_check)

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

    p = sub.add_parser(
        "search",
        help="MCTS over trees; write values into the trees and best-path SFT rows and pairs as JSONL",
        description="Run the offline MCTS on every tree (files or folders of *.json), store mcts_visits and "
        "mcts_value in the tree files, and write OUT/sft.jsonl (best paths), OUT/pairs.jsonl (TreeDPO pairs, "
        "step and continuation level) and OUT/search.json. Settings: the keys of SearchConfig (--config YAML, "
        "--set KEY=VALUE, or the flags below).",
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

    p = sub.add_parser(
        "viz",
        help="look at trees: an interactive offline HTML viewer, a run index, or static SVG/PNG figures",
        description="TREE.json: write one self-contained HTML viewer of the tree (default TREE.html beside it), or "
        "with --format svg|png a figure of its top levels. RUN_DIR: a viewer page for every tree of the run "
        "(RUN_DIR/trees/*.json, else any w2s.tree file below it) and an index page over them (default "
        "RUN_DIR/viz/index.html), or one figure per tree. The best path and the TreeDPO pairs are computed from "
        "the tree's values as `w2s search` does (SearchConfig: --search-config, --value, --margin) unless "
        "--paths / --pairs give the rows that `w2s search` wrote. Exit status 1 when a tree of a run could not "
        "be read (its error is printed and listed on the index).",
    )
    p.add_argument("target", metavar="TREE.json|RUN_DIR")
    p.add_argument(
        "-o", "--out", default=None, metavar="PATH",
        help="output file (a tree) or folder (a run); default beside the tree, or RUN_DIR/viz",
    )  # fmt: skip
    p.add_argument("--format", default="html", choices=["html", "svg", "png"], help="default html")
    p.add_argument("--pairs", default=None, metavar="pairs.jsonl", help="show these TreeDPO pair rows")
    p.add_argument(
        "--paths", default=None, metavar="sft.jsonl", help="show the paths of these SFT rows as best"
    )
    p.add_argument("--value", default=None, choices=["mcts", "mean", "max", "success"],
                   help="value of the computed best path and pairs (default: SearchConfig value, mcts; mean on "
                   "a tree without search values)")  # fmt: skip
    p.add_argument("--margin", type=float, default=None, help="smallest value gap of a computed pair")
    p.add_argument(
        "--search-config", default=None, metavar="YAML", help="SearchConfig values (as w2s search)"
    )
    p.add_argument("--color", default=None, choices=["mcts", "mean", "success", "max"], help="initial colour")
    p.add_argument("--expand-depth", type=int, default=None, help="levels expanded when the page opens")
    p.add_argument("--depth", type=int, default=None, help="figures: levels below the root drawn")
    p.add_argument("--max-children", type=int, default=None, help="figures: most children drawn per node")
    p.add_argument("--dpi", type=int, default=200, help="PNG resolution")
    p.add_argument("--title", default=None, help="page title (default: the task id)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a VizConfig setting")
    p.set_defaults(func=_cmd_viz)
    p_train = sub.add_parser("train", help="fine-tune an agent: SFT, TreeDPO or MCTS-SFT")
    train_sub = p_train.add_subparsers(dest="train_command", metavar="METHOD", required=True)
    for method, text in (
        ("sft", "supervised fine-tuning on agent conversations or trajectory files (baselines)"),
        ("dpo", "TreeDPO on preference pairs, reference log-probs from the reference model"),
        ("mcts-sft", "SFT on the best paths of searched trees"),
    ):
        p = train_sub.add_parser(
            method,
            help=text,
            description=f"{text[0].upper()}{text[1:]}. CONFIG is a YAML file with model, data, out_dir, "
            "weak_model / strong_model (DPO reference) and a train section (see docs/training.md); "
            "KEY=VALUE overrides any key, e.g. train.lr=1e-4 train.lora.enabled=true. A rerun resumes from "
            "the last checkpoint.",
        )
        p.add_argument("config", metavar="CONFIG", help="YAML file (e.g. configs/train-sft-tiny.yaml)")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
        p.set_defaults(func=_cmd_train, method=method)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``w2s`` console script; returns the exit status."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    from w2s_agents.log import setup_logging

    setup_logging(ns.log_level)
    try:
        return int(ns.func(ns) or 0)
    except W2SError as exc:
        print(f"w2s: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("w2s: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `w2s config keys | head`
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
