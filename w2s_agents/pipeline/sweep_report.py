"""The outputs of a sweep (``w2s sweep``): ``sweep.json``, ``sweep.md`` and ``sweep.png``, from the points' metrics.

:func:`sweep_summary` reads the ``metrics.json`` of every point of a :class:`~w2s_agents.pipeline.sweep.SweepPlan`
(schema ``w2s.metrics/1``, :mod:`w2s_agents.pipeline.report`); :func:`write_sweep_outputs` writes the three files
from that summary alone, so the table and plot can be rebuilt at any time. Layout of ``sweep.json``::

    {"schema": "w2s.sweep/1", "config": path or null, "axes": {key: [value, ...]}, "overrides": [...],
     "points": [{"name": folder, "values": {key: value}, "run_dir": path, "finished": bool,
                 "reason": why not finished (only then),
                 "split": "test", "tasks": n, "seeds": [...],
                 "models": {name: {"label": ..., "return": Interval}},
                 "pgr": {w2s name: Interval}, "vs_strong": {w2s name: Interval}, "best_w2s": name or null}]}

Values are the axis values as written on the command line. Intervals are the dicts of
:class:`~w2s_agents.pipeline.stats.Interval`. ``best_w2s`` is the W2S model with the highest average return of the
point; ``vs_strong`` is W2S minus strong SFT return with its paired interval.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from w2s_agents.atomic import atomic_write
from w2s_agents.config import config_hash
from w2s_agents.pipeline.report import METRICS_SCHEMA, MODEL_LABELS, TABLE_ORDER, interval

if TYPE_CHECKING:
    from w2s_agents.pipeline.sweep import SweepPlan

__all__ = ["SWEEP_SCHEMA", "sweep_summary", "sweep_table", "write_sweep_outputs"]

logger = logging.getLogger(__name__)

SWEEP_SCHEMA = "w2s.sweep/1"


def _point_metrics(run_dir: Path, expected_hash: str) -> tuple[dict[str, Any] | None, str]:
    """The metrics of a point's run, or None and why they cannot be used."""
    path = run_dir / "metrics.json"
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, "not run to the end yet (no metrics.json)"
    except (OSError, ValueError) as exc:
        return None, f"{path} is unreadable ({exc})"
    if not isinstance(metrics, dict) or metrics.get("schema") != METRICS_SCHEMA:
        return None, f"{path} is not a w2s metrics file (schema {METRICS_SCHEMA})"
    if metrics.get("config_hash") != expected_hash:
        return None, (
            f"{path} was written for another config (hash {metrics.get('config_hash')}, the point's is "
            f"{expected_hash}); run the sweep again to update it"
        )
    return metrics, ""


def _best_w2s(models: Mapping[str, Any]) -> str | None:
    """The W2S model with the highest average return (ties: the first in the report's order)."""
    best, best_value = None, -math.inf
    for name in _ordered(models):
        value = interval(models[name].get("return")).estimate
        if name.startswith("w2s-") and math.isfinite(value) and value > best_value:
            best, best_value = name, value
    return best


def _ordered(names: Mapping[str, Any] | Sequence[str]) -> list[str]:
    known = [m for m in TABLE_ORDER if m in names]
    return known + sorted(m for m in names if m not in MODEL_LABELS)


def sweep_summary(plan: SweepPlan) -> dict[str, Any]:
    """The content of ``sweep.json`` for ``plan``: per point its axis values, run folder and, when it has
    finished with its current config, each model's return, the W2S models' PGR and ``vs_strong``, and the best
    W2S model."""
    points = []
    for point in plan.points:
        entry: dict[str, Any] = {
            "name": point.name,
            "values": dict(point.values),
            "run_dir": str(point.run_dir),
        }
        metrics, reason = _point_metrics(point.run_dir, config_hash(point.config))
        if metrics is None:
            entry.update(finished=False, reason=reason)
            points.append(entry)
            continue
        models = {
            name: {"label": m.get("label") or MODEL_LABELS.get(name, name), "return": m.get("return")}
            for name, m in metrics.get("models", {}).items()
        }
        entry.update(
            finished=True,
            split=metrics.get("split", "test"),
            tasks=metrics.get("tasks"),
            seeds=metrics.get("seeds", []),
            models=models,
            pgr=metrics.get("pgr", {}),
            vs_strong=metrics.get("vs_strong", {}),
            best_w2s=_best_w2s(models),
        )
        points.append(entry)
    return {
        "schema": SWEEP_SCHEMA,
        "config": plan.config_path,
        "axes": {k: list(v) for k, v in plan.axes.items()},
        "overrides": list(plan.overrides),
        "points": points,
    }


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def _label(name: str | None, points: Sequence[Mapping[str, Any]]) -> str:
    if name is None:
        return "n/a"
    for p in points:
        if name in p.get("models", {}):
            return str(p["models"][name]["label"])
    return MODEL_LABELS.get(name, name)


def sweep_table(summary: Mapping[str, Any]) -> list[str]:
    """The comparison table of ``sweep.md`` as markdown lines: a row per point; columns the axis values, each
    model's average return x100 with its interval, the best W2S model, its PGR and its return minus strong SFT's
    (x100, paired interval)."""
    axes = list(summary.get("axes", {}))
    points = summary.get("points", [])
    finished = [p for p in points if p.get("finished")]
    models = _ordered(list(dict.fromkeys(n for p in finished for n in p["models"])))
    header = [
        *(f"`{a}`" for a in axes),
        *(f"{_label(m, finished)} x100 (CI)" for m in models),
        "best W2S",
        "PGR (CI)",
        "best W2S - strong SFT x100 (CI)",
    ]
    rows = []
    for p in points:
        values = [str(p["values"].get(a, "")) for a in axes]
        if not p.get("finished"):
            rows.append([*values, *(["not finished", *[""] * (len(header) - len(axes) - 1)])])
            continue
        best = p.get("best_w2s")
        rows.append(
            [
                *values,
                *(
                    interval(p["models"][m]["return"]).format(1, scale=100) if m in p["models"] else "n/a"
                    for m in models
                ),
                _label(best, finished),
                interval(p["pgr"].get(best)).format(2) if best else "n/a",
                interval(p["vs_strong"].get(best)).format(1, scale=100) if best else "n/a",
            ]
        )
    return _table(header, rows)


def _markdown(summary: Mapping[str, Any], name: str) -> str:
    points = summary.get("points", [])
    finished = [p for p in points if p.get("finished")]
    grid = "; ".join(f"`{k}` = {', '.join(v)}" for k, v in summary.get("axes", {}).items())
    config = f"`{summary['config']}`" if summary.get("config") else "the embedded default"
    overrides = summary.get("overrides") or []
    lines = [f"# w2s sweep `{name}`", ""]
    lines.append(
        f"Config: {config}"
        + (f", with {' '.join(f'`{o}`' for o in overrides)}" if overrides else "")
        + f"; grid {grid}; {len(finished)} of {len(points)} points finished."
    )
    if finished:
        split = finished[0].get("split", "test")
        lines.append(
            f"Average return x100 on the held-out {split} tasks with 95% intervals (over run seeds and episodes); "
            "PGR of each point's best W2S model (the one with the highest return) with its paired interval, and "
            "its return minus strong SFT's, paired."
        )
    lines += ["", *sweep_table(summary), ""]
    for p in points:
        if not p.get("finished"):
            lines.append(f"- `{p['name']}`: {p.get('reason', 'not finished')}")
    return "\n".join(lines) + "\n"


def _axis_positions(values: Sequence[str]) -> tuple[list[float], list[str] | None]:
    """x positions of the first axis's values: the numbers themselves when every value is one, else 0, 1, ...
    with the values as tick labels."""
    parsed = []
    for v in values:
        try:
            x = yaml.safe_load(v)
        except yaml.YAMLError:
            x = None
        parsed.append(x)
    if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in parsed):
        return [float(x) for x in parsed], None
    return [float(i) for i in range(len(values))], list(values)


def _plot(summary: Mapping[str, Any], path: Path) -> Path | None:
    """``sweep.png``: average return x100 of each model against the first axis, with interval error bars; one
    panel per combination of the other axes' values. None when no point has finished."""
    axes = list(summary.get("axes", {}))
    finished = [p for p in summary.get("points", []) if p.get("finished")]
    if not finished:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    first, rest = axes[0], axes[1:]
    xs, ticks = _axis_positions(summary["axes"][first])
    x_of = dict(zip(summary["axes"][first], xs, strict=True))
    panels = list(dict.fromkeys(tuple(p["values"][a] for a in rest) for p in finished))
    models = _ordered(list(dict.fromkeys(n for p in finished for n in p["models"])))
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(5.0 * ncols, 3.6 * nrows), squeeze=False, sharey=True)
    spacing = min((b - a for a, b in zip(sorted(xs), sorted(xs)[1:], strict=False)), default=1.0) or 1.0
    for ax, panel in zip(grid.flat, panels, strict=False):
        in_panel = [p for p in finished if tuple(p["values"][a] for a in rest) == panel]
        for j, model in enumerate(models):
            pts = sorted(
                (
                    (x_of[p["values"][first]], interval(p["models"][model]["return"]))
                    for p in in_panel
                    if model in p["models"]
                ),
                key=lambda item: item[0],
            )
            pts = [(x, iv) for x, iv in pts if math.isfinite(iv.estimate)]
            if not pts:
                continue
            shift = (j - (len(models) - 1) / 2) * 0.04 * spacing  # keep the error bars apart
            est = [100 * iv.estimate for _, iv in pts]
            low = [
                max(0.0, e - 100 * iv.low) if math.isfinite(iv.low) else 0.0
                for e, (_, iv) in zip(est, pts, strict=True)
            ]
            high = [
                max(0.0, 100 * iv.high - e) if math.isfinite(iv.high) else 0.0
                for e, (_, iv) in zip(est, pts, strict=True)
            ]
            ax.errorbar(
                [x + shift for x, _ in pts],
                est,
                yerr=[low, high],
                marker="o",
                capsize=3,
                label=_label(model, finished),
            )
        ax.set_xlabel(first)
        if ticks is not None:
            ax.set_xticks(xs, ticks)
        else:
            ax.set_xticks(xs)
        ax.set_ylim(0, 105)
        if rest:
            ax.set_title(", ".join(f"{a}={v}" for a, v in zip(rest, panel, strict=True)), fontsize=9)
    for ax in grid.flat[len(panels) :]:
        ax.set_visible(False)
    for row in grid:
        row[0].set_ylabel("average return x100")
    grid.flat[0].legend(fontsize=7)
    fig.suptitle("Held-out return per model (95% CI)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_sweep_outputs(
    summary: Mapping[str, Any], directory: str | os.PathLike[str], *, plots: bool = True
) -> list[Path]:
    """Write ``sweep.json``, ``sweep.md`` and (with ``plots``, once a point has finished) ``sweep.png`` into
    ``directory``, each atomically; return their paths."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "sweep.json") as fh:
        fh.write(json.dumps(summary, indent=1, allow_nan=False) + "\n")
    with atomic_write(out / "sweep.md") as fh:
        fh.write(_markdown(summary, out.name))
    files = [out / "sweep.json", out / "sweep.md"]
    if plots:
        png = _plot(summary, out / "sweep.png")
        if png is not None:
            files.append(png)
    logger.info("sweep table: %s", out / "sweep.md")
    return files
