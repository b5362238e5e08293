"""Export of a trained policy as a plain Hugging Face model folder (LoRA adapters merged)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["EXPORT_META", "export_model"]

logger = logging.getLogger(__name__)

EXPORT_META = "w2s_train.json"
"""File written beside an exported model: how it was trained (method, step, source model)."""


def _replace_dir(src: Path, dst: Path) -> None:
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def export_model(
    model: nn.Module,
    tokenizer: Any,
    out: Path,
    *,
    adapter_dir: Path | None = None,
    dtype: torch.dtype = torch.float32,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Save ``model`` and ``tokenizer`` to ``out`` with ``save_pretrained``, loadable by ``load_model``.

    A PEFT model first saves its adapters to ``adapter_dir`` (when given) and is then merged into its base
    weights (``merge_and_unload``; this consumes the PEFT wrapper). The weights are saved in ``dtype``. Both
    folders are written under temporary names and renamed when complete.

    Returns:
        ``out``.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload"):
        if adapter_dir is not None:
            tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{adapter_dir.name}.tmp-"))
            try:
                model.save_pretrained(tmp)
                _replace_dir(tmp, adapter_dir)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        model = model.merge_and_unload()
    model = model.to(dtype)
    if getattr(model.config, "use_cache", None) is False:  # turned off for gradient checkpointing
        model.config.use_cache = True
    was_training = model.training
    model.eval()
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / EXPORT_META).write_text(json.dumps(meta or {}, indent=2) + "\n", encoding="utf-8")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        model.train(was_training)
    logger.info("exported the trained model to %s", out)
    return out
