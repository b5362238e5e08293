"""A training run killed with SIGKILL after a checkpoint and resumed ends with exactly the weights of an
uninterrupted run (CPU, dropout on, gradient accumulation, source weights)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

CHILD = """
import json, sys, time
import torch
torch.set_num_threads(1)
from w2s_agents.config import from_dict
from w2s_agents.log import setup_logging
from w2s_agents.trainers import TrainConfig, logps, train_sft

model, rows_file, out, cfg_file, mode = sys.argv[1:6]
if mode == "slow":  # give the parent time to kill the run between checkpoints
    original = logps.token_logps
    def slow(*args, **kwargs):
        time.sleep(0.2)
        return original(*args, **kwargs)
    logps.token_logps = slow
setup_logging("INFO")
config = from_dict(TrainConfig, json.loads(open(cfg_file).read()))
result = train_sft(model, json.loads(open(rows_file).read()), out, config)
print("steps", result.steps)
"""


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=240)


@pytest.mark.slow
def test_killed_and_resumed_run_equals_an_uninterrupted_run(train_models, sft_rows, tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    for f in train_models["policy"].iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    config = json.loads((model / "config.json").read_text())
    config["attention_dropout"] = 0.1  # dropout draws random numbers: the RNG state must be restored too
    (model / "config.json").write_text(json.dumps(config))
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps(sft_rows))
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({
        "lr": 5e-3, "batch_size": 2, "grad_accum": 2, "epochs": 3, "max_length": 256, "checkpoint_every": 2,
        "valid_fraction": 0.0, "warmup_ratio": 0.2, "weight_decay": 0.01, "keep_checkpoints": 3,
        "sources": {"weights": True, "weight_lr": 0.02, "easy_first": True},
    }))  # fmt: skip
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "W2S_PROGRESS": "0"}
    base = [sys.executable, str(child), str(model), str(rows)]

    reference = tmp_path / "uninterrupted"
    done = _run([*base, str(reference), str(cfg), "fast"], env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "steps 9" in done.stdout

    killed = tmp_path / "killed"
    proc = subprocess.Popen([*base, str(killed), str(cfg), "slow"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    target = killed / "checkpoints" / "step-00000004" / "state.json"
    deadline = time.monotonic() + 180
    while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert target.exists() and not (killed / "result.json").exists()
    steps_at_kill = sorted(p.name for p in (killed / "checkpoints").iterdir() if not p.name.startswith("."))
    assert steps_at_kill[-1] in ("step-00000004", "step-00000006")

    resumed = _run([*base, str(killed), str(cfg), "fast"], env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming sft from" in resumed.stderr and "steps 9" in resumed.stdout

    a = load_file(str(reference / "model" / "model.safetensors"))
    b = load_file(str(killed / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name  # bit-identical weights
    initial = load_file(str(train_models["policy"] / "model.safetensors"))
    assert not torch.equal(a["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (reference, killed))
    assert ra["loss_curve"] == rb["loss_curve"] and ra["source_weights"] == rb["source_weights"]
    assert ra["metrics_curve"] == rb["metrics_curve"] and len(ra["metrics_curve"]) == 9  # part of the state
    assert ra["final_metrics"] == rb["final_metrics"]
    assert ra["source_weights"]["weak-a"] != pytest.approx(0.5)
