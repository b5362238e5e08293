"""SFT / MCTS-SFT training of tiny models: parameters change and the loss falls, LoRA touches only adapters,
validation picks the exported checkpoint, NaN stops cleanly, finished runs are not redone."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from w2s_agents.agents.models import load_model
from w2s_agents.config import from_dict
from w2s_agents.errors import W2SError
from w2s_agents.trainers import (
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    TrainResult,
    latest_checkpoint,
    train_sft,
)
from w2s_agents.trainers import logps as logps_module
from w2s_agents.trainers.checkpoint import trainable_state

pytestmark = pytest.mark.usefixtures("one_torch_thread_module")


def cfg(**kw) -> TrainConfig:
    base = dict(lr=5e-3, batch_size=4, max_length=256, epochs=2, valid_fraction=0.0, checkpoint_every=0,
                warmup_ratio=0.0, log_every=100)  # fmt: skip
    base.update(kw)
    return from_dict(TrainConfig, base)


@pytest.fixture
def initial_trainable(monkeypatch) -> dict[str, dict[str, torch.Tensor]]:
    """Records the trainable parameters of the next Trainer as training starts (after LoRA is added)."""
    seen: dict[str, dict[str, torch.Tensor]] = {}
    original = Trainer._fresh_state

    def spy(self):
        seen["state"] = {k: v.clone() for k, v in trainable_state(self.model).items()}
        return original(self)

    monkeypatch.setattr(Trainer, "_fresh_state", spy)
    return seen


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_model(model_dir).model.state_dict().items()}


def test_sft_changes_every_parameter_and_the_loss_falls(
    train_models, sft_rows, tmp_path, initial_trainable
) -> None:
    out = tmp_path / "sft"
    result = train_sft(train_models["policy"], sft_rows, out, cfg(epochs=4))
    assert result.method == "sft" and result.steps == 12 and result.rows == 12
    first = result.loss_curve[0][1]
    last = sum(v for _, v in result.loss_curve[-3:]) / 3
    assert last < first - 0.5, result.loss_curve
    before = initial_trainable["state"]
    after = _weights(result.model_dir)
    assert len(before) == len(list(load_model(train_models["policy"]).model.parameters()))
    unchanged = [n for n, t in before.items() if torch.equal(t, after[n])]
    assert unchanged == []  # every trainable parameter moved
    assert result.tokens_per_second > 0 and result.train_tokens > 0
    for name in ("curves.json", "result.json", "train_config.yaml"):
        assert (out / name).is_file()
    curves = json.loads((out / "curves.json").read_text())
    assert [s for s, _ in curves["loss"]] == list(range(1, 13))
    # SFT records its loss, gradient norm and learning rate per step in the metrics curve
    assert curves["metrics"] == result.metrics_curve
    assert [(e["step"], e["loss"]) for e in result.metrics_curve] == result.loss_curve
    assert all(set(e) == {"step", "loss", "grad_norm", "learning_rate"} for e in result.metrics_curve)
    assert result.metrics_curve[0]["learning_rate"] == pytest.approx(5e-3)  # no warmup: the peak at once
    assert TrainResult.load(out) == result
    meta = json.loads((result.model_dir / "w2s_train.json").read_text())
    assert meta["method"] == "sft" and meta["step"] == 12


def test_lora_changes_only_the_adapters_and_exports_merged(
    train_models, sft_rows, tmp_path, initial_trainable
) -> None:
    from peft import PeftModel

    lora = {"enabled": True, "r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    result = train_sft(train_models["policy"], sft_rows, tmp_path / "lora", cfg(epochs=3, lr=2e-2, lora=lora))
    before = initial_trainable["state"]
    assert before and all("lora_" in n for n in before)  # only adapters are trainable
    adapter = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert len(adapter) == len(before) == 2 * 2 * 2  # (A, B) x (q, v) x 2 layers
    for name, t in before.items():
        saved = next(
            v for k, v in adapter.items() if k.replace(".weight", "") in name.replace(".default", "")
        )
        assert not torch.equal(saved, t), name  # every adapter changed (B started at zero)
    base = _weights(train_models["policy"])
    merged = _weights(result.model_dir)
    changed = sorted(n for n in base if not torch.equal(base[n], merged[n]))
    assert changed and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in changed)
    assert len(changed) == 4
    # the merged export computes what base + adapters compute
    peft = PeftModel.from_pretrained(load_model(train_models["policy"]).model, str(result.adapter_dir)).eval()
    ids = torch.tensor([[1, 5, 9, 13, 40, 7]])
    with torch.no_grad():
        expected = peft(input_ids=ids).logits
        got = load_model(result.model_dir).model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_mcts_sft_runs_the_sft_code_under_its_own_name(train_models, sft_rows, tmp_path) -> None:
    result = train_sft(train_models["policy"], sft_rows, tmp_path / "m", cfg(method="mcts-sft", max_steps=2))
    assert result.method == "mcts-sft" and result.steps == 2
    assert json.loads((result.model_dir / "w2s_train.json").read_text())["method"] == "mcts-sft"
    assert json.loads((tmp_path / "m" / "curves.json").read_text())["method"] == "mcts-sft"
    with pytest.raises(W2SError, match="train_sft trains method sft or mcts-sft"):
        train_sft(train_models["policy"], sft_rows, tmp_path / "x", cfg(method="dpo"))


def test_validation_picks_the_best_checkpoint_and_stops_early(train_models, sft_rows, tmp_path) -> None:
    scores = iter([0.2, 0.5, 0.3, 0.1, 0.9])
    calls = []

    def valid_fn(model, tokenizer) -> float:
        assert not model.training and tokenizer is not None
        calls.append(1)
        return next(scores)

    config = cfg(epochs=5, keep_checkpoints=1, early_stopping_patience=2)
    result = train_sft(train_models["policy"], sft_rows, tmp_path / "v", config, valid_fn=valid_fn)
    assert len(calls) == 4  # epochs 3 and 4 were not better: stopped before epoch 5
    assert result.stopped_early and result.steps == 12
    assert [(v["epoch"], v["step"], v["value"]) for v in result.valid_curve] == [
        (1, 3, 0.2), (2, 6, 0.5), (3, 9, 0.3), (4, 12, 0.1)
    ]  # fmt: skip
    assert (result.valid_metric, result.best_step, result.best_value) == ("valid_success", 6, 0.5)
    assert result.best_checkpoint.name == "step-00000006" and result.best_checkpoint.is_dir()
    assert result.exported_step == 6
    best = load_file(str(result.best_checkpoint / "trainable.safetensors"))
    exported = load_model(result.model_dir).model
    for name, p in exported.named_parameters():
        torch.testing.assert_close(p, best[name], atol=0, rtol=0)
    kept = sorted(p.name for p in (tmp_path / "v" / "checkpoints").iterdir())
    assert kept == ["step-00000006", "step-00000012"]  # the newest and the best


def test_validation_loss_on_held_out_tasks_by_default(train_models, sft_rows, tmp_path) -> None:
    result = train_sft(train_models["policy"], sft_rows, tmp_path / "vl", cfg(epochs=3, valid_fraction=0.34))
    assert result.rows == 8  # 2 of 6 tasks held out
    values = [v["value"] for v in result.valid_curve]
    assert result.valid_metric == "valid_loss" and len(values) == 3
    assert values[-1] < values[0] and result.best_value == min(values)


def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(
    train_models, sft_rows, tmp_path, monkeypatch
) -> None:
    out = tmp_path / "nan"
    original = logps_module.token_logps
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out_ = original(*args, **kwargs)
        return out_ * float("nan") if calls["n"] == 6 else out_

    monkeypatch.setattr(logps_module, "token_logps", poisoned)
    with pytest.raises(NonFiniteLossError) as err:
        train_sft(train_models["policy"], sft_rows, out, cfg(epochs=3, checkpoint_every=2))
    msg = str(err.value)
    assert "\n" not in msg and "non-finite loss (nan) at step 6 (epoch 2)" in msg
    assert msg.endswith(f"the last good checkpoint is {out / 'checkpoints' / 'step-00000004'}")
    assert latest_checkpoint(out).name == "step-00000004"  # every 2 steps and at the epoch's end (3)
    saved = load_file(str(out / "checkpoints" / "step-00000004" / "trainable.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert not (out / "model").exists() and not (out / "result.json").exists()
    monkeypatch.setattr(logps_module, "token_logps", original)
    result = train_sft(train_models["policy"], sft_rows, out, cfg(epochs=3, checkpoint_every=2))
    assert result.steps == 9 and all(math.isfinite(v) for _, v in result.loss_curve)
    assert [s for s, _ in result.loss_curve] == list(range(1, 10))


def test_a_finished_run_is_returned_and_another_run_is_refused(train_models, sft_rows, tmp_path) -> None:
    out = tmp_path / "done"
    first = train_sft(train_models["policy"], sft_rows, out, cfg(max_steps=2))
    stamp = (first.model_dir / "model.safetensors").stat().st_mtime_ns
    again = train_sft(train_models["policy"], sft_rows, out, cfg(max_steps=2, checkpoint_every=7))
    assert again == first and (first.model_dir / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(W2SError, match="holds checkpoints of another run"):
        train_sft(train_models["policy"], sft_rows, out, cfg(max_steps=2, lr=1e-3))
    fresh = train_sft(train_models["policy"], sft_rows, out, cfg(max_steps=2, lr=1e-3), resume=False)
    assert fresh.fingerprint != first.fingerprint and fresh.steps == 2


def test_gradient_checkpointing_and_bf16_autocast(train_models, sft_rows, tmp_path) -> None:
    plain = train_sft(train_models["policy"], sft_rows, tmp_path / "p", cfg(max_steps=3))
    ckpt = train_sft(
        train_models["policy"], sft_rows, tmp_path / "c", cfg(max_steps=3, gradient_checkpointing=True)
    )
    for (_, a), (_, b) in zip(plain.loss_curve, ckpt.loss_curve, strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    assert json.loads((ckpt.model_dir / "config.json").read_text()).get("use_cache", True) is True
    lora = {"enabled": True, "r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}
    bf16 = train_sft(
        train_models["policy"], sft_rows, tmp_path / "b", cfg(max_steps=3, dtype="bfloat16", lora=lora)
    )
    assert all(math.isfinite(v) for _, v in bf16.loss_curve)
    assert bf16.loss_curve[0][1] == pytest.approx(
        plain.loss_curve[0][1], rel=0.05
    )  # same loss, bf16 precision
    assert load_model(bf16.model_dir).dtype == torch.float32  # exported in the dtype of the source model


def test_a_lora_run_resumes_to_the_same_adapters(train_models, sft_rows, tmp_path) -> None:
    import shutil

    lora = {"enabled": True, "r": 4, "alpha": 8.0, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}
    config = cfg(epochs=2, lr=2e-2, lora=lora, checkpoint_every=1, keep_checkpoints=10)
    out = tmp_path / "lora-resume"
    whole = train_sft(train_models["policy"], sft_rows, out, config)
    adapters = load_file(str(whole.adapter_dir / "adapter_model.safetensors"))
    merged = load_file(str(whole.model_dir / "model.safetensors"))
    for name in ("result.json", "model", "adapter", "checkpoints/step-00000006", "checkpoints/step-00000005"):
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    resumed = train_sft(train_models["policy"], sft_rows, out, config)  # from step 4, dropout RNG restored
    assert resumed.loss_curve == whole.loss_curve and resumed.metrics_curve == whole.metrics_curve
    again = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert all(torch.equal(adapters[k], again[k]) for k in adapters)
    assert all(
        torch.equal(merged[k], t) for k, t in load_file(str(resumed.model_dir / "model.safetensors")).items()
    )
