"""Several weak supervisors (RAVEN, Jeon et al.): the extra weak models of a run, named by ``weak_extra``.

The run's first weak model is the ``weak`` section; its stages are the usual ``models`` (with the strong model),
``weak-sft`` and ``explore``, and its trajectories carry the source ``weak-sft``. Every entry of ``weak_extra``
(a :class:`WeakModelConfig`: a ``name`` and the keys of a model section) gets three stages of its own::

    models-<name>     its base model (a local folder, or a tiny model built on the demos' text)
    weak-sft-<name>   that model fine-tuned on the demos with train.weak_sft's settings
    explore-<name>    that agent on every train task with the explore settings; source ``weak-sft-<name>``

and the ``trees`` stage merges every exploration into one tree per task (the nodes count trajectories per
source). With several weak models the W2S stages learn one weight per source (``train.source_weights``; the
trainers' ``sources.weights``). Weak SFT (the first weak model) stays the weak baseline of PGR, correction and
expansion and the TreeDPO reference.

This module holds the config entry, the names of the extra stages, and the run's ``weak_supervisors`` metrics
and their report section. It imports nothing of the pipeline that imports the experiment config.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from w2s_agents.agents import ModelConfig
from w2s_agents.config import check, option

if TYPE_CHECKING:
    from w2s_agents.pipeline.experiment import ExperimentConfig
    from w2s_agents.trainers import TrainConfig

__all__ = [
    "FIRST_WEAK_SOURCE",
    "W2S_WEIGHTED_STAGES",
    "WeakModelConfig",
    "WeakSupervisor",
    "check_weak_names",
    "extra_weaks",
    "weak_label",
    "weak_supervisor_metrics",
    "weak_supervisors_section",
    "with_source_weights",
]

FIRST_WEAK_SOURCE = "weak-sft"
"""The source (``Trajectory.source.model``) of the first weak model's exploration: its SFT stage's name."""

W2S_WEIGHTED_STAGES = ("w2s-mcts", "w2s-treedpo", "w2s-mcts-treedpo")
"""The training stages that learn per-source weights when a run has several weak models."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_RESERVED = ("search",)  # "weak-sft-search" is the source of online expansion's episodes


@dataclass(frozen=True, kw_only=True)
class WeakModelConfig(ModelConfig):
    """One extra weak model (an entry of ``weak_extra``): a name and the keys of a model section."""

    name: str = option(
        help="names the model's stages (models-<name>, weak-sft-<name>, explore-<name>) and the source "
        "weak-sft-<name> of its trajectories"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check(
            _NAME.fullmatch(self.name) is not None,
            "name",
            f"must be letters, digits, '_' or '-' (it names stages and folders), got {self.name!r}",
        )
        check(
            self.name not in _RESERVED,
            "name",
            f"must not be {self.name!r}: weak-sft-{self.name} is the source of online expansion's episodes",
        )


def check_weak_names(extra: Sequence[WeakModelConfig]) -> None:
    """Check that no two entries of ``weak_extra`` share a name (for the experiment's ``__post_init__``).

    Raises:
        ConfigError: ``'weak_extra' ...`` naming the repeated name and its entries.
    """
    seen: dict[str, int] = {}
    for i, w in enumerate(extra):
        check(
            w.name not in seen,
            "weak_extra",
            f"names must be unique: {w.name!r} names entries {seen.get(w.name)} and {i}",
        )
        seen[w.name] = i


@dataclass(frozen=True)
class WeakSupervisor:
    """An extra weak model and the names it has in a run."""

    config: WeakModelConfig

    @property
    def name(self) -> str:
        """The entry's ``name``."""
        return self.config.name

    @property
    def models_stage(self) -> str:
        """The stage that makes its base model."""
        return f"models-{self.name}"

    @property
    def sft_stage(self) -> str:
        """Its SFT stage; also its model's name in evaluation and the source of its trajectories."""
        return f"weak-sft-{self.name}"

    @property
    def explore_stage(self) -> str:
        """Its exploration stage."""
        return f"explore-{self.name}"


def extra_weaks(cfg: ExperimentConfig) -> list[WeakSupervisor]:
    """The extra weak models of ``cfg`` (``weak_extra``), in config order; empty for a run with one weak model."""
    return [WeakSupervisor(w) for w in cfg.weak_extra]


def with_source_weights(tc: TrainConfig) -> TrainConfig:
    """``tc`` with the trainers' per-source weights turned on (``sources.weights``)."""
    return replace(tc, sources=replace(tc.sources, weights=True))


def weak_label(name: str) -> str:
    """Display name of an extra weak model's SFT stage (``weak-sft-b`` -> ``Weak SFT (b)``); other names as
    they are."""
    prefix = f"{FIRST_WEAK_SOURCE}-"
    return f"Weak SFT ({name[len(prefix) :]})" if name.startswith(prefix) else name


# ------------------------------------------------------------------------------------------- metrics


def _model_text(mc: ModelConfig) -> str:
    return f"path {mc.path}" if mc.path is not None else f"tiny preset {mc.tiny_preset}"


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _share(n: int, total: int) -> float:
    return n / total if total else math.nan


def weak_supervisor_metrics(run_dir: Path, seeds: Sequence[int], cfg: ExperimentConfig) -> dict[str, Any]:
    """The ``weak_supervisors`` entry of a run's metrics, summed over ``seeds``.

    Per source (the first weak model's ``weak-sft``, then each extra's ``weak-sft-<name>``): its model, its
    exploration's episodes and their share of all exploration episodes, successes and success rate, and the
    best-path SFT rows and TreeDPO pairs (``search/sft.jsonl``, ``search/pairs.jsonl``) it stands behind and
    their share of all rows and pairs (a row or pair reached by several sources counts for each). Per W2S
    stage: the learned weight of every source, the mean over the seeds whose stage learned them, and each
    seed's (from ``<stage>/model.json``).
    """
    sources = [(FIRST_WEAK_SOURCE, "weak", cfg.weak, "explore")] + [
        (w.sft_stage, w.name, w.config, w.explore_stage) for w in extra_weaks(cfg)
    ]
    per: dict[str, dict[str, Any]] = {
        src: {
            "config": name,
            "model": _model_text(mc),
            "trajectories": 0,
            "successes": 0,
            "sft_rows": 0,
            "pairs": 0,
        }
        for src, name, mc, _ in sources
    }
    totals = {"trajectories": 0, "sft_rows": 0, "pairs": 0}
    weights: dict[str, dict[str, Any]] = {}
    for s in seeds:
        seed_dir = run_dir / f"seed-{s}"
        for src, _, _, explore in sources:
            f = seed_dir / explore / "explore.json"
            ex = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
            per[src]["trajectories"] += ex.get("episodes", 0)
            per[src]["successes"] += ex.get("successes", 0)
            totals["trajectories"] += ex.get("episodes", 0)
        rows = _jsonl(seed_dir / "search" / "sft.jsonl")
        pairs = _jsonl(seed_dir / "search" / "pairs.jsonl")
        totals["sft_rows"] += len(rows)
        totals["pairs"] += len(pairs)
        for src in per:
            per[src]["sft_rows"] += sum(src in r.get("sources", ()) for r in rows)
            per[src]["pairs"] += sum(
                src in (*p.get("chosen_sources", ()), *p.get("rejected_sources", ())) for p in pairs
            )
        for stage in W2S_WEIGHTED_STAGES:
            f = seed_dir / stage / "model.json"
            learned = json.loads(f.read_text(encoding="utf-8")).get("source_weights") if f.is_file() else None
            if learned:
                weights.setdefault(stage, {"per_seed": {}})["per_seed"][str(s)] = learned
    for m in per.values():
        m["trajectory_share"] = _share(m["trajectories"], totals["trajectories"])
        m["success_rate"] = _share(m["successes"], m["trajectories"])
        m["sft_row_share"] = _share(m["sft_rows"], totals["sft_rows"])
        m["pair_share"] = _share(m["pairs"], totals["pairs"])
    for w in weights.values():
        seen = list(w["per_seed"].values())
        names = sorted({n for sw in seen for n in sw})
        w["mean"] = {n: sum(sw.get(n, 0.0) for sw in seen) / len(seen) for n in names}
    return {"sources": per, "totals": totals, "weights": weights}


# ------------------------------------------------------------------------------------------- report


def _pct(x: Any) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{100 * x:.1f}%"


def weak_supervisors_section(metrics: Mapping[str, Any], labels: Mapping[str, str]) -> list[str]:
    """The report's "Weak supervisors" section (markdown lines) from ``metrics["weak_supervisors"]``; empty for
    a run with one weak model. ``labels`` are the display names of the W2S stages."""
    data = metrics.get("weak_supervisors")
    if not data:
        return []
    stages = list(data.get("weights", {}))
    header = [
        "source",
        "model",
        "trajectories (share)",
        "exploration success",
        "best-path rows (share)",
        "pairs (share)",
        *(f"weight: {labels.get(st, st)}" for st in stages),
    ]
    lines = [
        "## Weak supervisors",
        "",
        "Each weak model's share of the exploration, its exploration success rate, the best-path SFT rows and "
        "TreeDPO pairs it stands behind (a row or pair reached by several sources counts for each), and the "
        "per-source weight each W2S stage learned (mean over seeds; uniform is 1/K). Weak SFT (source "
        f"`{FIRST_WEAK_SOURCE}`) is the weak baseline of PGR, correction and expansion and the TreeDPO reference.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(" --- " for _ in header) + "|",
    ]
    for src, m in data.get("sources", {}).items():
        cells = [
            f"`{src}` ({m.get('config')})",
            str(m.get("model")),
            f"{m.get('trajectories', 0)} ({_pct(m.get('trajectory_share'))})",
            _pct(m.get("success_rate")),
            f"{m.get('sft_rows', 0)} ({_pct(m.get('sft_row_share'))})",
            f"{m.get('pairs', 0)} ({_pct(m.get('pair_share'))})",
        ]
        for st in stages:
            w = data["weights"][st].get("mean", {}).get(src)
            cells.append("n/a" if w is None else f"{w:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]
