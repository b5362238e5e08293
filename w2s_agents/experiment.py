"""The experiment config: every section of a w2s-agents run in one typed object.

``ExperimentConfig`` is what ``w2s`` commands read from a YAML file plus ``key.sub=value`` overrides. Its
defaults, which live in the section dataclasses (one source of truth per fact), are the embedded default
config: the CPU quickstart, used when no file is given. ``configs/quickstart.yaml`` spells the same experiment
out as a starting point for copies (a test keeps the two equal).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from w2s_agents.config import check, load_config, option, save_config
from w2s_agents.models import ModelConfig

__all__ = ["ExperimentConfig", "RunConfig", "load_experiment", "prepare_run_dir"]


@dataclass(frozen=True)
class RunConfig:
    """Where a run writes and how it is seeded."""

    name: str = option("quickstart", "run name; outputs go to <out_dir>/<name>/")
    out_dir: Path = option(Path("runs"), "folder holding one sub-folder per run")
    seed: int = option(0, "seed of every random source of the run (derived per stage and episode)")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = option("INFO", "logging level")

    def __post_init__(self) -> None:
        check(
            re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name) is not None,
            "name",
            f"must be letters, digits, '.', '_' or '-' (it names a folder), got {self.name!r}",
        )
        check(self.seed >= 0, "seed", f"must be non-negative, got {self.seed}")

    @property
    def run_dir(self) -> Path:
        """The run's output folder."""
        return self.out_dir / self.name


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole weak-to-strong experiment."""

    run: RunConfig = option(default_factory=RunConfig, help="run name, output folder, seed, logging")
    weak: ModelConfig = option(
        default_factory=lambda: ModelConfig(tiny_preset="weak"),
        help="the weak agent (explorer, DPO reference)",
    )
    strong: ModelConfig = option(
        default_factory=lambda: ModelConfig(tiny_preset="strong"), help="the strong agent that is trained"
    )


def load_experiment(
    path: str | os.PathLike[str] | None = None, overrides: Iterable[str] = ()
) -> ExperimentConfig:
    """Load an :class:`ExperimentConfig` from ``path`` (the embedded defaults when None) and overrides.

    Raises:
        ConfigError: unknown key, wrong type or failed check, naming file:line or the override.
    """
    return load_config(ExperimentConfig, path, overrides)


def prepare_run_dir(cfg: ExperimentConfig) -> Path:
    """Create the run folder and save the resolved config in it as ``config.yaml``; return the folder."""
    run_dir = cfg.run.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir)
    return run_dir
