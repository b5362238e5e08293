"""What command-line arguments name: a config file with ``KEY=VALUE`` overrides, tree files and folders, and
the folders and files a command will write (checked before it writes anything)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from w2s_agents.errors import W2SError

__all__ = ["check_output_dir", "check_output_file", "split_config_args", "tree_files"]


def split_config_args(args: Sequence[str]) -> tuple[str | None, list[str]]:
    """Split positional arguments into an optional config path and ``key=value`` overrides."""
    paths = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    if len(paths) > 1:
        raise W2SError(f"expected at most one config file, got {', '.join(paths)} (overrides are KEY=VALUE)")
    return (paths[0] if paths else None), overrides


def tree_files(names: Sequence[str]) -> list[Path]:
    """Tree files named directly or found (``*.json``) in named folders, sorted; W2SError when none."""
    files: list[Path] = []
    for name in names:
        p = Path(name)
        if p.is_dir():
            found = sorted(p.glob("*.json"))
            if not found:
                raise W2SError(f"no tree files (*.json) in folder {p}")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise W2SError(f"tree file or folder not found: {p}")
    return files


def _check_creatable(folder: Path, what: str, target: Path) -> None:
    """Raise unless ``folder`` is a writable folder or can be created (its nearest existing ancestor is one)."""
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise W2SError(f"{what} {target}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise W2SError(f"{what} {target}: folder {existing} is not writable")


def check_output_dir(path: str | os.PathLike[str], what: str) -> Path:
    """Check that ``path`` can be an output folder (an existing folder, or one that can be created) before a
    command writes anything; ``what`` names it in the message (e.g. ``"-o/--out"``).

    Raises:
        W2SError: ``path`` is an existing file, lies below a file, or its folder is not writable.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise W2SError(f"{what} {p}: is an existing file; give a folder")
    _check_creatable(p, what, p)
    return p


def check_output_file(path: str | os.PathLike[str], what: str) -> Path:
    """Check that ``path`` can be written as a file (it is a writable file or can be created) before a command
    writes anything; ``what`` names it in the message (e.g. a config key).

    Raises:
        W2SError: ``path`` is a folder, lies below a file, or cannot be written.
    """
    p = Path(path)
    if p.is_dir():
        raise W2SError(f"{what} {p}: is a folder; give a file path")
    if p.exists() and not os.access(p, os.W_OK):
        raise W2SError(f"{what} {p}: the file is not writable")
    _check_creatable(p.parent, what, p)
    return p
