"""Logging set-up and progress bars.

Library code logs through :mod:`logging` (``logging.getLogger(__name__)``) and shows progress with
:func:`progress`; only the CLI prints. :func:`setup_logging` is called once by the CLI (or by a script) to send
records to stderr and, optionally, to a run's log file.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

__all__ = ["progress", "progress_enabled", "setup_logging"]

T = TypeVar("T")

_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
_DATEFMT = "%H:%M:%S"


class _TqdmHandler(logging.StreamHandler):
    """Writes records through tqdm so that log lines do not break a live progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # pragma: no cover - same contract as logging.Handler.emit
            self.handleError(record)


def setup_logging(level: str | int = "INFO", log_file: str | os.PathLike[str] | None = None) -> None:
    """Configure the ``w2s_agents`` logger: records to stderr, and to ``log_file`` (appended) when given.

    Idempotent: calling it again replaces the handlers it installed before. Noisy third-party loggers
    (transformers, ray, urllib3) are kept at WARNING.
    """
    root = logging.getLogger("w2s_agents")
    for handler in list(root.handlers):
        if getattr(handler, "_w2s", False):
            root.removeHandler(handler)
            handler.close()
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    root.setLevel(numeric)
    root.propagate = False
    console = _TqdmHandler(sys.stderr)
    console.setFormatter(logging.Formatter(_FORMAT, _DATEFMT))
    console._w2s = True  # type: ignore[attr-defined]
    root.addHandler(console)
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file, encoding="utf-8")
        fh.setFormatter(logging.Formatter(_FORMAT, "%Y-%m-%d %H:%M:%S"))
        fh._w2s = True  # type: ignore[attr-defined]
        root.addHandler(fh)
    for name in ("transformers", "ray", "urllib3", "datasets", "accelerate", "peft", "trl"):
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))


def progress_enabled() -> bool:
    """Whether progress bars are shown: ``W2S_PROGRESS=0|1`` decides, else only when stderr is a terminal."""
    env = os.environ.get("W2S_PROGRESS")
    if env is not None:
        return env.strip().lower() not in ("0", "false", "no", "off", "")
    return sys.stderr.isatty()


def progress(
    iterable: Iterable[T] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    **kwargs: Any,
) -> tqdm:
    """A tqdm progress bar on stderr that hides itself when progress is disabled (see :func:`progress_enabled`).

    Use it as an iterable wrapper or manually (``bar.update(n)``, ``bar.set_postfix(success=...)``).
    """
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        disable=not progress_enabled(),
        dynamic_ncols=True,
        file=sys.stderr,
        **kwargs,
    )
