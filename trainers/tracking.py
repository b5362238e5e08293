"""Experiment tracking: a run's numbers sent to TensorBoard and Weights & Biases (``report_to``, as in TRL).

One interface, :class:`Tracker`: ``log`` scalars at a step, ``log_config`` once, ``log_summary`` at the end,
``finish``. Two backends: :class:`TensorBoardTracker` (event files through ``torch.utils.tensorboard``) and
:class:`WandbTracker` (one W&B run). :class:`TrackingSpec` says where a run is tracked and under which names;
:meth:`TrackingSpec.open` opens its backends as one :class:`Trackers`. The training loop reports through it
(:mod:`.reporting`), and so do the pipeline's rollout and search stages.

The packages are optional: ``pip install "w2s-agents[tracking]"``. A tracker whose package is missing fails
when it is opened (or earlier, with :func:`check_backends`) with one line naming the config key and the extra.

TensorBoard: the event files of a run go to ``TrackingSpec.tensorboard_dir``; a session that starts at step
``s`` hides the events at or after ``s`` that an earlier session in the folder wrote (``purge_step``), so a
resumed or redone run shows one curve.

Weights & Biases: the mode is ``WANDB_MODE`` when set, else online when an API key is known (``WANDB_API_KEY``
or a netrc entry for the W&B host) and offline otherwise, with no network (``wandb sync <dir>`` uploads an
offline run later). Runs go to ``<wandb_dir>/wandb/``; so that nothing is written under the home folder,
``WANDB_CONFIG_DIR``, ``WANDB_CACHE_DIR`` and ``WANDB_DATA_DIR`` default to ``<wandb_dir>/wandb/.config``,
``.cache`` and ``.data`` while a run starts when they are not set. The project is ``WANDB_PROJECT`` or
``w2s-agents``. A run opened with an ``identity`` gets the id made of its name and that identity and continues
the W&B run of that id if there is one (a resumed training run passes the identity its first session drew:
:mod:`.reporting`); without one W&B draws a new id.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import netrc
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from w2s_agents.errors import W2SError

from .config import ReportTo

__all__ = [
    "REPORT_TO",
    "TRACKING_EXTRA",
    "TensorBoardTracker",
    "Tracker",
    "Trackers",
    "TrackingSpec",
    "WandbTracker",
    "check_backends",
    "scalars",
    "wandb_run_id",
]

logger = logging.getLogger(__name__)

REPORT_TO: tuple[str, ...] = ("tensorboard", "wandb")
"""The trackers ``report_to`` may name."""

TRACKING_EXTRA = 'pip install "w2s-agents[tracking]"'
"""How to install every tracker's package."""

_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # tracker -> the package it needs


class Tracker(Protocol):
    """Where a run's numbers go."""

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Record scalars (``{"train/loss": 0.7}``) at an optimizer step (or 0 for a stage's one record)."""

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Record the run's settings once (a JSON-safe nested mapping)."""

    def log_summary(self, values: Mapping[str, float]) -> None:
        """Record the run's final numbers (W&B summary; TensorBoard scalars at the last step logged)."""

    def finish(self, *, failed: bool = False) -> None:
        """Flush and close; ``failed`` marks a run that stopped with an error."""


def check_backends(report_to: Sequence[str], key: str) -> None:
    """Check that every tracker of ``report_to`` is known and its package installed.

    Raises:
        W2SError: one line naming ``key``, the tracker and how to install it.
    """
    for name in report_to:
        if name not in _PACKAGES:
            raise W2SError(f"{key}: unknown tracker {name!r}; trackers are {', '.join(REPORT_TO)}")
        package = _PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            raise W2SError(
                f"{key} lists {name}, but the package {package!r} is not installed: {TRACKING_EXTRA} "
                f"(or pip install {package})"
            )


def scalars(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a nested mapping as flat scalars: ``{"a": {"b": 1}}`` -> ``{prefix + "a/b": 1.0}``.
    Booleans become 0 or 1; strings, lists and None are left out."""
    out: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(scalars(value, name + "/"))
        elif isinstance(value, (bool, int, float)):
            out[name] = float(value)
    return out


def wandb_run_id(name: str, identity: str) -> str:
    """A W&B run id from a run's name and identity: letters, digits, ``-``, ``_``, ``.``; at most 64."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")[:47] or "run"
    return f"{slug}-{re.sub(r'[^A-Za-z0-9]', '', identity)[:16]}"


class TensorBoardTracker:
    """Scalars, a config text and summary scalars in TensorBoard event files under ``log_dir``.

    ``start_step``: the first step this session logs; events at or after it from an earlier session in the
    folder are hidden (``SummaryWriter(purge_step=...)``).
    """

    def __init__(self, log_dir: Path, *, start_step: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = log_dir
        self.writer = SummaryWriter(str(log_dir), purge_step=start_step)
        self.last_step = start_step

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Add each scalar at ``step``."""
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, float(value), step)
        self.last_step = max(self.last_step, step)

    def log_config(self, config: Mapping[str, Any]) -> None:
        """The settings as an indented JSON text (tag ``config``)."""
        text = json.dumps(config, indent=1, sort_keys=True, default=str)
        self.writer.add_text("config", "    " + text.replace("\n", "\n    "), self.last_step)

    def log_summary(self, values: Mapping[str, float]) -> None:
        """Each value as a scalar at the last step logged."""
        self.log(values, self.last_step)

    def finish(self, *, failed: bool = False) -> None:
        """Flush and close the event file."""
        self.writer.close()


def _wandb_api_key_known() -> bool:
    """Whether W&B has an API key: ``WANDB_API_KEY``, or a netrc entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


@contextlib.contextmanager
def _wandb_dirs(root: Path) -> Iterator[None]:
    """While a W&B run starts: its config, cache and data folders under ``root`` unless the user set them."""
    defaults = {"WANDB_CONFIG_DIR": ".config", "WANDB_CACHE_DIR": ".cache", "WANDB_DATA_DIR": ".data"}
    added = [var for var in defaults if not os.environ.get(var)]
    for var in added:
        os.environ[var] = str(root / defaults[var])
    try:
        yield
    finally:
        for var in added:
            os.environ.pop(var, None)


class WandbTracker:
    """One Weights & Biases run (see the module docstring for its mode, folders, project and id)."""

    def __init__(
        self,
        wandb_dir: Path,
        *,
        name: str,
        run_id: str | None,
        group: str | None = None,
        job_type: str | None = None,
        config: Mapping[str, Any] | None = None,
        key: str = "report_to",
    ) -> None:
        import wandb

        wandb_dir.mkdir(parents=True, exist_ok=True)
        mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_api_key_known() else "offline")
        try:
            with _wandb_dirs(wandb_dir.resolve() / "wandb"):
                self.run = wandb.init(
                    dir=str(wandb_dir.resolve()),
                    project=os.environ.get("WANDB_PROJECT") or "w2s-agents",
                    name=name,
                    id=run_id,
                    resume="allow" if run_id else None,
                    group=group,
                    job_type=job_type,
                    config=dict(config or {}),
                    mode=mode,  # type: ignore[arg-type]
                    settings=wandb.Settings(console="off"),
                )
        except Exception as exc:  # wandb raises its own errors (no network, bad key): one line instead
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise W2SError(
                f"{key}: could not start the W&B run {name!r} in {wandb_dir} (mode {mode}): {first}; "
                "WANDB_MODE=offline runs without a network"
            ) from exc
        self.mode = mode
        logger.info("W&B run %s (%s): %s", name, mode, self.run.dir)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Log the scalars at ``step`` (W&B's own step)."""
        self.run.log(dict(metrics), step=step)

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Add the settings to the run's config."""
        self.run.config.update(dict(config), allow_val_change=True)

    def log_summary(self, values: Mapping[str, float]) -> None:
        """Set the run's summary values."""
        self.run.summary.update(dict(values))

    def finish(self, *, failed: bool = False) -> None:
        """Finish the run (exit code 1 when ``failed``)."""
        self.run.finish(exit_code=1 if failed else 0)


class Trackers:
    """Every tracker of a run as one :class:`Tracker` (none: it does nothing). Non-finite values are left out
    of ``log`` and ``log_summary`` (W&B refuses them in its summary; a NaN loss stops training anyway)."""

    def __init__(self, trackers: Sequence[Tracker] = ()) -> None:
        self.trackers = list(trackers)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Log finite scalars at ``step`` to every tracker."""
        finite = {k: float(v) for k, v in metrics.items() if math.isfinite(v)}
        for t in self.trackers:
            t.log(finite, step)

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Log the settings to every tracker."""
        for t in self.trackers:
            t.log_config(config)

    def log_summary(self, values: Mapping[str, float]) -> None:
        """Log the final finite numbers to every tracker."""
        finite = {k: float(v) for k, v in values.items() if math.isfinite(v)}
        for t in self.trackers:
            t.log_summary(finite)

    def finish(self, *, failed: bool = False) -> None:
        """Finish every tracker (each is tried even when an earlier one fails)."""
        errors = []
        for t in self.trackers:
            try:
                t.finish(failed=failed)
            except Exception as exc:  # one tracker's failure to flush must not hide the others' files
                errors.append(exc)
        self.trackers = []
        if errors:
            raise errors[0]


@dataclass(frozen=True)
class TrackingSpec:
    """Where a run is tracked and under which names."""

    report_to: tuple[ReportTo, ...]  # the trackers; empty: none
    tensorboard_dir: Path  # the run's event files
    wandb_dir: Path  # wandb.init(dir=...): the W&B runs go to <wandb_dir>/wandb/
    name: str  # the W&B run's name
    group: str | None = None  # W&B group (``w2s run``: the run name)
    job_type: str | None = None  # W&B job type (``w2s run``: the stage)
    key: str = "report_to"  # the config key that chose the trackers (named in errors)
    config: Mapping[str, Any] = field(default_factory=dict)  # logged with the run's own settings

    @classmethod
    def under(cls, report_to: Sequence[ReportTo], out_dir: Path, job_type: str) -> TrackingSpec:
        """A run tracked in its own folder: event files in ``out_dir/tb/``, W&B runs in ``out_dir/wandb/``,
        named after the folder (standalone ``w2s train``: key ``train.report_to``)."""
        return cls(
            report_to=tuple(report_to),
            tensorboard_dir=out_dir / "tb",
            wandb_dir=out_dir,
            name=out_dir.resolve().name,
            job_type=job_type,
            key="train.report_to",
        )

    def open(
        self, *, identity: str | None = None, start_step: int = 0, config: Mapping[str, Any] | None = None
    ) -> Trackers:
        """Open every tracker of ``report_to`` and log ``config`` (merged over the spec's).

        Args:
            identity: the W&B run id is made of the name and it, and the run of that id is continued (a
                resumed training run); None: a new W&B run.
            start_step: the first step this session logs (TensorBoard hides an earlier session's events from
                there on).
            config: the run's own settings.

        Raises:
            W2SError: a tracker's package is missing, or the W&B run cannot start.
        """
        check_backends(self.report_to, self.key)
        opened: list[Tracker] = []
        try:
            for backend in self.report_to:
                if backend == "tensorboard":
                    opened.append(TensorBoardTracker(self.tensorboard_dir, start_step=start_step))
                else:
                    opened.append(
                        WandbTracker(
                            self.wandb_dir,
                            name=self.name,
                            run_id=wandb_run_id(self.name, identity) if identity else None,
                            group=self.group,
                            job_type=self.job_type,
                            key=self.key,
                        )
                    )
        except BaseException:
            with contextlib.suppress(Exception):  # the error that stopped the opening is the one to report
                Trackers(opened).finish(failed=True)
            raise
        trackers = Trackers(opened)
        trackers.log_config({**self.config, **(config or {})})
        return trackers
