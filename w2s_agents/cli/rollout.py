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


_RESUME = "finished episodes are stored, run the same command to resume"


class _Stop:
    """Handles SIGTERM (a scheduler preempting the job) and SIGINT (Ctrl-C) during a rollout: the first one is
    remembered and ends the run in order through the ``finally`` blocks (the store closed, Ray shut down, the
    summary written). A second SIGTERM is ignored, so that it cannot cut that short; a second Ctrl-C is not."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum = signum
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_IGN)
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
    stop = _Stop()
    before = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        summary, output = run_job(cfg)
    except (KeyboardInterrupt, SystemExit, W2SError):
        if stop.signum is None:
            raise
        # stopped by a signal, whatever surfaced: Ray replaces the handler's exception with SystemExit(1) when its
        # raylet, which got the same SIGTERM from a process-group kill, is gone first
        word = "terminated" if stop.signum == signal.SIGTERM else "interrupted"
        print(f"w2s: {word}; {_RESUME}", file=sys.stderr)
        return 128 + stop.signum
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
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
