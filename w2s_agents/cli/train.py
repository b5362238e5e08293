"""``w2s train``: fine-tune an agent with SFT, TreeDPO, MCTS-SFT or policy gradient from a YAML job config."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from w2s_agents.cli.args import check_output_dir
from w2s_agents.errors import W2SError

if TYPE_CHECKING:
    from w2s_agents.trainers import TrainJobConfig, TrainResult

__all__ = ["add_commands"]


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Declare ``w2s train sft|dpo|mcts-sft|pg``."""
    p_train = sub.add_parser("train", help="fine-tune an agent: SFT, TreeDPO, MCTS-SFT or policy gradient")
    train_sub = p_train.add_subparsers(dest="train_command", metavar="METHOD", required=True)
    for method, text in (
        ("sft", "supervised fine-tuning on agent conversations or trajectory files (baselines)"),
        ("dpo", "TreeDPO on preference pairs, reference log-probs from the reference model"),
        ("mcts-sft", "SFT on the best paths of searched trees"),
        ("pg", "policy gradient on steps with advantages from searched trees (clipped ratio, REINFORCE)"),
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
        p.set_defaults(func=_cmd_train, method=method, overrides_dest="overrides")


def _cmd_train(ns: argparse.Namespace) -> int:
    from w2s_agents.config import load_config, load_yaml
    from w2s_agents.trainers import TrainJobConfig
    from w2s_agents.trainers.distributed import leave_process_group

    method = ns.method
    written = load_yaml(ns.config).get("train", {})
    if isinstance(written, dict) and written.get("method", method) != method:
        raise W2SError(
            f"{ns.config}: train.method is {written['method']!r} but the command trains {method!r}; "
            f"run `w2s train {written['method']}` or change the file"
        )
    for item in ns.overrides:
        key, _, value = item.partition("=")
        if key.strip() == "train.method" and value.strip() != method:
            raise W2SError(
                f"override '{item}' disagrees with the command, which trains {method!r}; "
                f"run `w2s train {value.strip()}` or leave train.method out"
            )
    job = load_config(TrainJobConfig, ns.config, [*ns.overrides, f"train.method={method}"])
    check_output_dir(job.out_dir, "out_dir")
    try:
        result = _train(job)
    except BaseException:
        leave_process_group(clean=False)  # the other processes may never reach a last barrier
        raise
    leave_process_group()  # every process leaves together: exiting still in a gloo group can abort the process
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
    return 0


def _train(job: TrainJobConfig) -> TrainResult:
    """Train ``job`` with its method's trainer and return the result."""
    from w2s_agents.trainers import train_dpo, train_pg, train_sft

    cfg = job.train
    if cfg.method == "pg":
        return train_pg(
            job.model,
            job.data,
            job.out_dir,
            cfg,
            reference_path=job.reference_path() if cfg.pg.kl_coef > 0 else None,
            valid_rows_or_path=job.valid_data or None,
            resume=job.resume,
        )
    if cfg.is_dpo:
        return train_dpo(
            job.model,
            job.data,
            job.out_dir,
            cfg,
            reference_path=job.reference_path(),
            valid_pairs_or_path=job.valid_data or None,
            resume=job.resume,
        )
    return train_sft(
        job.model,
        job.data,
        job.out_dir,
        cfg,
        valid_rows_or_path=job.valid_data or None,
        resume=job.resume,
    )
