"""The identity of a training run, and the reuse of a finished one.

A run is identified by its config (bookkeeping keys such as ``checkpoint_every`` aside), the model folder it
starts from and fingerprints of its data (and, for DPO, of its reference). Checkpoints carry the fingerprint,
so a different run in the same folder is refused; a finished run with the same fingerprint is returned as it
is instead of being trained again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from w2s_agents.config import config_to_dict

from .config import BOOKKEEPING_KEYS, TrainConfig, method_key_dict
from .result import RESULT_FILE, TrainResult

__all__ = ["finished_result", "model_identity", "reuse_finished", "run_fingerprint"]

logger = logging.getLogger(__name__)


def model_identity(path: str | Path) -> str:
    """A cheap identity of a model folder: its absolute path, config and tokenizer contents, and the names,
    sizes and modification times of its weight files (reading the weights themselves would cost more than
    it saves)."""
    p = Path(path).expanduser().resolve()
    h = hashlib.sha256(str(p).encode())
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        f = p / name
        if f.is_file():
            h.update(name.encode() + f.read_bytes())
    for f in sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def run_fingerprint(config: TrainConfig, model_path: str | Path, *parts: str) -> str:
    """Identity of a run: the config (bookkeeping keys and other methods' sections aside), the model folder
    (:func:`model_identity`) and the given data fingerprints ``parts``; 16 hex digits."""
    data = method_key_dict(config, config_to_dict(config))
    cfg = {k: v for k, v in data.items() if k not in BOOKKEEPING_KEYS}
    text = json.dumps([cfg, model_identity(model_path), *parts], sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def finished_result(out_dir: Path, fingerprint: str) -> TrainResult | None:
    """The saved result of a finished run with this fingerprint whose exported model still exists, else
    None (also when ``result.json`` is unreadable)."""
    path = out_dir / RESULT_FILE
    if not path.is_file():
        return None
    try:
        result = TrainResult.load(out_dir)
    except (ValueError, KeyError, TypeError):
        return None
    if result.fingerprint == fingerprint and (result.model_dir / "config.json").is_file():
        return result
    return None


def reuse_finished(out_dir: Path, fingerprint: str, *, resume: bool) -> TrainResult | None:
    """The result of this run when ``resume`` and it already finished in ``out_dir`` (:func:`finished_result`;
    logged), else None: the run is to be trained."""
    if resume and (done := finished_result(out_dir, fingerprint)) is not None:
        logger.info("%s: this run already finished; returning its result", out_dir)
        return done
    return None
