"""The run report: ``report.md`` with the paper's table rows and PNG plots, from ``metrics.json``.

The report is a pure function of the metrics (a dict, schema ``w2s.metrics/1``), so it can be rebuilt at any
time (``w2s report RUN_DIR``) and tested without running models. Layout of the metrics::

    {"schema": "w2s.metrics/1", "run": name, "suite": ..., "split": "test", "tasks": n, "seeds": [...],
     "models": {name: {"label": ..., "return": Interval, "success": Interval, "steps": Interval,
                       "episodes": n, "tokens": n}},
     "pgr": {w2s name: Interval}, "gain": {w2s name: float}, "vs_strong": {w2s name: Interval}, "misfit": {w2s name: Misfit},
     "transfer": {w2s name: Transfer}, "search_cost": {...}, "trees": {...},
     "curves": {training name: {"loss": [[step, loss], ...], "valid": [[epoch, value], ...]}},
     "weak_supervisors": {...}}  (with weak_extra only; :mod:`w2s_agents.pipeline.weaks`)

Intervals are dicts with ``estimate``, ``low``, ``high``, ``n``, ``level`` (see :mod:`w2s_agents.pipeline.stats`);
a value that could not be computed is ``null`` with a ``reason`` in the same dict, and a PGR interval has
``dropped_resamples``, the share of bootstrap resamples left out of it. The report shows such values as n/a
with their reason, and the share of dropped resamples where it is not 0.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from w2s_agents.atomic import atomic_write
from w2s_agents.pipeline.rl import order_rl_rows, rl_section
from w2s_agents.pipeline.rounds import order_round_rows, rounds_section
from w2s_agents.pipeline.stats import PGR_MIN_GAP, Interval
from w2s_agents.pipeline.weaks import FIRST_WEAK_SOURCE, weak_supervisors_section

__all__ = ["METRICS_SCHEMA", "MODEL_LABELS", "TABLE_ORDER", "interval", "plot_metrics", "write_report"]

logger = logging.getLogger(__name__)

METRICS_SCHEMA = "w2s.metrics/1"
MODEL_LABELS: Mapping[str, str] = {
    "weak-sft": "Weak SFT",
    "strong-sft": "Strong SFT",
    "eto": "Strong SFT + ETO",
    "best-of-n": "Strong SFT + Best-of-N",
    "w2s-treedpo": "W2S-TreeDPO",
    "w2s-mcts": "W2S-MCTS",
    "w2s-mcts-treedpo": "W2S-MCTS+TreeDPO",
    "ceiling-sft": "Strong SFT, all demos",
    "ceiling": "Ceiling",
}
"""Display names of the models of a run, in the paper's vocabulary."""
TABLE_ORDER: tuple[str, ...] = tuple(MODEL_LABELS)
"""Row order of the results table (models not listed come after, by name)."""


def interval(data: Mapping[str, Any] | None) -> Interval:
    """An :class:`Interval` from its JSON dict (NaN for null or missing values)."""
    return Interval.from_dict(data)


def _ordered_models(models: Mapping[str, Any]) -> list[str]:
    known = [m for m in TABLE_ORDER if m in models]
    # the extra weak models' SFT agents (weak_extra) come right after weak SFT
    weaks = sorted(m for m in models if m.startswith(f"{FIRST_WEAK_SOURCE}-") and m not in MODEL_LABELS)
    at = known.index(FIRST_WEAK_SOURCE) + 1 if FIRST_WEAK_SOURCE in known else 0
    known[at:at] = weaks
    later = order_round_rows(known, list(models), TABLE_ORDER)  # later rounds' W2S models, before the ceiling
    later += order_rl_rows(known, list(models))  # the W2S-RL models after them, round by round
    return known + sorted(m for m in models if m not in MODEL_LABELS and m not in weaks and m not in later)


def _label(name: str, models: Mapping[str, Any]) -> str:
    return str(models.get(name, {}).get("label") or MODEL_LABELS.get(name, name))


def _num(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _float(x: Any) -> float:
    """A number of the metrics as a float for a plot (NaN for null)."""
    return math.nan if x is None else float(x)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _results_section(metrics: Mapping[str, Any]) -> list[str]:
    models = metrics.get("models", {})
    level = 95
    rows = []
    seeds = [str(s) for s in metrics.get("seeds", [])]
    for name in _ordered_models(models):
        m = models[name]
        ret = interval(m.get("return"))
        level = round(ret.level * 100)
        rows.append(
            [
                _label(name, models),
                ret.format(1, scale=100),
                interval(m.get("success")).format(1, scale=100),
                interval(m.get("steps")).format(1),
                _num(m.get("episodes")),
            ]
        )
        if len(seeds) > 1:
            per_seed = m.get("return_per_seed", {})
            rows[-1].append(" / ".join(f"{100 * per_seed[s]:.0f}" if s in per_seed else "-" for s in seeds))
    where = (
        f"{metrics.get('tasks', '?')} held-out {metrics.get('split', 'test')} tasks of `{metrics.get('suite', '?')}`, "
        f"seeds {', '.join(map(str, metrics.get('seeds', []))) or '?'}"
    )
    lines = [f"## Results on {where}", ""]
    header = [
        "model",
        f"average return x100 ({level}% CI)",
        "success rate % (CI)",
        "mean steps (CI)",
        "episodes",
    ]
    if len(seeds) > 1:
        header.append(f"return x100 per seed ({' / '.join(seeds)})")
    lines += _table(header, rows)
    return [*lines, ""]


def _w2s_section(metrics: Mapping[str, Any]) -> list[str]:
    models = metrics.get("models", {})
    pgrs = metrics.get("pgr", {})
    if not pgrs:
        return []
    rows = []
    notes = []
    for name in _ordered_models(pgrs):
        mis = metrics.get("misfit", {}).get(name, {})
        tr = metrics.get("transfer", {}).get(name, {})
        pgr = interval(pgrs.get(name))
        if pgr.reason:
            notes.append(f"- PGR of {_label(name, models)}: n/a, {pgr.reason}.")
        if pgr.dropped:
            notes.append(
                f"- PGR of {_label(name, models)}: {100 * pgr.dropped:.1f}% of the bootstrap resamples dropped "
                "(their ceiling did not beat weak SFT by the minimum gap); the interval is over the rest."
            )
        for section, data in (("misfit", mis), ("transfer", tr)):
            if data.get("reason"):
                notes.append(f"- {section} of {_label(name, models)}: n/a, {data['reason']}.")
        rows.append(
            [
                _label(name, models),
                pgr.format(2),
                _num(metrics.get("gain", {}).get(name)),
                interval(metrics.get("vs_strong", {}).get(name)).format(1, scale=100)
                if name in metrics.get("vs_strong", {})
                else "n/a",
                _num(mis.get("disagreement")),
                _num(mis.get("kl")),
                f"{_num(tr.get('correction'), 2)} ({tr.get('corrected', 0)}/{tr.get('weak_failed', 0)})",
                f"{_num(tr.get('expansion'), 2)} ({tr.get('expanded', 0)}/{tr.get('uncovered', 0)})",
            ]
        )
    lines = [
        "## Weak-to-strong",
        "",
        "PGR = (R_w2s - R_weak) / (R_ceiling - R_weak) on average return (n/a unless the ceiling beats weak SFT "
        f"by at least {PGR_MIN_GAP:g}). "
        "Gain = R_w2s - R_weak. Vs strong SFT = R_w2s - R_strong_sft x100, paired over the episodes both "
        "played, with a bootstrap interval (run seeds, then episodes). Misfit: on held-out states of weak trajectories, the share where the W2S agent's "
        "most likely action differs from the weak agent's, and mean KL(pi_weak || pi_w2s) over admissible "
        "actions. Correction: train tasks the weak agent fails that the W2S agent solves; expansion: train tasks "
        "where no weak exploration trajectory succeeded that the W2S agent solves.",
        "",
    ]
    lines += _table(
        [
            "model",
            "PGR (CI)",
            "gain",
            "vs strong SFT (CI)",
            "misfit: disagreement",
            "misfit: KL",
            "correction",
            "expansion",
        ],
        rows,
    )
    if notes:
        lines += ["", *notes]
    return [*lines, ""]


def _dict_section(title: str, data: Mapping[str, Any] | None) -> list[str]:
    if not data:
        return []
    rows = [[str(k), _num(v)] for k, v in data.items() if not isinstance(v, (dict, list))]
    return [f"## {title}", "", *_table(["", "value"], rows), ""]


def _merge_note(trees: Mapping[str, Any] | None) -> list[str]:
    """With ``tree.merge: similarity``, one sentence with the node counts of both merges (empty otherwise)."""
    if not trees or trees.get("merge") != "similarity":
        return []
    sim, exact = trees["nodes_similarity"], trees["nodes_exact"]
    fewer = f" ({1 - sim / exact:.1%} fewer)" if exact else ""
    return [
        f"Steps merged by observation similarity (cosine >= {trees['xi_sim']}): {sim:,} nodes{fewer}; the exact "
        f"merge of the same trajectories gives {exact:,}.",
        "",
    ]


def plot_metrics(metrics: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write the report's PNG plots into ``out_dir`` and return their paths.

    ``returns.png``: average return per model with its interval; ``curves.png``: training loss and validation
    curves; ``trees.png``: per-tree nodes, depth and successful leaves (when the metrics hold them).
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    models = metrics.get("models", {})
    names = _ordered_models(models)
    if names:
        ivs = [interval(models[n].get("return")) for n in names]
        est = [0.0 if not math.isfinite(i.estimate) else i.estimate for i in ivs]
        err_lo = [max(0.0, e - i.low) if math.isfinite(i.low) else 0.0 for e, i in zip(est, ivs, strict=True)]
        err_hi = [
            max(0.0, i.high - e) if math.isfinite(i.high) else 0.0 for e, i in zip(est, ivs, strict=True)
        ]
        fig, ax = plt.subplots(figsize=(1.4 * len(names) + 2, 3.5))
        baselines = ("weak-sft", "strong-sft", "eto", "best-of-n")
        colors = ["#8c8c8c" if n in baselines else "#2b7bba" if n != "ceiling" else "#444444" for n in names]
        ax.bar(range(len(names)), est, yerr=[err_lo, err_hi], capsize=4, color=colors)
        ax.set_xticks(range(len(names)), [_label(n, models) for n in names], rotation=20, ha="right")
        ax.set_ylabel("average return")
        ax.set_ylim(0, max(1.05, max(est) * 1.1))
        ax.set_title("Held-out return per model (95% CI)")
        fig.tight_layout()
        written.append(_save(fig, out / "returns.png"))

    curves = metrics.get("curves", {})
    if curves:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
        for name, c in curves.items():
            loss = c.get("loss") or []
            if loss:
                ax1.plot([p[0] for p in loss], [_float(p[1]) for p in loss], label=name)
            valid = c.get("valid") or []
            if valid:
                ax2.plot([p[0] for p in valid], [_float(p[1]) for p in valid], marker="o", label=name)
        ax1.set_xlabel("optimizer step")
        ax1.set_ylabel("training loss")
        ax1.legend(fontsize=7)
        ax2.set_xlabel("epoch")
        ax2.set_ylabel("validation")
        if ax2.lines:
            ax2.legend(fontsize=7)
        fig.suptitle("Learning curves")
        fig.tight_layout()
        written.append(_save(fig, out / "curves.png"))

    per_tree = (metrics.get("trees") or {}).get("per_tree") or []
    if per_tree:
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
        for ax, key, title in zip(
            axes,
            ("nodes", "depth", "success_leaves"),
            ("nodes per tree", "depth", "successful leaves"),
            strict=True,
        ):
            ax.hist([t.get(key, 0) for t in per_tree], bins=min(20, max(3, len(per_tree))), color="#2b7bba")
            ax.set_title(title)
        fig.suptitle(f"Trajectory trees ({len(per_tree)})")
        fig.tight_layout()
        written.append(_save(fig, out / "trees.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_report(metrics: Mapping[str, Any], run_dir: str | os.PathLike[str], *, plots: bool = True) -> Path:
    """Write ``report.md`` (and its plots under ``plots/``) into ``run_dir``; return the report's path."""
    run_dir = Path(run_dir)
    if metrics.get("schema") != METRICS_SCHEMA:
        logger.warning("metrics schema %r, expected %r", metrics.get("schema"), METRICS_SCHEMA)
    lines = [f"# w2s-agents run `{metrics.get('run', run_dir.name)}`", ""]
    head = {k: metrics.get(k) for k in ("config_hash", "device", "finished") if metrics.get(k) is not None}
    if head:
        lines += [", ".join(f"{k}: `{v}`" for k, v in head.items()), ""]
    lines += _results_section(metrics)
    lines += _w2s_section(metrics)
    lines += rounds_section(metrics, MODEL_LABELS)
    lines += rl_section(metrics, MODEL_LABELS)
    lines += weak_supervisors_section(metrics, MODEL_LABELS)
    lines += _dict_section("Search cost", metrics.get("search_cost"))
    tree_stats = {k: v for k, v in (metrics.get("trees") or {}).items() if k != "per_tree"}
    lines += _dict_section("Trajectory trees", tree_stats)
    lines += _merge_note(metrics.get("trees"))
    lines += _dict_section("Best paths (search.paths)", metrics.get("best_paths"))
    if plots:
        paths = plot_metrics(metrics, run_dir / "plots")
        if paths:
            lines += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in paths] + [""]
    target = run_dir / "report.md"
    with atomic_write(target) as fh:
        fh.write("\n".join(lines))
    return target
