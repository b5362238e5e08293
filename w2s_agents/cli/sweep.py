"""``w2s sweep``: a grid of ``w2s run`` experiments with one comparison table and plot."""

from __future__ import annotations

import argparse

from w2s_agents.cli.args import check_output_dir, split_config_args

__all__ = ["add_commands"]


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Declare ``w2s sweep``."""
    p = sub.add_parser(
        "sweep",
        help="run a grid of experiments (ablations) and compare them in one table and plot",
        description="Run the experiment of CONFIG (default: the embedded quickstart) once per point of the grid "
        "of KEY=v1,v2,... axes (a value list with commas outside brackets), with the other KEY=VALUE overrides "
        "applied to every point. Each point is a cached, resumable `w2s run` in "
        "<run.out_dir>/<run.name>-sweep/<point>/; stages whose key equals a stage another point finished are "
        "shared, not rerun. Writes sweep.json, sweep.md and sweep.png there.",
    )
    p.add_argument("args", nargs="*", metavar="[CONFIG] KEY=v1,v2,... [KEY=VALUE ...]")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: rebuild sweep.json, sweep.md and sweep.png from the points that have finished",
    )
    p.add_argument("--no-plot", action="store_true", help="leave sweep.png out")
    p.set_defaults(func=_cmd_sweep, overrides_dest="args")


def _cmd_sweep(ns: argparse.Namespace) -> int:
    from w2s_agents.pipeline.sweep import plan_sweep, report_sweep, run_sweep

    path, args = split_config_args(ns.args)
    plan = plan_sweep(path, args)
    check_output_dir(plan.directory, "sweep folder (run.out_dir/run.name-sweep)")
    for point in plan.points:
        check_output_dir(point.run_dir, f"run folder of sweep point {point.name}")
    if ns.report_only:
        result = report_sweep(plan, plots=not ns.no_plot)
    else:
        result = run_sweep(plan, plots=not ns.no_plot)
    finished = sum(p["finished"] for p in result.summary["points"])
    print(f"{plan.directory}: {finished} of {len(plan.points)} points finished")
    for point in plan.points:
        shared = result.linked.get(point.name)
        note = f" (shared stages: {', '.join(shared)})" if shared else ""
        print(f"  {point.name}: {point.run_dir}{note}")
    for f in result.files:
        print(f"  {f}")
    return 0
