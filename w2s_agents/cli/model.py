"""``w2s model``: build tiny models from local text, describe local models."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from w2s_agents.cli.args import check_output_dir
from w2s_agents.errors import W2SError

__all__ = ["add_commands"]


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Declare ``w2s model tiny|info``."""
    from w2s_agents.agents.models import TINY_PRESETS  # no torch import

    p_model = sub.add_parser("model", help="build tiny models, inspect local models")
    model_sub = p_model.add_subparsers(dest="model_command", metavar="SUBCOMMAND", required=True)
    p = model_sub.add_parser(
        "tiny",
        help="build a tiny Llama model with a tokenizer trained on local text",
        description="Train a byte-level BPE tokenizer on the given texts, build a randomly initialised tiny "
        "Llama model of a size preset, and save both with save_pretrained.",
    )
    p.add_argument("out_dir", help="folder to write the model to")
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
    from w2s_agents.agents import create_tiny_model
    from w2s_agents.seeding import seed_everything

    out_dir = check_output_dir(ns.out_dir, "model folder")
    if out_dir.exists() and not ns.overwrite:
        raise W2SError(f"model folder {out_dir} already exists; pass --overwrite to replace it")
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
    from w2s_agents.agents import load_model
    from w2s_agents.agents.models import count_parameters

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
