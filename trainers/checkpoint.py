"""Atomic, verified training checkpoints: trainable weights, optimizer, scheduler, RNG states, data position
and curves, read back without unpickling anything.

A checkpoint is a folder ``<out>/checkpoints/step-NNNNNNNN`` holding

* ``trainable.safetensors``: the trainable parameters by name (every parameter, or only the LoRA adapters);
* ``optimizer.safetensors``, ``scheduler.safetensors``: their ``state_dict`` (see
  :func:`.state_files.save_state_file`);
* ``rng-<rank>.safetensors``: the Python, NumPy and torch (CPU and CUDA) random states of each process;
* ``state.json``: step, epoch, position in the epoch, curves, best validation, source weights, the run's
  fingerprint;
* ``manifest.json``, written last: the name, size and SHA-256 of every other file.

It is written under a temporary name and renamed when complete, so a killed run leaves either a whole
checkpoint or none; leftovers of an interrupted write are removed at the next start.

Reading (:func:`verify_checkpoint`, :func:`read_checkpoint`, :func:`apply_checkpoint`) never runs code from the
files: tensors come from safetensors, everything else from JSON. A file that is missing, truncated, altered,
foreign or unsafe raises :class:`CorruptCheckpointError` naming the file and the reason, and nothing is
changed in the model, optimizer, scheduler or random generators until every file has been read and checked.

Checkpoints written before the manifest (``optimizer.pt``, ``scheduler.pt``, ``rng-<rank>.pt``, no
``manifest.json``) are still read: what can be checked is (``state.json`` parses, the safetensors header is
whole), and the ``.pt`` files are loaded with ``torch.load(weights_only=True)``, which unpickles tensors and
plain containers only; the one extra type allowed is the NumPy ``uint32`` array of the legacy NumPy random
state (see :data:`.state_files.LEGACY_RNG_GLOBALS`). A file that names anything else is refused.

This module is the folder: its layout, the manifest, verification, reading, applying, writing and rotation.
Each file inside it is written and read by :mod:`.state_files`, whose public names are importable from here
too. Which checkpoint a run resumes from, and what happens to damaged ones, is :mod:`.resume`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from w2s_agents.atomic import replace_dir

from .state_files import (
    LEGACY_RNG_GLOBALS,
    CorruptCheckpointError,
    assign_trainable,
    capture_rng,
    check_rng,
    check_trainable,
    load_legacy_pt,
    load_state_file,
    load_trainable,
    one_line,
    read_trainable,
    restore_rng,
    rng_file,
    save_state_file,
    save_trainable,
    trainable_state,
    write_rng,
)

__all__ = [  # the names from .state_files are re-exported: they were defined here before it existed
    "CHECKPOINTS",
    "CHECKPOINT_FORMAT",
    "LEGACY_RNG_GLOBALS",
    "MANIFEST",
    "CheckpointContents",
    "CorruptCheckpointError",
    "apply_checkpoint",
    "assign_trainable",
    "capture_rng",
    "checkpoint_dirs",
    "latest_checkpoint",
    "load_state_file",
    "load_trainable",
    "read_checkpoint",
    "read_state",
    "read_trainable",
    "remove_stale",
    "restore_rng",
    "rng_file",
    "rotate_checkpoints",
    "save_state_file",
    "save_trainable",
    "set_aside",
    "trainable_state",
    "verify_checkpoint",
    "write_checkpoint",
    "write_rng",
]

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
CHECKPOINT_FORMAT = 2  # 1: optimizer.pt, scheduler.pt, rng-<rank>.pt and no manifest (read, never written)
TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.safetensors"
SCHEDULER = "scheduler.safetensors"
STATE = "state.json"
_REQUIRED = (TRAINABLE, OPTIMIZER, SCHEDULER, STATE)
_STEP_DIR = re.compile(r"step-(\d{8})")
_HASH_CHUNK = 8 << 20


# ---------------------------------------------------------------------- folders


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = out_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name) and (p / STATE).is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    dirs = checkpoint_dirs(out_dir)
    return dirs[-1] if dirs else None


_STATE_TYPES = {"step": int, "epoch": int, "micro": int, "loss_curve": list, "valid_curve": list}


def read_state(ckpt: Path) -> dict[str, Any]:
    """The ``state.json`` of a checkpoint.

    Raises:
        CorruptCheckpointError: the file is missing, not JSON, not a loop state, or of another step than the
            folder's name says.
    """
    path = ckpt / STATE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CorruptCheckpointError(f"{path}: not valid JSON ({one_line(exc)})") from None
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"{path}: not a training state (a JSON {type(state).__name__})")
    for key, kind in _STATE_TYPES.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise CorruptCheckpointError(
                f"{path}: not a training state ({key!r} missing or not {kind.__name__})"
            )
    match = _STEP_DIR.fullmatch(ckpt.name)
    if match and int(match.group(1)) != state["step"]:
        raise CorruptCheckpointError(
            f"{path}: holds step {state['step']}, the folder's name says {ckpt.name}"
        )
    return state


def remove_stale(out_dir: Path) -> None:
    """Remove the temporary folders of checkpoints whose writing was interrupted."""
    root = out_dir / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".") and ".tmp" in p.name:
                shutil.rmtree(p, ignore_errors=True)


def set_aside(ckpt: Path) -> Path:
    """Rename a damaged checkpoint to ``step-NNNNNNNN.corrupt`` (``.corrupt-2``, ... if taken), where it is
    kept for inspection and never read again, and return the new path."""
    target = ckpt.with_name(f"{ckpt.name}.corrupt")
    n = 1
    while target.exists():
        n += 1
        target = ckpt.with_name(f"{ckpt.name}.corrupt-{n}")
    os.replace(ckpt, target)
    return target


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


# ---------------------------------------------------------------------- manifest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)  # releases the GIL: files hash in parallel threads
    return digest.hexdigest()


def _hash_files(paths: list[Path]) -> list[str]:
    with ThreadPoolExecutor(max_workers=max(1, min(4, len(paths)))) as pool:
        return list(pool.map(_sha256, paths))


def _write_manifest(folder: Path, step: int) -> None:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    digests = _hash_files(files)
    manifest = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "files": {
            p.name: {"size": p.stat().st_size, "sha256": d} for p, d in zip(files, digests, strict=True)
        },
    }
    path = folder / MANIFEST
    with path.open("w", encoding="utf-8") as fh:
        fh.write(json.dumps(manifest, indent=1) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _read_manifest(ckpt: Path) -> dict[str, dict[str, Any]]:
    path = ckpt / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CorruptCheckpointError(f"{path}: not valid JSON ({one_line(exc)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != CHECKPOINT_FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise CorruptCheckpointError(
            f"{path}: unknown checkpoint format {got!r} (this version reads {CHECKPOINT_FORMAT})"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
        for e in files.values()
    ):
        raise CorruptCheckpointError(f"{path}: malformed (each file needs a size and a sha256)")
    for name in files:
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise CorruptCheckpointError(f"{path}: names {name!r}, which is not a file of the checkpoint")
    missing = [name for name in _REQUIRED if name not in files]
    if missing:
        raise CorruptCheckpointError(f"{path}: does not list {', '.join(missing)}")
    return files


def _is_legacy(ckpt: Path) -> bool:
    return not (ckpt / MANIFEST).exists() and (ckpt / "optimizer.pt").exists()


def verify_checkpoint(ckpt: Path) -> bool:
    """Check a checkpoint's files before it is read.

    With a manifest, every listed file must exist with the listed size and SHA-256 (hashed in parallel
    threads). A checkpoint written before manifests (format 1) is checked as far as it can be:
    ``state.json`` parses and ``trainable.safetensors`` has a whole header; a warning says so.

    Returns:
        True when the manifest verified every file, False for a format-1 checkpoint.

    Raises:
        CorruptCheckpointError: naming the first file that is missing or wrong, and why.
    """
    if _is_legacy(ckpt):
        read_state(ckpt)
        _check_safetensors_header(ckpt / TRAINABLE)
        logger.warning(
            "%s was written before checkpoints had a manifest: only state.json and the header of %s were "
            "checked; its .pt files are read with torch.load(weights_only=True)",
            ckpt,
            TRAINABLE,
        )
        return False
    if not (ckpt / MANIFEST).is_file():
        raise CorruptCheckpointError(f"{ckpt / MANIFEST}: missing (the checkpoint cannot be verified)")
    files = _read_manifest(ckpt)
    paths = [ckpt / name for name in files]
    for path, entry in zip(paths, files.values(), strict=True):
        if not path.is_file():
            raise CorruptCheckpointError(f"{path}: missing (listed in the manifest)")
        size = path.stat().st_size
        if size != entry["size"]:
            raise CorruptCheckpointError(f"{path}: {size} bytes, the manifest says {entry['size']}")
    for path, entry, digest in zip(paths, files.values(), _hash_files(paths), strict=True):
        if digest != entry["sha256"]:
            raise CorruptCheckpointError(
                f"{path}: its SHA-256 differs from the manifest's (the file changed)"
            )
    return True


def _check_safetensors_header(path: Path) -> None:
    """The header of a safetensors file parses and its tensors end within the file."""
    from safetensors import safe_open

    if not path.is_file():
        raise CorruptCheckpointError(f"{path}: missing")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            f.keys()
    except Exception as exc:  # SafetensorError
        raise CorruptCheckpointError(f"{path}: not a readable safetensors file ({one_line(exc)})") from None


# ---------------------------------------------------------------------- read and apply


@dataclass(frozen=True)
class CheckpointContents:
    """Everything a checkpoint holds for one process, read and decoded but not yet applied."""

    path: Path
    state: dict[str, Any]  # state.json
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # the optimizer's state_dict
    scheduler: dict[str, Any]  # the scheduler's state_dict
    rng: dict[str, Any] | None  # this process's random states; None when the checkpoint has none for its rank
    legacy: bool  # written before manifests (format 1): the .pt files were read with weights_only=True

    def file(self, kind: str) -> Path:
        """The path of ``kind`` (optimizer, scheduler, rng-<rank>) in this checkpoint's format."""
        if self.legacy:
            return self.path / f"{kind}.pt"
        return self.path / f"{kind}.safetensors"


def read_checkpoint(ckpt: Path, rank: int = 0) -> CheckpointContents:
    """Read and decode every file of a checkpoint that process ``rank`` needs, changing nothing.

    Call :func:`verify_checkpoint` first (once, on one process): this reads the files as they are.

    Raises:
        CorruptCheckpointError: a file is missing, unreadable, not what it should be, or unsafe.
    """
    state = read_state(ckpt)
    legacy = _is_legacy(ckpt)
    trainable = read_trainable(ckpt / TRAINABLE)
    if legacy:
        optimizer = load_legacy_pt(ckpt / "optimizer.pt")
        scheduler = load_legacy_pt(ckpt / "scheduler.pt")
        rng_path = ckpt / f"rng-{rank}.pt"
        rng = load_legacy_pt(rng_path, LEGACY_RNG_GLOBALS) if rng_path.is_file() else None
    else:
        optimizer = load_state_file(ckpt / OPTIMIZER)
        scheduler = load_state_file(ckpt / SCHEDULER)
        rng_path = ckpt / rng_file(rank)
        rng = load_state_file(rng_path) if rng_path.name in _read_manifest(ckpt) else None
    if rng is None and rank < state.get("processes", 1):
        raise CorruptCheckpointError(
            f"{rng_path}: missing (the run had {state.get('processes', 1)} processes)"
        )
    contents = CheckpointContents(ckpt, state, trainable, optimizer, scheduler, rng, legacy)
    for kind, value in (("optimizer", optimizer), ("scheduler", scheduler)):
        if not isinstance(value, dict):
            raise CorruptCheckpointError(
                f"{contents.file(kind)}: not a {kind} state (a {type(value).__name__})"
            )
    if rng is not None:
        try:
            check_rng(rng)
        except (TypeError, ValueError, RuntimeError, KeyError) as exc:
            raise CorruptCheckpointError(
                f"{rng_path}: not this program's random states ({one_line(exc)})"
            ) from None
    return contents


def _check_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Raise ValueError unless ``saved`` is a state of ``optimizer``'s kind for its parameters."""
    state, groups = saved.get("state"), saved.get("param_groups")
    if not isinstance(state, dict) or not isinstance(groups, list):
        raise ValueError("no 'state' and 'param_groups'")
    current = optimizer.param_groups
    if len(groups) != len(current) or any(
        not isinstance(g, dict)
        or not isinstance(g.get("params"), list)
        or len(g["params"]) != len(c["params"])
        for g, c in zip(groups, current, strict=False)
    ):
        raise ValueError("its parameter groups differ from the optimizer's")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved_ids = [i for g in groups for i in g["params"]]
    index = dict(zip(saved_ids, params, strict=False))
    for pid, entry in state.items():
        if pid not in index or not isinstance(entry, dict):
            raise ValueError(f"state of unknown parameter {pid!r}")
        for key, value in entry.items():
            if not isinstance(value, torch.Tensor):
                continue
            shape, expected = tuple(value.shape), tuple(index[pid].shape)
            if value.ndim and shape != expected:
                raise ValueError(f"{key} of parameter {pid} has shape {shape}, the parameter's {expected}")


def _scheduler_mismatch(scheduler: Any, saved: dict[str, Any]) -> list[str]:
    """The entries of ``saved`` that a state of ``scheduler`` cannot hold: a known entry of another type, or
    an unknown one that would overwrite an attribute (load_state_dict updates the scheduler's ``__dict__``)."""
    expected = scheduler.state_dict()
    wrong = [
        str(k)
        for k, v in saved.items()
        if (k in expected and k != "lr_lambdas" and type(v) is not type(expected[k]))
        or (k not in expected and (not isinstance(k, str) or hasattr(scheduler, k)))
    ]
    lambdas = saved.get("lr_lambdas")
    if lambdas is not None and (not isinstance(lambdas, list) or any(fn is not None for fn in lambdas)):
        wrong.append("lr_lambdas")
    return wrong


def apply_checkpoint(
    contents: CheckpointContents, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> None:
    """Load :func:`read_checkpoint`'s ``contents`` into the model's trainable parameters, the optimizer, the
    scheduler and the random generators. Everything is checked against its target first, so on error nothing
    has changed.

    Raises:
        CorruptCheckpointError: a file does not fit the model, optimizer or scheduler (named with the reason).
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    source = contents.path / TRAINABLE
    check_trainable(params, contents.trainable, source)
    try:
        _check_optimizer_state(optimizer, contents.optimizer)
    except (ValueError, TypeError, KeyError) as exc:
        raise CorruptCheckpointError(
            f"{contents.file('optimizer')}: does not fit the optimizer ({one_line(exc)})"
        ) from None
    sched = contents.scheduler
    wrong = _scheduler_mismatch(scheduler, sched)
    if wrong:
        raise CorruptCheckpointError(
            f"{contents.file('scheduler')}: does not fit the learning-rate schedule (entries {wrong[:3]} differ)"
        )
    assign_trainable(model, contents.trainable, source)
    try:
        optimizer.load_state_dict(contents.optimizer)
    except (ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise CorruptCheckpointError(
            f"{contents.file('optimizer')}: does not fit the optimizer ({one_line(exc)})"
        ) from None
    scheduler.load_state_dict(dict(sched))
    if contents.rng is not None:
        restore_rng(contents.rng)


# ---------------------------------------------------------------------- write and rotate


def write_checkpoint(
    tmp: Path,
    final: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
) -> Path:
    """Fill ``tmp`` with the model's trainable weights, optimizer, scheduler and ``state``, then the manifest
    of every file in it (sizes, SHA-256), fsync it and rename it to ``final`` (replacing an older folder of
    the same step). RNG files are written by each process into ``tmp`` (:func:`write_rng`) before this is
    called, so the manifest lists them too."""
    save_trainable(model, tmp / TRAINABLE)
    save_state_file(optimizer.state_dict(), tmp / OPTIMIZER)
    save_state_file(scheduler.state_dict(), tmp / SCHEDULER)
    (tmp / STATE).write_text(json.dumps(state, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    for f in tmp.iterdir():
        with f.open("rb") as fh:
            os.fsync(fh.fileno())
    _write_manifest(tmp, int(state["step"]))  # last: a folder with a valid manifest is whole
    _fsync_dir(tmp)
    replace_dir(tmp, final, old_tag=".old.tmp")  # ".tmp": remove_stale clears one left by a kill
    _fsync_dir(final.parent)
    return final


def rotate_checkpoints(out_dir: Path, keep: int, protect: set[int]) -> None:
    """Remove all but the ``keep`` newest checkpoints, never one whose step is in ``protect`` (the best)."""
    dirs = checkpoint_dirs(out_dir)
    for p in dirs[: max(0, len(dirs) - keep)]:
        if int(p.name[5:]) not in protect:
            shutil.rmtree(p, ignore_errors=True)
