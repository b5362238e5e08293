"""Seeding in one place: every random source the project uses is seeded by :func:`seed_everything`."""

from __future__ import annotations

import hashlib
import logging
import os
import random

import numpy as np

__all__ = ["derive_seed", "seed_everything"]

logger = logging.getLogger(__name__)


def seed_everything(seed: int, *, deterministic_torch: bool = False) -> None:
    """Seed Python's ``random``, NumPy and (if installed) torch on every device.

    Args:
        seed: a non-negative integer.
        deterministic_torch: also ask torch for deterministic kernels (slower; needed for bitwise-equal GPU runs).
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return
    torch.manual_seed(seed)
    if deterministic_torch:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    logger.debug("seeded random, numpy and torch with %d", seed)


def derive_seed(base: int, *parts: object) -> int:
    """A reproducible 31-bit seed for a sub-task (e.g. ``derive_seed(run_seed, task_id, sampler)``).

    Unlike ``hash()``, the result does not change between processes (no ``PYTHONHASHSEED`` dependence).
    """
    text = "\x1f".join([str(base), *map(str, parts)])
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:4], "little") & 0x7FFFFFFF
