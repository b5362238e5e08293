"""Export of a trained policy as a plain Hugging Face model folder (LoRA adapters merged)."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from w2s_agents.atomic import replace_dir

__all__ = ["EXPORT_META", "export_model"]

logger = logging.getLogger(__name__)

EXPORT_META = "w2s_train.json"
"""File written beside an exported model: how it was trained (method, step, source model)."""


def _merged(adapter_dir: Path, base_path: Path, dtype: torch.dtype) -> nn.Module:
    """The base model freshly loaded on the CPU in ``dtype`` with the adapters merged into it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, local_files_only=True, dtype=dtype)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def export_model(
    model: nn.Module,
    tokenizer: Any,
    out: Path,
    *,
    adapter_dir: Path | None = None,
    base_path: Path | None = None,
    dtype: torch.dtype = torch.float32,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Save ``model`` and ``tokenizer`` to ``out`` with ``save_pretrained``, loadable by ``load_model``.

    A PEFT model saves its adapters to ``adapter_dir``; they are then merged into the base weights: into a
    fresh copy of the base model loaded from ``base_path`` on the CPU in ``dtype`` when it is given (exact even
    when training held the frozen base in lower precision; ``model`` is left as it was), else into ``model``
    itself (``merge_and_unload`` consumes its PEFT wrapper). The weights are saved in ``dtype``. Both folders
    are written under temporary names and renamed when complete.

    Returns:
        ``out``.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload"):
        keep = adapter_dir is not None
        adapter_dir = (
            adapter_dir or Path(tempfile.mkdtemp(dir=out.parent, prefix=".adapter.tmp-")) / "adapter"
        )
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{adapter_dir.name}.tmp-"))
        try:
            model.save_pretrained(tmp)
            replace_dir(tmp, adapter_dir)
            model = (
                _merged(adapter_dir, base_path, dtype) if base_path is not None else model.merge_and_unload()
            )
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            if not keep:
                shutil.rmtree(adapter_dir.parent, ignore_errors=True)
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
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        model.train(was_training)
    logger.info("exported the trained model to %s", out)
    return out
