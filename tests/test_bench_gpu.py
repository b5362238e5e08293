"""The GPU check (bench/gpu.py) on the CPU at its tiny size: every section of the report holds figures, none an
error or a skip, run from the checkout alone (the editable install's finder removed) with ray, textworld,
gymnasium, trl, datasets, jericho, vllm and wandb hidden."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

WRAPPER = textwrap.dedent(
    """
    import runpy, sys

    BLOCKED = {"ray", "textworld", "gymnasium", "trl", "datasets", "jericho", "vllm", "wandb"}

    class Hide:
        # a meta-path finder that finds nothing of the blocked packages, as if they were not installed

        def __init__(self, inner):
            self.inner = inner

        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                return None
            return self.inner.find_spec(name, path, target)

        def __getattr__(self, name):  # invalidate_caches, find_distributions (importlib.metadata)
            return getattr(self.inner, name)

    # as on a machine where the project is not installed: only the checkout's own files
    sys.meta_path[:] = [
        Hide(f) for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")
    ]
    sys.argv = [sys.argv[1], *sys.argv[2:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
    """
)


def _numbers(cell: str) -> list[float]:
    return [float(m.group().replace(",", "")) for m in re.finditer(r"\d[\d,]*(?:\.\d+)?", cell)]


@pytest.mark.slow
def test_tiny_gpu_check_on_the_cpu_fills_every_section(tmp_path: Path) -> None:
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER, encoding="utf-8")
    out = tmp_path / "report" / "gpu.md"
    args = ["--device", "cpu", "--tiny", "--budget-s", "60", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}  # no bench/__pycache__
    done = subprocess.run(
        [sys.executable, str(wrapper), str(REPO / "bench" / "gpu.py"), *args],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=tmp_path,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert out.is_file() and "## GPU check" in out.read_text(encoding="utf-8")
    assert "### End to end" in done.stdout  # the report is printed too
    report = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    tables = {t["title"].split(" (")[0].split(":")[0]: t for t in report["tables"]}
    assert set(tables) == {"Models", "Rollouts", "Training throughput", "End to end on cpu"}
    for table in report["tables"]:
        for row in table["rows"]:
            for cell in row.values():
                assert not cell.startswith(("error", "skipped")), (table["title"], row)

    (model,) = tables["Models"]["rows"]
    assert _numbers(model["parameters"])[0] > 100_000
    rollouts = tables["Rollouts"]["rows"]
    assert [r["mode"] for r in rollouts] == ["choose", "generate"]
    for r in rollouts:
        rates = _numbers(r["decisions/s"])
        assert len(rates) == 3 and all(x > 0 for x in rates), r
        assert all(x > 0 for x in _numbers(r["tokens/s"])), r
    training = tables["Training throughput"]["rows"]
    assert {(r["method"], r["weights"], r["loop"].split()[0]) for r in training} == {
        ("SFT", "full", "project"), ("SFT", "full", "bare"), ("SFT", "LoRA r64", "project"),
        ("DPO", "full", "project"), ("DPO", "LoRA r64", "project"),
    }  # fmt: skip
    for r in training:
        assert _numbers(r["tokens/s"])[0] > 0, r
        assert r["MFU (nominal)"] == r["MFU (run)"] == "", r  # no peak FLOP/s is known for a CPU
    e2e = tables["End to end on cpu"]["rows"]
    assert len(e2e) == 6
    assert all(r["result"] == "ok" for r in e2e), e2e
    resumed = next(r for r in e2e if r["check"].startswith("kill"))
    assert "resumed from step 2, finished at step 4" in resumed["detail"]
