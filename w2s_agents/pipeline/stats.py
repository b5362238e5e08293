"""Evaluation statistics: intervals over episodes and seeds, PGR, misfit, correction and expansion.

Everything here works on plain numbers (no models, no envs), so the report's figures can be recomputed from
the evaluation trajectories alone and tested against hand computations.

Intervals are percentile bootstraps. When the evaluation ran several seeds, the bootstrap is two-stage
(resample seeds, then episodes within each drawn seed), so seed-to-seed variation widens the interval as it
should; with one seed it resamples episodes. Resampling is seeded, so the same data give the same interval.
Comparisons between models evaluated on the same (task, seed) episodes (PGR) resample those shared units
jointly (a paired bootstrap).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = [
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


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided interval (``low``, ``high``) at ``level`` from ``n`` observations."""

    estimate: float
    low: float
    high: float
    n: int
    level: float = 0.95

    def as_dict(self) -> dict[str, float | int]:
        """Plain dict for JSON."""
        return asdict(self)

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
        return Interval(math.nan, math.nan, math.nan, 0, level)
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
    return Interval(estimate, low, high, int(x.size), level)


def pgr(weak: float, w2s: float, ceiling: float) -> float:
    """Performance gap recovered: ``(w2s - weak) / (ceiling - weak)``; NaN unless ``ceiling > weak``."""
    if not ceiling > weak:
        return math.nan
    return (w2s - weak) / (ceiling - weak)


def paired_pgr(
    weak: Mapping[Hashable, float],
    w2s: Mapping[Hashable, float],
    ceiling: Mapping[Hashable, float],
    *,
    level: float = 0.95,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Interval:
    """PGR of mean scores over the episodes the three models share, with a paired bootstrap interval.

    Each mapping goes from an episode unit (e.g. ``(task_id, seed)``) to that model's score on it. Units
    missing from any model are left out. Resamples whose ceiling does not beat the weak model are dropped
    from the interval; the estimate is NaN when the full sample's ceiling does not beat the weak model.
    """
    _check_level(level)
    units = [u for u in weak if u in w2s and u in ceiling]
    if not units:
        return Interval(math.nan, math.nan, math.nan, 0, level)
    a = np.array([[weak[u], w2s[u], ceiling[u]] for u in units], dtype=float)
    means = a.mean(axis=0)
    estimate = pgr(*means)
    if len(units) == 1 or not math.isfinite(estimate):
        return Interval(estimate, math.nan, math.nan, len(units), level)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(units), (resamples, len(units)))
    m = a[idx].mean(axis=1)  # (resamples, 3)
    gap = m[:, 2] - m[:, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        samples = np.where(gap > 0, (m[:, 1] - m[:, 0]) / gap, np.nan)
    low, high = _percentiles(samples, level)
    return Interval(float(estimate), low, high, len(units), level)


@dataclass(frozen=True)
class Misfit:
    """How far the W2S strong agent departs from the weak agent on held-out weak states."""

    disagreement: float
    """Share of states where the two agents' most likely actions differ."""
    kl: float
    """Mean KL(pi_weak || pi_w2s) over the admissible actions of each state (nats)."""
    states: int

    def as_dict(self) -> dict[str, float | int]:
        """Plain dict for JSON."""
        return asdict(self)


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

    def as_dict(self) -> dict[str, float | int]:
        """Plain dict for JSON."""
        return asdict(self)


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
