"""Atomic file writes: a file is either its old content or its complete new content, never half-written."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

__all__ = ["atomic_write", "replace_dir"]


@contextmanager
def atomic_write(path: str | os.PathLike[str], *, encoding: str = "utf-8") -> Iterator[TextIO]:
    """Write a text file atomically: yields a handle on a temporary file beside ``path`` (folders created);
    when the block ends without error the file is flushed, fsynced and renamed over ``path``; on error it is
    removed and ``path`` is left as it was.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding=encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_dir(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, old_tag: str = ".old") -> None:
    """Move the finished folder ``src`` to ``dst``; an existing ``dst`` is moved aside (to a hidden
    ``.<name><old_tag>-<pid>`` beside it) only once ``src`` is complete, then removed, so ``dst`` is always
    either the old folder or the new one. ``old_tag`` lets a caller's clean-up of interrupted writes recognise
    the aside folder."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        old = dst.with_name(f".{dst.name}{old_tag}-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
