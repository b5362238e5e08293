"""`w2s train sft|dpo|mcts-sft CONFIG [KEY=VALUE ...]` with the shipped example configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from w2s_agents.agents.models import load_model
from w2s_agents.cli import main
from w2s_agents.config import load_config
from w2s_agents.trainers import TrainJobConfig

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread_module")


def test_every_example_train_config_is_valid() -> None:
    files = sorted((REPO / "configs").glob("train-*.yaml"))
    assert {f.name for f in files} >= {
        "train-sft-tiny.yaml",
        "train-dpo-tiny.yaml",
        "train-mcts-sft-tiny.yaml",
    }
    for f in files:
        job = load_config(TrainJobConfig, f)
        assert job.data and job.model
    gpu = load_config(TrainJobConfig, REPO / "configs" / "train-dpo-gpu.yaml")
    assert gpu.train.lora.enabled and gpu.train.gradient_checkpointing and gpu.train.dtype == "bfloat16"


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_train_commands_with_the_tiny_configs(train_models, sft_rows, pair_rows, tmp_path, capsys) -> None:
    sft = _write(tmp_path / "sft.jsonl", sft_rows)
    pairs = _write(tmp_path / "pairs.jsonl", pair_rows)
    common = ["train.max_steps=2", "train.max_length=512", "train.checkpoint_every=1"]
    out = tmp_path / "sft-run"
    args = [f"model={train_models['policy']}", f"data=[{sft}]", f"out_dir={out}", *common]
    assert main(["train", "sft", str(REPO / "configs" / "train-sft-tiny.yaml"), *args]) == 0
    printed = capsys.readouterr().out
    assert (
        f"{out}: sft, 12 rows (0 too long), 2 steps, loss " in printed and f"model {out / 'model'}" in printed
    )
    assert load_model(out / "model").model.config.model_type == "llama"

    out = tmp_path / "mcts"
    args = [f"model={train_models['policy']}", f"data=[{sft}]", f"out_dir={out}", *common]
    assert main(["train", "mcts-sft", str(REPO / "configs" / "train-mcts-sft-tiny.yaml"), *args]) == 0
    assert f"{out}: mcts-sft, 12 rows" in capsys.readouterr().out

    out = tmp_path / "dpo"
    args = [f"model={train_models['policy']}", f"weak_model={train_models['weak']}", f"data=[{pairs}]",
            f"out_dir={out}", *common]  # fmt: skip
    assert main(["train", "dpo", str(REPO / "configs" / "train-dpo-tiny.yaml"), *args]) == 0
    assert f"{out}: dpo, 12 rows" in capsys.readouterr().out
    assert (out / "reference.jsonl").is_file() and (out / "model" / "config.json").is_file()
    # a rerun finds the finished run
    assert main(["train", "dpo", str(REPO / "configs" / "train-dpo-tiny.yaml"), *args]) == 0


def test_train_errors_are_one_line(train_models, pair_rows, tmp_path, capsys) -> None:
    pairs = _write(tmp_path / "pairs.jsonl", pair_rows)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {train_models['policy']}\ndata: [{pairs}]\ntrain:\n  method: sft\n  lr: 1e-3\n")
    assert main(["train", "dpo", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "train.method is 'sft' but the command trains 'dpo'" in err and err.count("\n") == 1
    cfg.write_text(f"model: {train_models['policy']}\ndata: [{pairs}]\ntrain:\n  lrr: 1e-3\n")
    assert main(["train", "dpo", str(cfg)]) == 2
    assert f"{cfg}:4: unknown config key 'train.lrr' (did you mean 'lr'?)" in capsys.readouterr().err
    cfg.write_text(f"model: {train_models['policy']}\ndata: [{pairs}]\nout_dir: {tmp_path / 'o'}\n")
    assert main(["train", "dpo", str(cfg)]) == 2
    assert "'weak_model' must be set when train.reference is weak" in capsys.readouterr().err
    assert main(["train", "sft", str(cfg), "train.max_steps=1"]) == 2
    assert "rows[0]" not in (err := capsys.readouterr().err) and "an SFT row needs 'messages'" in err
    assert f"{pairs}:1:" in err


def test_docs_list_every_train_config_key() -> None:
    from w2s_agents.config import describe_config

    text = (REPO / "docs" / "training.md").read_text()
    missing = [key for key, *_ in describe_config(TrainJobConfig) if f"| `{key}` |" not in text]
    assert missing == []
