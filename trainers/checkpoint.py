"""Atomic training checkpoints: trainable weights, optimizer, scheduler, RNG states, data position and curves.

A checkpoint is a folder ``<out>/checkpoints/step-NNNNNNNN`` holding

* ``trainable.safetensors``: the trainable parameters by name (every parameter, or only the LoRA adapters);
* ``optimizer.pt``, ``scheduler.pt``: their ``state_dict``;
* ``rng-<rank>.pt``: the Python, NumPy and torch (CPU and CUDA) random states of each process;
* ``state.json``: step, epoch, position in the epoch, curves, best validation, source weights, the run's
  fingerprint.

It is written under a temporary name and renamed when complete, so a killed run leaves either a whole
checkpoint or none; leftovers of an interrupted write are removed at the next start.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from w2s_agents.errors import W2SError

__all__ = [
    "CHECKPOINTS",
    "capture_rng",
    "checkpoint_dirs",
    "latest_checkpoint",
    "load_trainable",
    "read_state",
    "remove_stale",
    "restore_rng",
    "rotate_checkpoints",
    "save_trainable",
    "write_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"step-(\d{8})")


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name (tied weights once), detached on the CPU."""
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_trainable(model: nn.Module, path: Path) -> None:
    """Write the trainable parameters to a safetensors file."""
    from safetensors.torch import save_file

    save_file(trainable_state(model), str(path))


def load_trainable(model: nn.Module, path: Path) -> None:
    """Copy the tensors of a :func:`save_trainable` file into ``model``'s parameters of the same names.

    Raises:
        W2SError: the file misses a trainable parameter of the model or holds one it does not have.
    """
    from safetensors.torch import load_file

    saved = load_file(str(path))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    if missing or unexpected:
        raise W2SError(
            f"{path}: checkpoint does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name].to(p.device, p.dtype))


def capture_rng() -> dict[str, Any]:
    """The random states of Python, NumPy and torch (CPU and every CUDA device)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore :func:`capture_rng`'s output."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = out_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and _STEP_DIR.fullmatch(p.name) and (p / "state.json").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    dirs = checkpoint_dirs(out_dir)
    return dirs[-1] if dirs else None


def read_state(ckpt: Path) -> dict[str, Any]:
    """The ``state.json`` of a checkpoint."""
    return json.loads((ckpt / "state.json").read_text(encoding="utf-8"))


def remove_stale(out_dir: Path) -> None:
    """Remove the temporary folders of checkpoints whose writing was interrupted."""
    root = out_dir / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".") and ".tmp" in p.name:
                shutil.rmtree(p, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def new_checkpoint_dir(out_dir: Path, step: int) -> tuple[Path, Path]:
    """``(temporary folder to write into, final folder)`` of the checkpoint of ``step``."""
    root = out_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.tmp-"))
    return tmp, final


def write_checkpoint(
    tmp: Path,
    final: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
) -> Path:
    """Fill ``tmp`` with the model's trainable weights, optimizer, scheduler and ``state``, fsync it and rename
    it to ``final`` (replacing an older folder of the same step). RNG files are written by each process
    into ``tmp`` before this is called."""
    save_trainable(model, tmp / "trainable.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    for f in tmp.iterdir():
        with f.open("rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():
        old = final.with_name(f".{final.name}.old.tmp-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def rotate_checkpoints(out_dir: Path, keep: int, protect: set[int]) -> None:
    """Remove all but the ``keep`` newest checkpoints, never one whose step is in ``protect`` (the best)."""
    dirs = checkpoint_dirs(out_dir)
    for p in dirs[: max(0, len(dirs) - keep)]:
        if int(p.name[5:]) not in protect:
            shutil.rmtree(p, ignore_errors=True)
