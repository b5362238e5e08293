"""What command-line arguments name: a config file with ``KEY=VALUE`` overrides, tree files and folders."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from w2s_agents.errors import W2SError

__all__ = ["split_config_args", "tree_files"]


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
