"""Ablation sweeps behind ``w2s sweep``: a grid of ``w2s run`` experiments that share their common stages.

``w2s sweep CONFIG KEY=v1,v2 [KEY2=w1,w2 ...] [KEY=v ...]``: an argument whose value has a comma outside brackets
and quotes is a grid axis, any other ``KEY=v`` a plain override applied to every point. Every point of the grid
(the axes' product, first axis slowest) is the experiment of ``CONFIG`` with the plain overrides and its axis
values, run by :func:`~w2s_agents.pipeline.runner.run_pipeline` in ``<run.out_dir>/<run.name>-sweep/<point>/``
(``run.name`` of each point is its folder name, e.g. ``explore.width-4``). Every point's config is loaded and
validated before anything runs.

Shared stages. A stage's key hashes its config part, its version and the keys of the stages it reads
(:mod:`w2s_agents.pipeline.cache`), so two points whose stage has the same key would compute the same outputs.
Before a point runs, each of its stage folders that does not exist yet (or is a link of an earlier sweep that no
longer matches) becomes a relative symbolic link to the real folder of the first point of the sweep that finished
that stage with that key; the point's normal key check then finds ``_done.json`` with its own key and reuses the
folder. A tree-width sweep so trains the tasks, demos, models and both SFT baselines once. Links are safe because
no stage writes into the folder of another stage, and paths recorded inside a linked folder (``models.json``,
``model.json``) point at the first point's folders, which the link keeps in use. If the first point's folder is
later moved aside or deleted, the next sweep removes the dangling link and the stage runs (or links) again.

Resuming: each point is a resumable run, so running the same command again reuses every finished point and
stage, and a killed sweep carries on in the point where it stopped. After every point, and with
:func:`report_sweep` at any time, ``sweep.json``, ``sweep.md`` and ``sweep.png`` are rewritten from the points
that have finished (:mod:`w2s_agents.pipeline.sweep_report`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from w2s_agents.errors import ConfigError, W2SError
from w2s_agents.pipeline.cache import StageRecord, link_finished_stages, stage_keys
from w2s_agents.pipeline.experiment import ExperimentConfig, load_experiment
from w2s_agents.pipeline.runner import build_stages, run_pipeline
from w2s_agents.pipeline.sweep_report import sweep_summary, write_sweep_outputs

__all__ = [
    "SweepPlan",
    "SweepPoint",
    "SweepResult",
    "link_shared_stages",
    "parse_grid",
    "plan_sweep",
    "point_name",
    "report_sweep",
    "run_sweep",
    "split_values",
]

logger = logging.getLogger(__name__)

_OPEN, _CLOSE = "[{(", "]})"
# axes that would move the points out of the sweep folder
_NOT_AXES = ("run.name", "run.out_dir")
_MAX_NAME = 200  # point folder names stay well below the usual 255-byte limit


@dataclass(frozen=True)
class SweepPoint:
    """One experiment of the grid."""

    name: str
    """Folder name and ``run.name`` of the point (``explore.width-4``; axes joined by ``__``)."""
    values: dict[str, str]
    """Axis key -> value as written on the command line, in axis order."""
    config: ExperimentConfig
    """The validated config of the point (its run folder is ``<sweep folder>/<name>``)."""

    @property
    def run_dir(self) -> Path:
        """The point's run folder."""
        return self.config.run.run_dir


@dataclass(frozen=True)
class SweepPlan:
    """A whole sweep, every point validated (see :func:`plan_sweep`)."""

    config_path: str | None
    """The base config file (None: the embedded default)."""
    axes: dict[str, list[str]]
    """Axis key -> values as written, in command-line order (the first axis is the plot's x axis)."""
    overrides: list[str]
    """Plain ``KEY=VALUE`` overrides applied to every point."""
    directory: Path
    """``<run.out_dir>/<run.name>-sweep``."""
    points: list[SweepPoint]


@dataclass
class SweepResult:
    """What :func:`run_sweep` or :func:`report_sweep` produced."""

    plan: SweepPlan
    summary: dict[str, Any]
    """The content of ``sweep.json``."""
    files: list[Path]
    """``sweep.json``, ``sweep.md`` and (with plots) ``sweep.png``."""
    records: dict[str, dict[int, list[StageRecord]]] = field(default_factory=dict)
    """Per point that ran in this call: its stage records per run seed."""
    linked: dict[str, list[str]] = field(default_factory=dict)
    """Per point that ran in this call: the stage folders (``seed-<k>/<stage>``) linked to another point's."""


# --------------------------------------------------------------------------------------------------- grid


def split_values(text: str) -> list[str] | None:
    """The values of ``text`` split at its commas outside brackets (``[] {} ()``) and quotes, stripped; None when
    the brackets or quotes do not balance (the text is then no list of values)."""
    values: list[str] = []
    depth, quote, start = 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth -= 1
            if depth < 0:
                return None
        elif ch == "," and depth == 0:
            values.append(text[start:i].strip())
            start = i + 1
    if depth or quote:
        return None
    values.append(text[start:].strip())
    return values


def parse_grid(args: Sequence[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Split ``KEY=VALUE`` arguments into grid axes and plain overrides.

    A value with a comma outside brackets and quotes is an axis (``explore.width=2,4``; ``search.iterations=
    [10,20],30`` is not: write one value per comma, brackets included); any other argument is an override of
    every point (``run.seeds=[0,1,2]``).

    Returns:
        ``(axes, overrides)``: axis key -> values in order, and the plain overrides.

    Raises:
        ConfigError: an argument without ``=`` or key, an empty or repeated axis value, an axis given twice or
            also as a plain override, an axis on ``run.name`` / ``run.out_dir``.
    """
    axes: dict[str, list[str]] = {}
    overrides: list[str] = []
    plain_keys: dict[str, str] = {}
    for item in args:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"sweep argument '{item}': expected KEY=VALUE or KEY=v1,v2,... (a grid axis)")
        values = split_values(text)
        if values is None or len(values) < 2:
            overrides.append(item)
            plain_keys[key] = item
            continue
        if key in _NOT_AXES:
            raise ConfigError(
                f"sweep axis '{item}': {key} names the sweep's folder and cannot vary; give it one value"
            )
        if key in axes:
            raise ConfigError(f"sweep axis '{item}': {key} is already an axis; give each axis once")
        if "" in values:
            raise ConfigError(f"sweep axis '{item}': an empty value (values are separated by commas)")
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise ConfigError(f"sweep axis '{item}': value {repeated[0]!r} is given twice")
        axes[key] = values
    for key, item in plain_keys.items():
        if key in axes:
            raise ConfigError(f"sweep override '{item}': {key} is also a grid axis; give it one way")
    return axes, overrides


def point_name(values: Mapping[str, str]) -> str:
    """The folder name of the point with axis ``values``: ``key-value`` per axis joined by ``__``
    (``explore.width-4__tasks.train-20``); characters other than letters, digits, ``.``, ``_`` and ``-``
    become ``-`` (``train.variants=[w2s-mcts]`` -> ``train.variants-w2s-mcts``); a name longer than 200
    characters is cut and ends with a hash of the values."""
    parts = []
    for key, value in values.items():
        safe = re.sub(r"[^A-Za-z0-9._-]+", "-", value).strip("-") or "x"
        parts.append(f"{key}-{safe}")
    name = "__".join(parts)
    if len(name) > _MAX_NAME:
        digest = hashlib.sha256(json.dumps(dict(values), sort_keys=True).encode()).hexdigest()[:10]
        name = f"{name[: _MAX_NAME - 11]}-{digest}"
    return name


def _assignments(values: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


def plan_sweep(path: str | os.PathLike[str] | None, args: Sequence[str]) -> SweepPlan:
    """The sweep of the config file ``path`` (None: the embedded default) over the grid of ``args``, every
    point's config loaded and validated before anything is written.

    Raises:
        ConfigError: a malformed grid (:func:`parse_grid`), no axis, two points with the same folder name, or a
            point whose config or stage table is invalid (naming the point's axis values and the config's own
            message).
    """
    axes, overrides = parse_grid(args)
    if not axes:
        raise ConfigError(
            "w2s sweep needs at least one grid axis KEY=v1,v2,... (values separated by commas), "
            f"got only {' '.join(overrides) or 'no KEY=VALUE argument'}"
        )
    points: list[SweepPoint] = []
    seen: dict[str, dict[str, str]] = {}
    for combo in itertools.product(*axes.values()):
        values = dict(zip(axes, combo, strict=True))
        name = point_name(values)
        if name in seen:
            raise ConfigError(
                f"sweep points {_assignments(seen[name])} and {_assignments(values)} get the same folder name "
                f"{name!r}; write the values so that they differ in letters or digits"
            )
        seen[name] = values
        try:
            cfg = load_experiment(path, [*overrides, *(f"{k}={v}" for k, v in values.items())])
            stage_keys(build_stages(cfg, cfg.run.seed_list[0]))  # the stage table it would run
        except W2SError as exc:
            raise ConfigError(f"sweep point {_assignments(values)}: {exc}") from None
        points.append(SweepPoint(name, values, cfg))
    base = points[0].config.run
    directory = base.out_dir / f"{base.name}-sweep"
    try:
        points = [
            replace(p, config=replace(p.config, run=replace(p.config.run, name=p.name, out_dir=directory)))
            for p in points
        ]
    except ConfigError as exc:  # pragma: no cover - point names are valid run names by construction
        raise ConfigError(f"sweep: {exc}") from None
    return SweepPlan(
        config_path=None if path is None else str(path),
        axes=axes,
        overrides=overrides,
        directory=directory,
        points=points,
    )


# ---------------------------------------------------------------------------------------- shared stages


def link_shared_stages(plan: SweepPlan, point: SweepPoint) -> list[str]:
    """Link every stage folder of ``point`` that another point of ``plan`` has finished with the same key.

    A stage folder of the point that is missing, or is a link whose target does not hold that key (a dangling
    link, or one left by a sweep with other settings; the link is removed, never its target), becomes a relative
    symbolic link to the first such folder (any seed of the other points, in plan order; stages such as the
    tasks are the same for every seed). Real folders of the point are left to the run, which reuses, resumes or
    moves them aside as ``w2s run`` does (:func:`~w2s_agents.pipeline.cache.link_finished_stages`).

    Returns:
        The linked folders, as ``seed-<k>/<stage>``.
    """
    sources = [
        seed_dir
        for other in plan.points
        if other.name != point.name and other.run_dir.is_dir()
        for seed_dir in sorted(other.run_dir.glob("seed-*"))
    ]
    linked: list[str] = []
    for seed in point.config.run.seed_list:
        stages = build_stages(point.config, seed)
        for stage in link_finished_stages(point.run_dir / f"seed-{seed}", stages, sources):
            linked.append(f"seed-{seed}/{stage}")
            logger.info("sweep point %s: stage seed-%d/%s shared", point.name, seed, stage)
    return linked


# --------------------------------------------------------------------------------------------------- run


def report_sweep(plan: SweepPlan, *, plots: bool = True) -> SweepResult:
    """Rewrite ``sweep.json``, ``sweep.md`` and ``sweep.png`` of ``plan`` from the points that have finished
    (a point's ``metrics.json`` written for its current config); runs nothing."""
    summary = sweep_summary(plan)
    files = write_sweep_outputs(summary, plan.directory, plots=plots)
    return SweepResult(plan, summary, files)


def run_sweep(
    plan: SweepPlan,
    *,
    plots: bool = True,
    on_point: Callable[[SweepPoint, Any], None] | None = None,
) -> SweepResult:
    """Run (or resume) every point of ``plan`` in order, sharing finished stages between points
    (:func:`link_shared_stages`), and write the sweep's table and plot after each point.

    Args:
        plan: the sweep (:func:`plan_sweep`).
        plots: also write ``sweep.png``.
        on_point: called after each point with the point and its
            :class:`~w2s_agents.pipeline.runner.PipelineResult`.

    Returns:
        The summary, the files written, and per point its stage records and linked stage folders.

    Raises:
        W2SError: a point failed (its finished stages stay cached; the sweep's files hold the points before it).
    """
    plan.directory.mkdir(parents=True, exist_ok=True)
    records: dict[str, dict[int, list[StageRecord]]] = {}
    linked: dict[str, list[str]] = {}
    done: SweepResult | None = None
    for i, point in enumerate(plan.points, 1):
        logger.info("sweep point %d of %d: %s", i, len(plan.points), point.name)
        linked[point.name] = link_shared_stages(plan, point)
        result = run_pipeline(point.config)
        records[point.name] = result.records
        done = report_sweep(plan, plots=plots)  # a sweep stopped later still has the table of this point
        if on_point is not None:
            on_point(point, result)
    assert done is not None  # a plan has at least one point
    done.records, done.linked = records, linked
    return done
