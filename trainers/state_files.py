"""The files a checkpoint is made of, each written and read without unpickling anything: trainable weights,
nested states (optimizer, scheduler), random states, and the reader of the earlier ``.pt`` files.

* Trainable weights (:func:`save_trainable`, :func:`read_trainable`, :func:`assign_trainable`): the trainable
  parameters by name in a safetensors file, copied into a model only after their names and shapes are checked.
* State files (:func:`save_state_file`, :func:`load_state_file`): a nested state (dicts, lists, tuples,
  numbers, strings, None, tensors, numeric NumPy arrays) as a safetensors file, the tensors as its tensors and
  the rest as JSON in its header; reading one runs no code from it.
* Random states (:func:`capture_rng`, :func:`write_rng`, :func:`check_rng`, :func:`restore_rng`): Python,
  NumPy and torch (CPU and CUDA) random states of one process, checked on fresh generators before any global
  generator is changed.
* Checkpoint format 1 (:func:`load_legacy_pt`): ``optimizer.pt``, ``scheduler.pt`` and ``rng-<rank>.pt`` are
  loaded with ``torch.load(weights_only=True)``, which unpickles tensors and plain containers only; the one
  extra type allowed is the NumPy ``uint32`` array of the legacy NumPy random state
  (:data:`LEGACY_RNG_GLOBALS`). A file that names anything else is refused.

Every reader raises :class:`CorruptCheckpointError` naming the file and the reason. The checkpoint folder
around these files (manifest, verification, reading, applying, writing, rotation) is :mod:`.checkpoint`.
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from w2s_agents.errors import W2SError

__all__ = [
    "LEGACY_RNG_GLOBALS",
    "CorruptCheckpointError",
    "assign_trainable",
    "capture_rng",
    "check_rng",
    "check_trainable",
    "load_legacy_pt",
    "load_state_file",
    "load_trainable",
    "one_line",
    "read_trainable",
    "restore_rng",
    "rng_file",
    "save_state_file",
    "save_trainable",
    "trainable_state",
    "write_rng",
]

_STATE_KEY = "w2s_state"  # safetensors header entry holding the JSON structure of a state file
_TAG = "__w2s__"  # marks a JSON object that encodes a tensor, tuple, array, non-finite float or non-str-keyed dict

_NUMPY_CORE = np._core if hasattr(np, "_core") else np.core  # NumPy 2 / 1
LEGACY_RNG_GLOBALS: tuple[Any, ...] = (
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
    _NUMPY_CORE.multiarray._reconstruct,
)
"""The only globals a legacy ``rng-<rank>.pt`` may name besides torch's own: the NumPy array of the
MT19937 state (``ndarray``, its ``_reconstruct``, ``dtype`` and the ``uint32`` dtype class)."""


class CorruptCheckpointError(W2SError):
    """A checkpoint file is missing, damaged, foreign or unsafe; the message names the file and the reason."""


def one_line(text: object, limit: int = 200) -> str:
    """``text`` (an exception's message, say) on one line of at most ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------- state files (no pickle)


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {_TAG: "float", "value": repr(obj)}
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {_TAG: "tensor", "key": key}
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise TypeError(f"cannot store a NumPy array of dtype {obj.dtype} in a state file")
        return {
            _TAG: "ndarray",
            "dtype": obj.dtype.str,
            "shape": list(obj.shape),
            "data": obj.ravel().tolist(),
        }
    if isinstance(obj, np.generic):
        return _encode(obj.item(), tensors)
    if isinstance(obj, tuple):
        return {_TAG: "tuple", "items": [_encode(x, tensors) for x in obj]}
    if isinstance(obj, list):
        return [_encode(x, tensors) for x in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and _TAG not in obj:
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {_TAG: "dict", "items": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    raise TypeError(f"cannot store a {type(obj).__name__} in a state file")


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [_decode(x, tensors) for x in node]
    if not isinstance(node, dict):
        raise ValueError(f"unexpected JSON value {type(node).__name__}")
    tag = node.get(_TAG)
    if tag is None:
        return {k: _decode(v, tensors) for k, v in node.items()}
    if tag == "tensor":
        if node.get("key") not in tensors:
            raise ValueError(f"it refers to tensor {node.get('key')!r}, which it does not hold")
        return tensors[node["key"]]
    if tag == "tuple":
        return tuple(_decode(x, tensors) for x in node["items"])
    if tag == "dict":
        return {_decode(k, tensors): _decode(v, tensors) for k, v in node["items"]}
    if tag == "float":
        if node["value"] not in ("nan", "inf", "-inf"):
            raise ValueError(f"bad float {node['value']!r}")
        return float(node["value"])
    if tag == "ndarray":
        dtype = np.dtype(node["dtype"])
        if dtype.kind not in "biuf":
            raise ValueError(f"array of dtype {dtype} (only numbers are stored)")
        return np.asarray(node["data"], dtype=dtype).reshape([int(n) for n in node["shape"]])
    raise ValueError(f"unknown entry {tag!r}")


def save_state_file(obj: Any, path: Path) -> None:
    """Write a nested state (dicts, lists, tuples, numbers, strings, None, tensors, numeric NumPy arrays) to a
    safetensors file: the tensors as its tensors, the rest as JSON in its header. No pickle is involved, so
    :func:`load_state_file` runs no code from the file.

    Raises:
        TypeError: ``obj`` holds a value of another type.
    """
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    structure = json.dumps(_encode(obj, tensors), allow_nan=False, separators=(",", ":"))
    save_file(tensors, str(path), metadata={_STATE_KEY: structure})


def load_state_file(path: Path) -> Any:
    """The state a :func:`save_state_file` file holds (tensors on the CPU, tuples as tuples).

    Raises:
        CorruptCheckpointError: the file is missing, not a safetensors file, truncated, or not a state file.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{path}: missing") from None
    except Exception as exc:  # safetensors raises its own SafetensorError and OSError kinds
        raise CorruptCheckpointError(f"{path}: not a readable safetensors file ({one_line(exc)})") from None
    if _STATE_KEY not in meta:
        raise CorruptCheckpointError(f"{path}: not a w2s state file (no {_STATE_KEY!r} in its header)")
    try:
        return _decode(json.loads(meta[_STATE_KEY]), tensors)
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{path}: malformed state ({one_line(exc)})") from None


def load_legacy_pt(path: Path, allowed: tuple[Any, ...] = ()) -> Any:
    """A checkpoint-format-1 ``.pt`` file through torch's weights-only unpickler (``allowed``: extra globals)."""
    if not path.is_file():
        raise CorruptCheckpointError(f"{path}: missing")
    try:
        if allowed:
            safe_globals = getattr(torch.serialization, "safe_globals", None)
            if safe_globals is None:  # torch < 2.5
                raise CorruptCheckpointError(
                    f"{path}: an old-format random-state file; reading it safely needs torch >= 2.5"
                )
            with safe_globals(list(allowed)):
                return torch.load(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except CorruptCheckpointError:
        raise
    except Exception as exc:  # UnpicklingError, EOFError, RuntimeError (bad zip), ...
        named = re.search(r"GLOBAL (\S+)", str(exc))
        if named:
            raise CorruptCheckpointError(
                f"{path}: refused: the pickle names {named.group(1)}, which a checkpoint never holds "
                "(checkpoints are read without running code from them)"
            ) from None
        lines = [ln for ln in str(exc).splitlines() if ln.strip() and "Weights only load failed" not in ln]
        detail = next((ln for ln in lines if ln.startswith("Unsupported")), lines[0] if lines else "")
        raise CorruptCheckpointError(
            f"{path}: not a torch file that loads with weights_only=True ({type(exc).__name__}"
            f"{': ' + one_line(detail) if detail else ''})"
        ) from None


# ---------------------------------------------------------------------- trainable weights


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name (tied weights once), detached on the CPU."""
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_trainable(model: nn.Module, path: Path) -> None:
    """Write the trainable parameters to a safetensors file."""
    from safetensors.torch import save_file

    save_file(trainable_state(model), str(path))


def read_trainable(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a :func:`save_trainable` file, on the CPU.

    Raises:
        CorruptCheckpointError: the file is missing, truncated or not a safetensors file.
    """
    from safetensors.torch import load_file

    if not path.is_file():
        raise CorruptCheckpointError(f"{path}: missing")
    try:
        return load_file(str(path))
    except Exception as exc:  # SafetensorError, OSError
        raise CorruptCheckpointError(f"{path}: not a readable safetensors file ({one_line(exc)})") from None


def assign_trainable(model: nn.Module, saved: dict[str, torch.Tensor], source: Path) -> None:
    """Copy ``saved`` into ``model``'s trainable parameters of the same names, after checking that the names
    and shapes match (the model is unchanged when they do not).

    Raises:
        CorruptCheckpointError: ``saved`` misses a trainable parameter, holds one the model does not have, or
            holds one of another shape (``source`` is named in the message).
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    check_trainable(params, saved, source)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name].to(p.device, p.dtype))


def check_trainable(params: dict[str, nn.Parameter], saved: dict[str, torch.Tensor], source: Path) -> None:
    """Check that ``saved`` holds exactly the trainable parameters ``params``, each of its shape.

    Raises:
        CorruptCheckpointError: a name is missing or unexpected, or a shape differs (``source`` is named).
    """
    missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    if missing or unexpected:
        raise CorruptCheckpointError(
            f"{source}: checkpoint does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for name, p in params.items():
        if tuple(saved[name].shape) != tuple(p.shape):
            raise CorruptCheckpointError(
                f"{source}: {name} has shape {tuple(saved[name].shape)}, the model's {tuple(p.shape)}"
            )


def load_trainable(model: nn.Module, path: Path) -> None:
    """Copy the tensors of a :func:`save_trainable` file into ``model``'s parameters of the same names.

    Raises:
        CorruptCheckpointError: the file is unreadable or does not match the model's trainable parameters.
    """
    assign_trainable(model, read_trainable(path), path)


# ---------------------------------------------------------------------- random states


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


def rng_file(rank: int) -> str:
    """The name of process ``rank``'s random-state file in a checkpoint."""
    return f"rng-{rank}.safetensors"


def write_rng(folder: Path, rank: int) -> Path:
    """Write this process's :func:`capture_rng` into ``folder`` (a checkpoint being written) and return it."""
    path = folder / rng_file(rank)
    save_state_file(capture_rng(), path)
    return path


def check_rng(state: Any) -> None:
    """Raise ValueError/TypeError/RuntimeError unless :func:`restore_rng` can apply ``state`` completely; no
    global generator is touched (the states are tried on fresh generators)."""
    if not isinstance(state, dict) or not {"python", "numpy", "torch"} <= state.keys():
        raise ValueError("not a random-state file (it needs python, numpy and torch states)")
    random.Random().setstate(state["python"])
    np.random.RandomState().set_state(state["numpy"])
    torch.Generator().set_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None:
        if not isinstance(cuda, (list, tuple)) or not all(
            isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.ndim == 1 for t in cuda
        ):
            raise ValueError("the CUDA states are not byte tensors")
        if torch.cuda.is_available() and len(cuda) > torch.cuda.device_count():
            raise ValueError(f"{len(cuda)} CUDA states for {torch.cuda.device_count()} devices")


def restore_rng(state: dict[str, Any]) -> None:
    """Restore :func:`capture_rng`'s output (the CUDA states only where CUDA is available).

    Raises:
        ValueError: ``state`` is not such an output (checked before any generator is changed).
    """
    try:
        check_rng(state)
    except (TypeError, RuntimeError) as exc:
        raise ValueError(one_line(exc)) from None
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
