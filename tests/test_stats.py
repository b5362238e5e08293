"""Evaluation statistics against hand computations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from w2s_agents.pipeline.stats import (
    PGR_MIN_GAP,
    Interval,
    bootstrap_interval,
    misfit,
    paired_pgr,
    pgr,
    transfer,
)


def strict(data: dict) -> dict:
    """``data`` through strict JSON: NaN or Infinity anywhere fails."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} in strict JSON")

    return json.loads(json.dumps(data), parse_constant=refuse)


def test_bootstrap_mean_and_degenerate_cases():
    iv = bootstrap_interval([1.0, 0.0, 1.0, 1.0])
    assert iv.estimate == pytest.approx(0.75)
    assert 0.0 <= iv.low <= 0.75 <= iv.high <= 1.0
    assert iv.n == 4
    const = bootstrap_interval([0.3] * 10)
    assert (const.low, const.high) == pytest.approx((0.3, 0.3))
    one = bootstrap_interval([0.4])
    assert (one.estimate, one.low, one.high, one.n) == (0.4, 0.4, 0.4, 1)
    empty = bootstrap_interval([])
    assert math.isnan(empty.estimate) and empty.n == 0
    assert empty.format() == "n/a"


def test_bootstrap_is_seeded_and_has_the_normal_width():
    x = np.random.default_rng(1).normal(0.0, 1.0, 400)
    a = bootstrap_interval(x, seed=3)
    b = bootstrap_interval(x, seed=3)
    assert a == b
    # a 95% interval of a mean of 400 unit-variance values is about 2 * 1.96 / 20 = 0.196 wide
    assert a.high - a.low == pytest.approx(0.196, rel=0.2)
    assert a.low < x.mean() < a.high


def test_two_stage_bootstrap_widens_with_seed_variation():
    # two seeds whose episodes disagree strongly: the seed level must widen the interval
    values = [0.0] * 50 + [1.0] * 50
    groups = ["s0"] * 50 + ["s1"] * 50
    flat = bootstrap_interval(values, seed=0)
    clustered = bootstrap_interval(values, groups, seed=0)
    assert clustered.estimate == flat.estimate == 0.5
    assert clustered.high - clustered.low > 2 * (flat.high - flat.low)
    with pytest.raises(ValueError, match="groups has 3 labels for 100 values"):
        bootstrap_interval(values, ["a", "b", "c"])


def test_interval_format():
    assert Interval(0.5, 0.25, 0.75, 8).format(2) == "0.50 [0.25, 0.75]"
    assert Interval(0.5, 0.25, 0.75, 8).format(1, scale=100) == "50.0 [25.0, 75.0]"
    assert Interval(0.5, math.nan, math.nan, 1).format(2) == "0.50"


def test_pgr_formula():
    assert pgr(0.2, 0.5, 0.6) == pytest.approx(0.75)
    assert pgr(0.2, 0.1, 0.6) == pytest.approx(-0.25)
    assert math.isnan(pgr(0.6, 0.7, 0.6))
    assert math.isnan(pgr(0.6, 0.7, 0.5))


def test_paired_pgr_uses_shared_units():
    weak = {("t0", 0): 0.0, ("t1", 0): 0.0, ("t2", 0): 1.0, ("t3", 0): 0.5}
    w2s = {("t0", 0): 1.0, ("t1", 0): 0.0, ("t2", 0): 1.0}
    ceiling = {("t0", 0): 1.0, ("t1", 0): 1.0, ("t2", 0): 1.0, ("t3", 0): 1.0}
    iv = paired_pgr(weak, w2s, ceiling, seed=0)
    # shared units t0..t2: means weak 1/3, w2s 2/3, ceiling 1 -> (1/3) / (2/3)
    assert iv.n == 3
    assert iv.estimate == pytest.approx(0.5)
    assert iv.low <= 0.5 <= iv.high
    no_gap = paired_pgr({"a": 1.0}, {"a": 1.0}, {"a": 1.0})
    assert math.isnan(no_gap.estimate)
    assert (
        strict(no_gap.as_dict())["estimate"] is None and "below the minimum gap" in no_gap.as_dict()["reason"]
    )


def test_pgr_with_a_gap_below_the_minimum_is_not_a_number_with_its_reason():
    # ceiling 0.0001 above weak: the ratio would be 0.2 / 0.0001 = 2000
    units = [("t", i) for i in range(10)]
    weak = dict.fromkeys(units, 0.5)
    ceiling = {**weak, units[0]: 0.501}
    w2s = dict.fromkeys(units, 0.7)
    assert pgr(0.5, 0.7, 0.5001) == pytest.approx(2000)  # the bare formula, no minimum
    assert math.isnan(pgr(0.5, 0.7, 0.5001, min_gap=PGR_MIN_GAP))
    iv = paired_pgr(weak, w2s, ceiling, seed=0)
    d = strict(iv.as_dict())
    assert (d["estimate"], d["low"], d["high"], d["n"]) == (None, None, None, 10)
    assert (
        d["reason"] == "ceiling - weak = 0.0001 in average return, below the minimum gap 0.05 (PGR_MIN_GAP)"
    )
    assert iv.format(2) == "n/a"
    assert Interval.from_dict(d) == iv


def test_pgr_bootstrap_reports_the_share_of_dropped_resamples():
    # 3 of 6 units where the ceiling is 0.5 above weak: a resample drawing none or few of them has a mean gap
    # below 0.05 (all draws from the other 3 units give gap 0) and is dropped; every unit has gap 0 or 0.5
    units = list(range(6))
    weak = dict.fromkeys(units, 0.0)
    ceiling = {u: 0.5 if u < 3 else 0.0 for u in units}
    w2s = {u: 0.25 if u < 3 else 0.0 for u in units}
    iv = paired_pgr(weak, w2s, ceiling, seed=0, resamples=4000)
    assert iv.estimate == pytest.approx(0.5)
    # a resample is dropped when none of its 6 draws is one of the first 3 units: (1/2)^6
    assert iv.dropped == pytest.approx(0.5**6, abs=0.01)
    d = strict(iv.as_dict())
    assert d["dropped_resamples"] == iv.dropped and "reason" not in d
    full = paired_pgr(dict.fromkeys(units, 0.0), w2s, dict.fromkeys(units, 1.0), seed=0)
    assert full.dropped == 0.0


def test_as_dict_is_strict_json_with_reasons():
    assert strict(bootstrap_interval([]).as_dict()) == {
        "estimate": None, "low": None, "high": None, "n": 0, "level": 0.95, "reason": "no observations",
    }  # fmt: skip
    assert strict(Interval(0.5, 0.25, 0.75, 8).as_dict()) == {
        "estimate": 0.5, "low": 0.25, "high": 0.75, "n": 8, "level": 0.95,
    }  # fmt: skip
    m = strict(misfit([], []).as_dict())
    assert (m["disagreement"], m["kl"], m["states"]) == (None, None, 0) and "no held-out" in m["reason"]
    t = strict(transfer({"a": True}, {}, {"a": True}).as_dict())
    assert (t["correction"], t["expansion"]) == (None, None)
    assert t["reason"] == (
        "correction: the weak agent failed no train task; expansion: exploration solved every train task"
    )


def test_misfit_by_hand():
    m = misfit([[0.5, 0.5], [0.9, 0.1]], [[0.25, 0.75], [0.9, 0.1]])
    kl0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert m.states == 2
    assert m.disagreement == pytest.approx(0.5)  # state 0: argmax 0 (first of a tie) vs 1
    assert m.kl == pytest.approx(kl0 / 2)
    # a zero where the weak agent puts mass gives a large but finite KL
    big = misfit([[1.0, 0.0]], [[0.0, 1.0]])
    assert math.isfinite(big.kl) and big.kl > 20 and big.disagreement == 1.0
    with pytest.raises(ValueError, match="state 0"):
        misfit([[0.5, 0.5]], [[1.0]])


def test_transfer_by_hand():
    weak = {"a": False, "b": False, "c": True, "d": False}
    w2s = {"a": True, "b": False, "c": True}  # d missing counts as not solved
    explored = {"a": True, "b": False, "c": True, "d": False}
    t = transfer(weak, w2s, explored)
    assert (t.corrected, t.weak_failed) == (1, 3)
    assert t.correction == pytest.approx(1 / 3)
    assert (t.expanded, t.uncovered) == (0, 2)
    assert t.expansion == 0.0
    assert math.isnan(transfer({"a": True}, {}, {"a": True}).correction)
