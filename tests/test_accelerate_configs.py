"""The accelerate launch configs of configs/accelerate/ (docs/training.md): accelerate's own config reader loads
them as DDP on GPUs without accelerate's mixed precision (the trainers set precision from train.dtype), and the
documented launch command trains on two CPU processes with the multi-GPU config."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from w2s_agents.config import from_dict
from w2s_agents.trainers import TrainConfig, train_dpo


@pytest.mark.parametrize("name", ["multi-gpu", "multi-node"])
def test_accelerate_configs_load_as_ddp_without_mixed_precision(repo_root: Path, name: str) -> None:
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    path = repo_root / "configs" / "accelerate" / f"{name}.yaml"
    cfg = load_config_from_file(str(path))
    assert cfg.distributed_type == DistributedType.MULTI_GPU
    assert cfg.mixed_precision == "no" and not cfg.use_cpu
    assert cfg.num_processes >= cfg.num_machines >= 1 and cfg.num_processes % cfg.num_machines == 0
    assert 0 <= cfg.machine_rank < cfg.num_machines
    if cfg.num_machines > 1:
        assert cfg.main_process_ip and cfg.main_process_port
    # the launch command in the file's header names the file itself
    assert f"--config_file configs/accelerate/{name}.yaml -m w2s_agents train" in path.read_text()


@pytest.mark.slow
def test_accelerate_launch_with_the_config_trains_on_two_processes(
    repo_root: Path, train_models, pair_rows, tmp_path: Path
) -> None:
    """The documented command on a machine without GPUs: the multi-GPU config with ``--num_processes 2`` starts
    two processes that train on the CPU over gloo, with the weights of one process taking the same micro-batches
    with gradient accumulation. (``--cpu`` would start one process: accelerate runs several CPU processes only
    with ``distributed_type: MULTI_CPU``.)"""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in pair_rows))
    train = {"lr": 1e-2, "beta": 0.5, "batch_size": 2, "epochs": 2, "max_length": 512, "valid_fraction": 0.0,
             "warmup_ratio": 0.0, "checkpoint_every": 0, "reference": "strong"}  # fmt: skip
    cfg = tmp_path / "job.yaml"
    cfg.write_text(json.dumps({"model": str(train_models["policy"]), "data": [str(pairs)],
                               "out_dir": str(tmp_path / "ddp"), "train": train}))  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "W2S_PROGRESS": "0", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(repo_root / "configs" / "accelerate" / "multi-gpu.yaml"), "--num_processes", "2",
           "--main_process_port", str(_free_port()), "-m", "w2s_agents", "train", "dpo", str(cfg)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("dpo, 12 rows") == 1  # only the main process reports
    assert "x2 processes" in done.stderr
    # 12 pairs, 2 per micro-batch, one micro-batch per process per step: 3 steps an epoch
    ddp = json.loads((tmp_path / "ddp" / "result.json").read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two processes
    try:
        single = from_dict(TrainConfig, {**train, "method": "dpo", "grad_accum": 2})
        one = train_dpo(
            train_models["policy"], pairs, tmp_path / "one", single, reference_path=train_models["policy"]
        )
    finally:
        torch.set_num_threads(threads)
    assert ddp["steps"] == one.steps == 6
    wa = load_file(str(one.model_dir / "model.safetensors"))
    wb = load_file(str(tmp_path / "ddp" / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=1e-4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
