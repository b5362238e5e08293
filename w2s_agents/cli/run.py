"""``w2s config``, ``w2s run`` and ``w2s report``: experiment configs, the whole pipeline, its report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from w2s_agents.cli.args import check_output_dir, split_config_args
from w2s_agents.errors import W2SError

__all__ = ["add_commands"]


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Declare ``w2s config show|keys``, ``w2s run`` and ``w2s report``."""
    p_config = sub.add_parser("config", help="show and document experiment configs")
    config_sub = p_config.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    p = config_sub.add_parser(
        "show",
        help="print the resolved config (validated)",
        description="Print the resolved config of CONFIG (default: the embedded quickstart defaults) "
        "with KEY=VALUE overrides applied.",
    )
    p.add_argument("args", nargs="*", metavar="[CONFIG] [KEY=VALUE ...]")
    p.set_defaults(func=_cmd_config_show, overrides_dest="args")
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
    p.set_defaults(func=_cmd_run, overrides_dest="args")
    p = sub.add_parser("report", help="rewrite report.md and its plots from a run's metrics.json")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--no-plots", action="store_true", help="leave the PNG plots out")
    p.set_defaults(func=_cmd_report)


def _cmd_config_show(ns: argparse.Namespace) -> int:
    from w2s_agents.config import config_hash, dump_config
    from w2s_agents.pipeline import load_experiment

    path, overrides = split_config_args(ns.args)
    cfg = load_experiment(path, overrides)
    print(f"# {path or 'embedded default config'} (hash {config_hash(cfg)})")
    print(dump_config(cfg), end="")
    return 0


def _cmd_config_keys(ns: argparse.Namespace) -> int:
    from w2s_agents.config import describe_config
    from w2s_agents.pipeline import ExperimentConfig

    rows = describe_config(ExperimentConfig)
    for key, type_name, default, help_text in rows:
        if ns.grep and ns.grep not in key:
            continue
        print(f"{key}  ({type_name}, default {json.dumps(default)})\n    {help_text}")
    return 0


def _cmd_run(ns: argparse.Namespace) -> int:
    from w2s_agents.pipeline import load_experiment, run_pipeline, stage_names
    from w2s_agents.pipeline.runner import check_stage_range

    path, overrides = split_config_args(ns.args)
    cfg = load_experiment(path, overrides)
    if ns.list_stages:
        print("\n".join(stage_names(cfg)))
        return 0
    check_stage_range(cfg, from_stage=ns.from_stage, until=ns.until)
    check_output_dir(cfg.run.run_dir, "run folder (run.out_dir/run.name)")
    result = run_pipeline(cfg, from_stage=ns.from_stage, until=ns.until)
    if not result.metrics:
        print(f"{result.run_dir}: stopped after stage {ns.until}")
        return 0
    from w2s_agents.pipeline.report import MODEL_LABELS, interval

    print(f"{result.run_dir}: report {result.report}")
    for name, m in result.metrics["models"].items():
        label = m.get("label") or MODEL_LABELS.get(name, name)
        print(
            f"  {label:<18} return {interval(m['return']).format(3)}  success {interval(m['success']).format(3)}"
        )
    for name, pgr in result.metrics.get("pgr", {}).items():
        iv = interval(pgr)
        note = f" ({iv.reason})" if iv.reason else ""
        if iv.dropped:
            note += f" ({100 * iv.dropped:.1f}% of bootstrap resamples dropped: gap below the minimum)"
        label = result.metrics["models"].get(name, {}).get("label") or MODEL_LABELS.get(name, name)
        print(f"  PGR {label:<14} {iv.format(2)}{note}")
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
