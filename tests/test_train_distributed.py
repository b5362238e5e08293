"""Several processes (torchrun, gloo on CPU): DDP training gives the weights of one process taking the same
micro-batches with gradient accumulation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from w2s_agents.config import from_dict
from w2s_agents.trainers import TrainConfig, train_dpo


@pytest.mark.slow
def test_two_processes_equal_one_with_accumulation(train_models, pair_rows, tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in pair_rows))
    train = {"lr": 1e-2, "beta": 0.5, "batch_size": 2, "epochs": 2, "max_length": 512, "valid_fraction": 0.0,
             "warmup_ratio": 0.0, "checkpoint_every": 0, "reference": "strong"}  # fmt: skip
    cfg = tmp_path / "job.yaml"
    cfg.write_text(json.dumps({"model": str(train_models["policy"]), "data": [str(pairs)],
                               "out_dir": str(tmp_path / "ddp"), "train": train}))  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "W2S_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "w2s_agents", "train", "dpo", str(cfg)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("dpo, 12 rows") == 1  # only the main process reports
    assert "x2 processes" in done.stderr

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two processes
    single = from_dict(TrainConfig, {**train, "method": "dpo", "grad_accum": 2})
    try:
        one = train_dpo(
            train_models["policy"], pairs, tmp_path / "one", single, reference_path=train_models["policy"]
        )
    finally:
        torch.set_num_threads(threads)
    ddp = json.loads((tmp_path / "ddp" / "result.json").read_text())
    assert ddp["steps"] == one.steps == 6
    for (s1, a), (s2, b) in zip(one.loss_curve, ddp["loss_curve"], strict=True):
        assert s1 == s2 and a == pytest.approx(b, abs=1e-5)
    # the DPO metrics are averaged over the pairs of both processes
    for a, b in zip(one.metrics_curve, ddp["metrics_curve"], strict=True):
        assert a.keys() == b.keys() and "rewards/margins" in a
        assert a == pytest.approx(b, rel=1e-4, abs=1e-4)
    wa = load_file(str(one.model_dir / "model.safetensors"))
    wb = load_file(str(tmp_path / "ddp" / "model" / "model.safetensors"))
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=1e-4)
