"""A training run killed with SIGKILL after a checkpoint and resumed ends with exactly the weights of an
uninterrupted run (CPU, dropout on, gradient accumulation, source weights)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


@pytest.mark.slow
def test_killed_and_resumed_run_equals_an_uninterrupted_run(
    train_models, sft_rows, kill_and_resume, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    model.mkdir()
    for f in train_models["policy"].iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    config = json.loads((model / "config.json").read_text())
    config["attention_dropout"] = 0.1  # dropout draws random numbers: the RNG state must be restored too
    (model / "config.json").write_text(json.dumps(config))
    train = {
        "lr": 5e-3, "batch_size": 2, "grad_accum": 2, "epochs": 3, "max_length": 256, "checkpoint_every": 2,
        "valid_fraction": 0.0, "warmup_ratio": 0.2, "weight_decay": 0.01, "keep_checkpoints": 3,
        "sources": {"weights": True, "weight_lr": 0.02, "easy_first": True},
    }  # fmt: skip
    run = kill_and_resume(tmp_path, "train_sft", model, sft_rows, train, "step-00000004")
    assert run.uninterrupted.returncode == 0, run.uninterrupted.stderr[-3000:]
    assert "steps 9" in run.uninterrupted.stdout
    assert run.killed_returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert "step-00000004" in run.checkpoints_at_kill and not run.result_at_kill
    assert run.checkpoints_at_kill[-1] in ("step-00000004", "step-00000006")
    assert run.resumed.returncode == 0, run.resumed.stderr[-3000:]
    assert "resuming sft from" in run.resumed.stderr and "steps 9" in run.resumed.stdout
    reference, killed = run.reference, run.killed

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
