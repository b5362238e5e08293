"""Evaluation statistics: intervals over episodes and seeds, PGR, misfit, correction and expansion.

Everything here works on plain numbers (no models, no envs), so the report's figures can be recomputed from
the evaluation trajectories alone and tested against hand computations.

Intervals are percentile bootstraps. When the evaluation ran several seeds, the bootstrap is two-stage
(resample seeds, then episodes within each drawn seed), so seed-to-seed variation widens the interval as it
should; with one seed it resamples episodes. Resampling is seeded, so the same data give the same interval.
Comparisons between models evaluated on the same (task, seed) episodes (PGR) resample those shared units
jointly (a paired bootstrap).

A number that cannot be computed (no observations, a PGR whose ceiling does not beat the weak model by
:data:`PGR_MIN_GAP`) is NaN in memory and ``null`` in the JSON of :meth:`Interval.as_dict` and the other
``as_dict`` methods, with a ``reason`` field saying why, so that the metrics are strict JSON.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = [
    "PGR_MIN_GAP",
    "Interval",
    "Misfit",
    "Transfer",
    "bootstrap_interval",
    "misfit",
    "paired_pgr",
    "pgr",
    "transfer",
]

DEFAULT_RESAMPLES = 2000

PGR_MIN_GAP = 0.05
"""Smallest ceiling - weak gap in average return (returns are in [0, 1]) over which PGR is reported: below it
the ratio divides by noise (a gap of 1e-4 turns a gain of 0.2 into a PGR of 2000), so PGR is n/a with the
reason, and bootstrap resamples whose gap falls below it are dropped (their share is reported)."""


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided interval (``low``, ``high``) at ``level`` from ``n`` observations.

    NaN marks what could not be computed, and ``reason`` says why; ``dropped`` is the share of bootstrap
    resamples left out of the interval (PGR: those whose ceiling does not beat weak by ``PGR_MIN_GAP``),
    None where a bootstrap drops none by design.
    """

    estimate: float
    low: float
    high: float
    n: int
    level: float = 0.95
    reason: str = ""
    dropped: float | None = None

    def as_dict(self) -> dict[str, float | int | str | None]:
        """Strict-JSON dict: ``estimate``, ``low``, ``high`` (null when not a number), ``n``, ``level``, plus
        ``reason`` when a value is null and ``dropped_resamples`` when the bootstrap dropped resamples."""
        out: dict[str, float | int | str | None] = {
            "estimate": _finite_or_none(self.estimate),
            "low": _finite_or_none(self.low),
            "high": _finite_or_none(self.high),
            "n": self.n,
            "level": self.level,
        }
        if None in (out["estimate"], out["low"], out["high"]) or self.reason:
            out["reason"] = self.reason or "not computed"
        if self.dropped is not None:
            out["dropped_resamples"] = self.dropped
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Interval:
        """The interval of :meth:`as_dict` (NaN for null or missing values; all NaN for None)."""
        if not data:
            return cls(math.nan, math.nan, math.nan, 0)

        def num(key: str) -> float:
            v = data.get(key)
            return math.nan if v is None else float(v)

        dropped = data.get("dropped_resamples")
        return cls(
            num("estimate"),
            num("low"),
            num("high"),
            int(data.get("n", 0)),
            float(data.get("level", 0.95)),
            str(data.get("reason") or ""),
            None if dropped is None else float(dropped),
        )

    def format(self, digits: int = 3, scale: float = 1.0) -> str:
        """``"0.512 [0.401, 0.620]"`` (values multiplied by ``scale``); ``"n/a"`` when not a number."""
        if not math.isfinite(self.estimate):
            return "n/a"
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            return f"{self.estimate * scale:.{digits}f}"
        return f"{self.estimate * scale:.{digits}f} [{self.low * scale:.{digits}f}, {self.high * scale:.{digits}f}]"


def _percentiles(samples: np.ndarray, level: float) -> tuple[float, float]:
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return math.nan, math.nan
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    return float(low), float(high)


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")


def bootstrap_interval(
    values: Sequence[float] | np.ndarray,
    groups: Sequence[Hashable] | None = None,
    *,
    level: float = 0.95,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Interval:
    """Mean of ``values`` with a percentile-bootstrap interval.

    Args:
        values: one number per episode (return, success as 0/1, steps, ...).
        groups: the seed (or any cluster label) of each episode; with two or more distinct groups the
            bootstrap is two-stage (groups, then episodes within each drawn group).
        level: interval coverage.
        resamples: bootstrap resamples.
        seed: seed of the resampling.

    Returns:
        The mean and its interval; NaN for no values, a zero-width interval for a single value.
    """
    _check_level(level)
    x = np.asarray(values, dtype=float)
    if groups is not None and len(groups) != x.size:
        raise ValueError(f"groups has {len(groups)} labels for {x.size} values")
    if x.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0, level, "no observations")
    estimate = float(x.mean())
    if x.size == 1:
        return Interval(estimate, estimate, estimate, 1, level)
    rng = np.random.default_rng(seed)
    labels = list(dict.fromkeys(groups)) if groups is not None else []
    if len(labels) >= 2:
        members = [np.flatnonzero(np.fromiter((g == lab for g in groups), bool, x.size)) for lab in labels]
        samples = np.empty(resamples)
        for b in range(resamples):
            picked = rng.integers(0, len(members), len(members))
            parts = [x[members[i]][rng.integers(0, members[i].size, members[i].size)] for i in picked]
            samples[b] = np.concatenate(parts).mean()
    else:
        idx = rng.integers(0, x.size, (resamples, x.size))
        samples = x[idx].mean(axis=1)
    low, high = _percentiles(samples, level)
    reason = "" if math.isfinite(low) else "no finite bootstrap resample"
    return Interval(estimate, low, high, int(x.size), level, reason)


def pgr(weak: float, w2s: float, ceiling: float, *, min_gap: float = 0.0) -> float:
    """Performance gap recovered: ``(w2s - weak) / (ceiling - weak)``; NaN unless ``ceiling > weak`` by at
    least ``min_gap`` (:data:`PGR_MIN_GAP` is the metrics' minimum)."""
    gap = ceiling - weak
    if not (gap > 0 and gap >= min_gap):
        return math.nan
    return (w2s - weak) / gap


def paired_pgr(
    weak: Mapping[Hashable, float],
    w2s: Mapping[Hashable, float],
    ceiling: Mapping[Hashable, float],
    *,
    level: float = 0.95,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    min_gap: float = PGR_MIN_GAP,
) -> Interval:
    """PGR of mean scores over the episodes the three models share, with a paired bootstrap interval.

    Each mapping goes from an episode unit (e.g. ``(task_id, seed)``) to that model's score on it. Units
    missing from any model are left out. The estimate is NaN, with the reason, when the full sample's ceiling
    does not beat the weak model by ``min_gap``; resamples whose ceiling does not beat the weak model by
    ``min_gap`` are dropped from the interval and their share is the interval's ``dropped``.
    """
    _check_level(level)
    units = [u for u in weak if u in w2s and u in ceiling]
    if not units:
        return Interval(math.nan, math.nan, math.nan, 0, level, "no episode shared by weak, W2S and ceiling")
    a = np.array([[weak[u], w2s[u], ceiling[u]] for u in units], dtype=float)
    means = a.mean(axis=0)
    estimate = pgr(*means, min_gap=min_gap)
    if not math.isfinite(estimate):
        gap = means[2] - means[0]
        return Interval(
            math.nan,
            math.nan,
            math.nan,
            len(units),
            level,
            f"ceiling - weak = {gap:.4f} in average return, below the minimum gap {min_gap:g} (PGR_MIN_GAP)",
        )
    if len(units) == 1:
        return Interval(estimate, math.nan, math.nan, 1, level, "one shared episode: no interval")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(units), (resamples, len(units)))
    m = a[idx].mean(axis=1)  # (resamples, 3)
    gap = m[:, 2] - m[:, 0]
    kept = (gap > 0) & (gap >= min_gap)
    with np.errstate(divide="ignore", invalid="ignore"):
        samples = np.where(kept, (m[:, 1] - m[:, 0]) / gap, np.nan)
    low, high = _percentiles(samples, level)
    dropped = float(1.0 - kept.mean())
    reason = "" if math.isfinite(low) else f"every resample's ceiling - weak gap is below {min_gap:g}"
    return Interval(float(estimate), low, high, len(units), level, reason, dropped)


@dataclass(frozen=True)
class Misfit:
    """How far the W2S strong agent departs from the weak agent on held-out weak states."""

    disagreement: float
    """Share of states where the two agents' most likely actions differ."""
    kl: float
    """Mean KL(pi_weak || pi_w2s) over the admissible actions of each state (nats)."""
    states: int

    def as_dict(self) -> dict[str, float | int | str | None]:
        """Strict-JSON dict: NaN as null, with a ``reason`` (no states)."""
        return _strict(asdict(self), "no held-out weak states with admissible actions")


def misfit(
    weak: Sequence[Sequence[float] | np.ndarray],
    strong: Sequence[Sequence[float] | np.ndarray],
    *,
    eps: float = 1e-12,
) -> Misfit:
    """Action disagreement rate and mean KL(p_weak || p_strong) over states.

    ``weak[i]`` and ``strong[i]`` are the two agents' probabilities over the same admissible actions of
    state ``i`` (same order). Probabilities are renormalised; the strong side is clipped at ``eps`` so a zero
    where the weak agent puts mass gives a large finite KL. Argmax ties go to the first action.
    """
    if len(weak) != len(strong):
        raise ValueError(f"{len(weak)} weak distributions for {len(strong)} strong ones")
    if not weak:
        return Misfit(math.nan, math.nan, 0)
    disagree = 0
    kls = []
    for i, (pw, ps) in enumerate(zip(weak, strong, strict=True)):
        p = np.asarray(pw, dtype=float)
        q = np.asarray(ps, dtype=float)
        if p.shape != q.shape or p.ndim != 1 or p.size == 0:
            raise ValueError(f"state {i}: distributions of shapes {p.shape} and {q.shape}")
        p = p / p.sum()
        q = np.clip(q / q.sum(), eps, None)
        q = q / q.sum()
        disagree += int(np.argmax(p) != np.argmax(q))
        mask = p > 0
        kls.append(float(np.sum(p[mask] * (np.log(p[mask]) - np.log(q[mask])))))
    return Misfit(disagree / len(kls), float(np.mean(kls)), len(kls))


@dataclass(frozen=True)
class Transfer:
    """Pseudolabel correction and coverage expansion of a W2S model on train tasks."""

    correction: float
    """Share of the tasks the weak agent fails on that the W2S agent solves."""
    corrected: int
    weak_failed: int
    expansion: float
    """Share of the tasks where no weak exploration trajectory succeeded that the W2S agent solves."""
    expanded: int
    uncovered: int

    def as_dict(self) -> dict[str, float | int | str | None]:
        """Strict-JSON dict: a share with no task to count is null, with a ``reason``."""
        reasons = []
        if not math.isfinite(self.correction):
            reasons.append("correction: the weak agent failed no train task")
        if not math.isfinite(self.expansion):
            reasons.append("expansion: exploration solved every train task")
        return _strict(asdict(self), "; ".join(reasons))


def _strict(data: dict[str, Any], reason: str) -> dict[str, Any]:
    """``data`` with NaN and infinite numbers as None, and ``reason`` added when there were any."""
    out = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in data.items()}
    if any(v is None and data[k] is not None for k, v in out.items()):
        out["reason"] = reason or "not computed"
    return out


def transfer(
    weak_solved: Mapping[str, bool],
    w2s_solved: Mapping[str, bool],
    explored_solved: Mapping[str, bool],
) -> Transfer:
    """Correction and expansion over train tasks.

    Args:
        weak_solved: per task, whether the weak agent (its evaluation episodes) solved it.
        w2s_solved: per task, whether the W2S agent solved it.
        explored_solved: per task, whether any weak exploration trajectory succeeded on it.

    Tasks missing from ``w2s_solved`` count as not solved. Shares are NaN when their denominator is 0.
    """
    failed = [t for t, ok in weak_solved.items() if not ok]
    corrected = sum(bool(w2s_solved.get(t, False)) for t in failed)
    uncovered = [t for t, ok in explored_solved.items() if not ok]
    expanded = sum(bool(w2s_solved.get(t, False)) for t in uncovered)
    return Transfer(
        correction=corrected / len(failed) if failed else math.nan,
        corrected=corrected,
        weak_failed=len(failed),
        expansion=expanded / len(uncovered) if uncovered else math.nan,
        expanded=expanded,
        uncovered=len(uncovered),
    )
