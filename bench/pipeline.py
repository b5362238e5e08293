"""Benchmark of ``w2s run`` with its stages one after the other (``run.jobs=1``) and side by side
(``run.jobs=2`` or more), side by side in one invocation: wall time of a whole run seed, per-stage times, and the
ratio.

Each measured run is a real ``w2s run`` in a fresh run folder (a subprocess, as a user starts it), on the same
config and seed, so both compute the same stages with the same results (tests/test_pipeline.py checks that the
outputs are equal); only the scheduling differs. The games are made once before the timed runs (a game cache of
the benchmark's own) unless ``--empty-cache``, which gives every timed run an empty cache, so that its time
includes making the games, as a first run on a new machine does. Runs alternate between the settings
(``--repeats`` rounds); each setting's best run counts (a shared machine's load only slows runs down).

    python bench/pipeline.py                          # the default experiment at a reduced scale (--scale quick)
    python bench/pipeline.py --scale full             # the default experiment itself (about 25 minutes on 2 cores)
    python bench/pipeline.py --scale full --empty-cache --jobs 2
    python bench/pipeline.py --config configs/paper-table.yaml --set tasks.train=20
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

QUICK = [
    "tasks.train=20",
    "tasks.demos=4",
    "tasks.test=20",
    "explore.seeds=2",
    "train.strong_sft.epochs=30",
    "train.ceiling_sft.epochs=10",
    "train.mcts_sft.epochs=10",
]
"""``--scale quick``: the default experiment with fewer games, explorations and epochs (a few minutes a run)."""


def run_once(config: str | None, overrides: list[str], jobs: int, out: Path, cache: Path) -> dict[str, Any]:
    """One ``w2s run`` with ``run.jobs=jobs`` in a fresh folder under ``out``; its wall time and stage times."""
    name = f"jobs-{jobs}-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "w2s_agents.cli", "run", *([config] if config else [])]
    cmd += [*overrides, f"run.jobs={jobs}", f"run.name={name}", f"run.out_dir={out}"]
    env = {**os.environ, "W2S_CACHE": str(cache), "W2S_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    log = out / f"{name}.stderr"
    out.mkdir(parents=True, exist_ok=True)
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        peak = _watch_memory(proc)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"bench/pipeline.py: `{' '.join(cmd)}` failed:\n{log.read_text()[-3000:]}")
    manifest = json.loads((out / name / "manifest.json").read_text())
    stages: dict[str, float] = {}
    for st in manifest["stages"]:
        stages[st["name"]] = stages.get(st["name"], 0.0) + float(st.get("seconds", 0.0))
    metrics = json.loads((out / name / "metrics.json").read_text())
    returns = {m: v["return"]["estimate"] for m, v in metrics["models"].items()}
    return {
        "jobs": jobs,
        "wall_s": wall,
        "peak_rss_gb": peak / 1e9,
        "stages": stages,
        "returns": returns,
        "folder": str(out / name),
    }


def _watch_memory(proc: subprocess.Popen) -> int:
    """Wait for ``proc``; return the peak of the summed resident memory of it and all its descendants (stages
    side by side add up), sampled every 0.2 s."""
    import psutil

    peak = 0
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        total = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
        except psutil.Error:
            pass
        peak = max(peak, total)
        time.sleep(0.2)
    return peak


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its table (and write it as JSON with ``--json``)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="experiment config (default: the embedded default)")
    ap.add_argument(
        "--scale", choices=["quick", "full"], default="quick", help="quick: fewer games and epochs"
    )
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more overrides")
    ap.add_argument("--jobs", default="1,2", help="run.jobs settings to compare (default 1,2)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per setting (the best counts)")
    ap.add_argument(
        "--empty-cache", action="store_true", help="every run makes its games (an empty game cache)"
    )
    ap.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    settings = [int(j) for j in args.jobs.split(",")]
    overrides = [*(QUICK if args.scale == "quick" else []), *args.set]
    with tempfile.TemporaryDirectory(prefix="w2s-bench-pipeline-") as tmp:
        out = args.out or Path(tmp) / "runs"
        cache = Path(tmp) / "cache"
        if not args.empty_cache:  # make the games once, untimed
            warm = [*overrides, "run.jobs=1", "run.name=warm", f"run.out_dir={Path(tmp) / 'warm'}"]
            cmd = [sys.executable, "-m", "w2s_agents.cli", "run", *([args.config] if args.config else [])]
            env = {**os.environ, "W2S_CACHE": str(cache), "W2S_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
            subprocess.run([*cmd, *warm, "--until", "held-out"], env=env, check=True, capture_output=True)
        runs: dict[int, list[dict[str, Any]]] = {j: [] for j in settings}
        for r in range(args.repeats):
            for j in settings:
                run_cache = Path(tmp) / f"cache-{j}-{r}" if args.empty_cache else cache
                runs[j].append(run_once(args.config, overrides, j, out, run_cache))
                print(f"run.jobs={j} (repeat {r + 1}): {runs[j][-1]['wall_s']:.1f} s", flush=True)
    best = {j: min(rs, key=lambda x: x["wall_s"]) for j, rs in runs.items()}
    base = best[settings[0]]
    print(
        f"\nw2s run, one seed, {'empty game cache' if args.empty_cache else 'games made'}; overrides: "
        f"{' '.join(overrides) or '(none)'}"
    )
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"\n| run.jobs | wall (s) | speed-up vs run.jobs={settings[0]} | peak memory, all processes (GB) |")
    print("| --- | --- | --- | --- |")
    for j in settings:
        b = best[j]
        print(f"| {j} | {b['wall_s']:.1f} | {base['wall_s'] / b['wall_s']:.2f}x | {b['peak_rss_gb']:.2f} |")
    names = list(base["stages"])
    print("\n| stage | " + " | ".join(f"run.jobs={j} (s)" for j in settings) + " |")
    print("| --- |" + " --- |" * len(settings))
    for n in names:
        print(f"| {n} | " + " | ".join(f"{best[j]['stages'].get(n, 0.0):.1f}" for j in settings) + " |")
    same = all(best[j]["returns"] == base["returns"] for j in settings)
    print(f"\nheld-out returns equal across settings: {same} ({base['returns']})")
    if args.json:
        args.json.write_text(json.dumps({"overrides": overrides, "runs": runs}, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
