"""``w2s rollout``: run an LLM agent on a task suite and store its trajectories (resumable)."""

from __future__ import annotations

import argparse
import signal
import sys

from w2s_agents.cli.args import check_output_dir, check_output_file, split_config_args
from w2s_agents.errors import W2SError

__all__ = ["add_commands"]


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Declare ``w2s rollout``."""
    p = sub.add_parser(
        "rollout",
        help="run an LLM agent on a task suite and store its trajectories (resumable; Ray with workers > 0)",
        description="Run every (task, sampler, seed) episode of the config that the trajectory file does not "
        "hold yet, writing each as it ends. Sections: run, model, agent, rollout (see configs/rollout-tiny.yaml "
        "and docs/rollout.md). Running the same command again resumes.",
    )
    p.add_argument("config", metavar="CONFIG", help="YAML file (e.g. configs/rollout-tiny.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override a key, e.g. rollout.workers=2")
    p.set_defaults(func=_cmd_rollout, overrides_dest="overrides")


def _terminate(signum: int, frame: object) -> None:
    print("w2s: terminated; finished episodes are stored, run the same command to resume", file=sys.stderr)
    raise SystemExit(128 + signum)


def _cmd_rollout(ns: argparse.Namespace) -> int:
    from w2s_agents.rollout import load_job, run_job

    path, overrides = split_config_args([ns.config, *ns.overrides])
    if path is None or "=" in ns.config:
        raise W2SError(
            "w2s rollout needs a config file (e.g. configs/rollout-tiny.yaml) before KEY=VALUE overrides"
        )
    cfg = load_job(path, overrides)
    # where the run writes, checked before the model is loaded or built
    check_output_dir(cfg.run.run_dir, "run folder (run.out_dir/run.name)")
    if cfg.rollout.output is not None:
        check_output_file(cfg.rollout.output, "rollout.output")
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
