"""The accelerate launch configs of configs/accelerate/ (docs/training.md): accelerate's own config reader loads
them as DDP on GPUs without accelerate's mixed precision (the trainers set precision from train.dtype)."""

from __future__ import annotations

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
