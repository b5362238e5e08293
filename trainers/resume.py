"""Which checkpoint a training run resumes from, and what happens to damaged ones.

:func:`resume_newest_intact` walks a run's checkpoints newest to oldest. Each is handed to a loader
(:func:`load_run_checkpoint`: the main process verifies the manifest, every process reads its files, checks
the run's fingerprint and loads the weights, optimizer, schedule, random states and source weights); one
that raises :class:`~.state_files.CorruptCheckpointError` on any process is skipped with a warning naming the
file and the reason, and the next older one is tried. Every process takes part in each decision
(:func:`all_agree`), so all of them resume from the same step. Once an intact one is found, the main process
renames the damaged newer ones ``step-NNNNNNNN.corrupt`` (:func:`.checkpoint.set_aside`); when none is intact
the run stops with one line naming each one's problem.

:func:`load_verified_trainable` is the same check for the one checkpoint whose weights are exported (the
best): verified, loaded, and refused with one line when damaged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from w2s_agents.errors import W2SError

from .checkpoint import apply_checkpoint, read_checkpoint, read_state, set_aside, verify_checkpoint
from .distributed import Processes
from .losses import SourceWeights
from .state_files import CorruptCheckpointError, load_trainable

__all__ = ["all_agree", "load_run_checkpoint", "load_verified_trainable", "resume_newest_intact"]


def all_agree(procs: Processes, ok: bool, device: torch.device) -> bool:
    """Whether ``ok`` holds on every process (a collective: every process must call it)."""
    failed = torch.tensor(0.0 if ok else 1.0, device=device)
    return float(procs.sum(failed)) == 0.0


def load_run_checkpoint(
    ckpt: Path,
    *,
    fingerprint: str,
    procs: Processes,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    weights: SourceWeights | None,
    log: logging.Logger,
) -> dict[str, Any]:
    """Verify ``ckpt`` (the main process hashes it), read it and load it into ``model``, ``optimizer``,
    ``scheduler``, the random generators and ``weights``; return its loop state.

    Raises:
        CorruptCheckpointError: a file of ``ckpt`` is missing, damaged, foreign or unsafe.
        W2SError: ``ckpt`` belongs to another run (its fingerprint is not ``fingerprint``).
    """
    found = read_state(ckpt).get("fingerprint")
    if found != fingerprint:
        raise W2SError(
            f"{ckpt.parent.parent} holds checkpoints of another run (config, data or model differ: fingerprint "
            f"{found} vs {fingerprint}); use another out_dir or resume: false"
        )
    if procs.is_main:
        verify_checkpoint(ckpt)
    contents = read_checkpoint(ckpt, procs.rank)
    state = contents.state
    state.setdefault("metrics_curve", [])  # checkpoints written before the curve existed
    if weights is not None and state.get("source_weights"):
        try:
            weights.load_state_dict(state["source_weights"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpointError(f"{ckpt / 'state.json'}: bad source_weights ({exc})") from None
    apply_checkpoint(contents, model=model, optimizer=optimizer, scheduler=scheduler)
    if state.get("processes", 1) != procs.world:
        log.warning(
            "%s was checkpointed with %s processes and resumes with %d: the micro-batches of each step "
            "differ from an uninterrupted run from here on",
            ckpt,
            state.get("processes", 1),
            procs.world,
        )
        state["processes"] = procs.world
    return state


def resume_newest_intact(
    candidates: Sequence[Path],
    *,
    procs: Processes,
    device: torch.device,
    load: Callable[[Path], dict[str, Any]],
    log: logging.Logger,
) -> tuple[Path, dict[str, Any]]:
    """The newest of ``candidates`` (a run's checkpoints, oldest first, at least one) that ``load`` loads on
    every process, with the loop state ``load`` returned; the damaged newer ones are set aside (see the module
    docstring). Every process must call it.

    Raises:
        W2SError: none is intact (the message names each one's problem), or ``load`` raised it.
    """
    damaged: list[tuple[Path, str]] = []
    for ckpt in reversed(candidates):
        problem: str | None = None
        try:
            state = load(ckpt)
        except CorruptCheckpointError as exc:
            problem = str(exc)
        if all_agree(procs, problem is None, device):
            break
        damaged.append((ckpt, problem or f"{ckpt}: unreadable on another process"))
        log.warning("checkpoint %s is damaged and will not be used: %s", ckpt.name, damaged[-1][1])
    else:
        problems = "; ".join(why for _, why in damaged)
        raise W2SError(
            f"no intact checkpoint in {candidates[0].parent} ({problems}); move the folder away to "
            "keep it, or rerun with resume: false to start over"
        )
    if damaged and procs.is_main:
        for bad, _ in damaged:
            moved = set_aside(bad)
            log.warning("moved the damaged checkpoint %s to %s (kept for inspection)", bad, moved.name)
        log.warning("falling back to %s: %d newer checkpoint(s) were damaged", ckpt.name, len(damaged))
    procs.wait()
    return ckpt, state


def load_verified_trainable(model: nn.Module, ckpt: Path, procs: Processes, device: torch.device) -> None:
    """Load the trainable weights of ``ckpt`` (the best checkpoint, for export) after the main process has
    verified it. Every process must call it.

    Raises:
        W2SError: ``ckpt`` is damaged on some process (one line naming the file; ``export: last`` exports the
            last weights instead).
    """
    problem = None
    try:
        if procs.is_main:
            verify_checkpoint(ckpt)
        load_trainable(model, ckpt / "trainable.safetensors")
    except CorruptCheckpointError as exc:
        problem = str(exc)
    if not all_agree(procs, problem is None, device):
        raise W2SError(
            f"cannot export the best checkpoint {ckpt}: {problem or 'unreadable on another process'}; "
            "rerun with train.export=last to export the last weights instead"
        )
