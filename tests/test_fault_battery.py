"""The fault battery: every malformed input of ``tests/fault_cases.py`` gets one clear line and writes nothing.

For each case the ``w2s`` command line runs in a folder holding only the case's inputs; the case passes when
the exit status is non-zero, stderr is exactly one line ``w2s: error: ...`` naming what is wrong and where (the
case's fragment), nothing shows a traceback, and no file of the folder was created, changed or removed.
``bench/faults.py`` runs the same list and prints the counts.
"""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path

import pytest


def _load_fault_cases():
    name = "w2s_fault_cases"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("fault_cases.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


faults = _load_fault_cases()


def test_the_battery_is_broad() -> None:
    groups = Counter(c.group for c in faults.CASES)
    assert len(faults.CASES) >= 40
    assert set(groups) == {"config", "override", "store", "tree", "rows", "model", "args", "output"}
    assert len({c.name for c in faults.CASES}) == len(faults.CASES)  # names identify the cases


@pytest.mark.parametrize("case", faults.CASES, ids=lambda c: c.name)
def test_malformed_input_gets_one_clear_line_and_writes_nothing(case, tmp_path: Path) -> None:
    outcome = faults.run_case(case, tmp_path / "case")
    assert outcome.kind == "clear", outcome.describe()
    assert outcome.status == 2


def test_the_battery_tells_the_failures_apart(tmp_path: Path) -> None:
    """The sorting itself: an accepted input is silent, a message without the fragment or a written file is
    unclear (so a passing battery means what it says)."""
    store = faults.FaultCase(
        "good store", "store", lambda d: ["store", "check", str(faults._store(d))], "never printed"
    )
    assert faults.run_case(store, tmp_path / "a").kind == "silent"
    wrong_fragment = faults.FaultCase(
        "missing file", "store", lambda d: ["store", "check", "nope.jsonl"], "some other message"
    )
    assert faults.run_case(wrong_fragment, tmp_path / "b").kind == "unclear"

    # w2s viz of a run folder with one unreadable tree writes the pages of the others and exits 1 with the
    # error (by design): one line, but files written -> unclear
    def run_with_a_bad_tree(d: Path) -> list[str]:
        faults._trees(d / "run")
        faults._write(d, "run/trees/bad.json", "{}")
        return ["viz", "run"]

    outcome = faults.run_case(
        faults.FaultCase("partial", "tree", run_with_a_bad_tree, "bad.json"), tmp_path / "c"
    )
    assert outcome.status == 1 and outcome.stderr.count("\n") == 1 and "bad.json" in outcome.stderr
    assert outcome.kind == "unclear" and "run/viz/index.html" in outcome.changed
