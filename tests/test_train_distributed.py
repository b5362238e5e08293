"""Several processes (torchrun, gloo on CPU): DDP training gives the weights of one process taking the same
micro-batches with gradient accumulation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_two_processes_equal_one_with_accumulation(
    train_models, pair_rows, two_processes_and_one, tmp_path: Path
) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    ddp, one = two_processes_and_one(tmp_path, train_models["policy"], pair_rows, launcher)
    for (s1, a), (s2, b) in zip(one.loss_curve, ddp["loss_curve"], strict=True):
        assert s1 == s2 and a == pytest.approx(b, abs=1e-5)
    # the DPO metrics are averaged over the pairs of both processes
    for a, b in zip(one.metrics_curve, ddp["metrics_curve"], strict=True):
        assert a.keys() == b.keys() and "rewards/margins" in a
        assert a == pytest.approx(b, rel=1e-4, abs=1e-4)
