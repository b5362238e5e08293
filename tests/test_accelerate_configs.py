"""The accelerate launch configs of configs/accelerate/ (docs/training.md): accelerate's own config reader loads
them as DDP on GPUs without accelerate's mixed precision (the trainers set precision from train.dtype), and the
documented launch command trains on two CPU processes with the multi-GPU config."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest


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
    repo_root: Path, train_models, pair_rows, two_processes_and_one, tmp_path: Path
) -> None:
    """The documented command on a machine without GPUs: the multi-GPU config with ``--num_processes 2`` starts
    two processes that train on the CPU over gloo, with the weights of one process taking the same micro-batches
    with gradient accumulation. (``--cpu`` would start one process: accelerate runs several CPU processes only
    with ``distributed_type: MULTI_CPU``.)"""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(repo_root / "configs" / "accelerate" / "multi-gpu.yaml"), "--num_processes", "2",
                "--main_process_port", str(_free_port())]  # fmt: skip
    two_processes_and_one(tmp_path, train_models["policy"], pair_rows, launcher, {"CUDA_VISIBLE_DEVICES": ""})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_leave_process_group_destroys_the_group_and_is_a_no_op_without_one(tmp_path: Path) -> None:
    """``w2s train`` leaves the process group before the process exits (a process that exits still in a gloo
    group can abort while the interpreter tears down gloo's threads, failing a finished run): after
    ``leave_process_group`` no group is left, and without a group it does nothing. Run in a child process so
    that this process never joins a group."""
    import subprocess

    script = f"""
import torch.distributed as dist
from w2s_agents.trainers.distributed import leave_process_group
leave_process_group()  # no group yet: nothing to do
dist.init_process_group("gloo", init_method="file://{tmp_path / "store"}", rank=0, world_size=1)
before = dist.is_initialized()
leave_process_group()
print(before, dist.is_initialized())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", "False"]
