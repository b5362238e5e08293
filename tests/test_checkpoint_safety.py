"""Checkpoints are read without running code from them, verified against their manifest, and a damaged one
is skipped: the run falls back to the newest intact checkpoint and still ends with the weights of an
uninterrupted run; with none intact it stops with one line.

One uninterrupted reference run and one run interrupted after step 4 (checkpoints at steps 2, 3 and 4) are
made once; each test damages a copy of the interrupted run's newest checkpoint and resumes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from w2s_agents.cli import main
from w2s_agents.config import from_dict
from w2s_agents.errors import W2SError
from w2s_agents.messages import episode_messages
from w2s_agents.trainers import TrainConfig, train_sft
from w2s_agents.trainers import logps as logps_module
from w2s_agents.trainers.checkpoint import (
    CorruptCheckpointError,
    capture_rng,
    load_state_file,
    read_checkpoint,
    save_state_file,
    verify_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]
ROOMS = ["kitchen", "cellar", "garden", "attic"]
THINGS = ["lamp", "key", "coin"]


pytestmark = pytest.mark.usefixtures("one_torch_thread_module")


@pytest.fixture
def warnings_seen(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """caplog on the package's logger (the CLI's logging set-up stops it propagating to the root)."""
    package = logging.getLogger("w2s_agents")
    attach = not package.propagate  # else the root's handler sees the records already
    if attach:
        package.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="w2s_agents")
    yield caplog
    if attach:
        package.removeHandler(caplog.handler)


def cfg(**kw) -> TrainConfig:
    base = dict(lr=5e-3, batch_size=4, max_length=256, max_steps=6, valid_fraction=0.0, checkpoint_every=2,
                keep_checkpoints=3, warmup_ratio=0.0, log_every=100)  # fmt: skip
    base.update(kw)
    return from_dict(TrainConfig, base)


def _rows() -> list[dict]:
    rows = []
    for i in range(12):
        room, thing = ROOMS[i % 4], THINGS[i % 3]
        turns = [("look first", "look", f"You are in the {room}. You see a {thing}."),
                 ("", f"take {thing}", f"You take the {thing}."), ("done", "go north", None)]  # fmt: skip
        rows.append({"messages": episode_messages(f"Find the {thing}.", f"You are in the {room}.", turns)})
    return rows


class Interrupted(Exception):
    """Stands for a kill between checkpoints."""


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(train_models, tmp_path_factory) -> dict:
    """A policy with dropout (random numbers matter), the rows, an uninterrupted run of 6 steps and a run
    stopped by an exception in step 5 (checkpoints step 2, 3 and 4 kept)."""
    root = tmp_path_factory.mktemp("ckpt-safety")
    model = root / "model"
    shutil.copytree(train_models["policy"], model)
    config = json.loads((model / "config.json").read_text())
    config["attention_dropout"] = 0.1
    (model / "config.json").write_text(json.dumps(config))
    rows = _rows()
    reference = train_sft(model, rows, root / "reference", cfg())
    assert reference.steps == 6

    interrupted = root / "interrupted"
    original, calls = logps_module.token_logps, {"n": 0}

    def killed_in_step_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise Interrupted
        return original(*args, **kwargs)

    logps_module.token_logps = killed_in_step_5
    try:
        with pytest.raises(Interrupted):
            train_sft(model, rows, interrupted, cfg())
    finally:
        logps_module.token_logps = original
    kept = sorted(p.name for p in (interrupted / "checkpoints").iterdir())
    assert kept == ["step-00000002", "step-00000003", "step-00000004"]
    return {
        "model": model,
        "rows": rows,
        "reference": _weights(root / "reference"),
        "interrupted": interrupted,
    }


def _copy(runs: dict, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the interrupted run and its newest checkpoint."""
    out = tmp_path / "run"
    shutil.copytree(runs["interrupted"], out)
    return out, out / "checkpoints" / "step-00000004"


def _resume_and_compare(runs: dict, out: Path) -> None:
    """Resume ``out`` to the end: 6 steps, weights bit-identical to the uninterrupted run's."""
    result = train_sft(runs["model"], runs["rows"], out, cfg())
    assert result.steps == 6 and [s for s, _ in result.loss_curve] == list(range(1, 7))
    resumed = _weights(out)
    assert resumed.keys() == runs["reference"].keys()
    for name, tensor in runs["reference"].items():
        assert torch.equal(tensor, resumed[name]), name


def _reseal(ckpt: Path) -> None:
    """Rewrite the manifest to match the files as they are now (what a careless tool or an attacker does)."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"] = {
        p.name: {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in sorted(ckpt.iterdir())
        if p.name != "manifest.json"
    }
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


class Payload:
    """Unpickling this creates ``marker``: what a crafted checkpoint file would do with a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant_payload(path: Path, marker: Path) -> None:
    torch.save({"python": Payload(marker), "numpy": None, "torch": torch.zeros(1)}, path)


def _to_legacy(ckpt: Path) -> None:
    """Rewrite a checkpoint as the previous version wrote it: torch.save'd optimizer, scheduler and RNG
    states (.pt, pickles), no manifest."""
    for kind in ("optimizer", "scheduler", "rng-0"):
        torch.save(load_state_file(ckpt / f"{kind}.safetensors"), ckpt / f"{kind}.pt")
        (ckpt / f"{kind}.safetensors").unlink()
    (ckpt / "manifest.json").unlink()


# ---------------------------------------------------------------------- format


def test_state_files_round_trip_without_pickle(tmp_path: Path) -> None:
    state = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3).to(torch.bfloat16)}},
        "param_groups": [{"betas": (0.9, 0.99), "lr": 1e-3, "foreach": None, "params": [0]}],
        "odd": [float("nan"), float("inf"), True, "text", {"__w2s__": "looks like a tag"}],
        "rng": capture_rng(),
    }
    save_state_file(state, tmp_path / "s.safetensors")
    back = load_state_file(tmp_path / "s.safetensors")
    assert list(back["state"]) == [0] and back["param_groups"][0]["betas"] == (0.9, 0.99)
    assert torch.equal(back["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    assert back["state"][0]["exp_avg"].dtype == torch.bfloat16 and back["state"][0]["step"].ndim == 0
    assert math.isnan(back["odd"][0]) and back["odd"][1:] == state["odd"][1:]
    py, npy = back["rng"]["python"], back["rng"]["numpy"]
    assert py == state["rng"]["python"] and isinstance(py, tuple) and isinstance(py[1], tuple)
    assert (
        npy[0] == "MT19937" and npy[1].dtype == np.uint32 and np.array_equal(npy[1], state["rng"]["numpy"][1])
    )
    assert npy[2:] == state["rng"]["numpy"][2:] and torch.equal(back["rng"]["torch"], state["rng"]["torch"])
    with pytest.raises(TypeError, match="cannot store a Payload"):
        save_state_file({"x": Payload(tmp_path / "never")}, tmp_path / "bad.safetensors")
    save_file({}, str(tmp_path / "plain.safetensors"), metadata={"w2s_state": '{"__w2s__": "object"}'})
    with pytest.raises(CorruptCheckpointError, match=r"plain\.safetensors: malformed state \(unknown entry"):
        load_state_file(tmp_path / "plain.safetensors")


def test_every_checkpoint_file_is_in_the_manifest_and_none_is_a_pickle(runs) -> None:
    ckpt = runs["interrupted"] / "checkpoints" / "step-00000004"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["format"] == 2 and manifest["step"] == 4
    files = {p.name for p in ckpt.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == files == {
        "trainable.safetensors", "optimizer.safetensors", "scheduler.safetensors", "rng-0.safetensors",
        "state.json",
    }  # fmt: skip
    for name, entry in manifest["files"].items():
        data = (ckpt / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        assert not data.startswith((b"PK", b"\x80"))  # neither a torch.save zip nor a pickle
    assert verify_checkpoint(ckpt) is True
    contents = read_checkpoint(ckpt)
    assert contents.state["step"] == 4 and contents.rng is not None and not contents.legacy


# ---------------------------------------------------------------------- fallback


def test_a_damaged_checkpoint_falls_back_to_the_previous_and_ends_as_an_uninterrupted_run(
    runs, tmp_path, warnings_seen
) -> None:
    out, newest = _copy(runs, tmp_path)
    weights = newest / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a write cut short
    _resume_and_compare(runs, out)
    warned = [r.getMessage() for r in warnings_seen.records if r.levelno == logging.WARNING]
    assert any(
        "step-00000004 is damaged" in m and f"{weights}: " in m and "the manifest says" in m for m in warned
    ), warned
    assert any("falling back to step-00000003" in m for m in warned)
    assert "resuming sft from" in warnings_seen.text and "step-00000003 (step 3" in warnings_seen.text
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert "step-00000004.corrupt" in kept and "step-00000006" in kept  # set aside, never read again


def _truncate_weights(ckpt: Path, marker: Path) -> str:
    f = ckpt / "trainable.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    return "trainable.safetensors: 1000 bytes, the manifest says"


def _bad_state_json(ckpt: Path, marker: Path) -> str:
    (ckpt / "state.json").write_text('{"step": 4, "epoch": ')
    return "state.json: not valid JSON"


def _resealed_bad_state_json(ckpt: Path, marker: Path) -> str:
    (ckpt / "state.json").write_text('{"step": 4}')
    _reseal(ckpt)
    return "state.json: not a training state ('epoch' missing or not int)"


def _state_of_another_step(ckpt: Path, marker: Path) -> str:
    shutil.copy(ckpt.parent / "step-00000002" / "state.json", ckpt / "state.json")
    _reseal(ckpt)
    return "state.json: holds step 2, the folder's name says step-00000004"


def _flipped_byte(ckpt: Path, marker: Path) -> str:
    f = ckpt / "optimizer.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x01
    f.write_bytes(bytes(data))
    return "optimizer.safetensors: its SHA-256 differs from the manifest's"


def _no_manifest(ckpt: Path, marker: Path) -> str:
    (ckpt / "manifest.json").unlink()
    return "manifest.json: missing"


def _foreign_rng_file(ckpt: Path, marker: Path) -> str:
    shutil.copy(ckpt / "trainable.safetensors", ckpt / "rng-0.safetensors")
    _reseal(ckpt)
    return "rng-0.safetensors: not a w2s state file"


def _foreign_rng_state(ckpt: Path, marker: Path) -> str:
    save_state_file(
        {"python": (3, (1, 2), None), "numpy": "x", "torch": torch.zeros(3)}, ckpt / "rng-0.safetensors"
    )
    _reseal(ckpt)
    return "rng-0.safetensors: not this program's random states"


def _foreign_optimizer_state(ckpt: Path, marker: Path) -> str:
    state = load_state_file(ckpt / "optimizer.safetensors")
    first = next(iter(state["state"].values()))
    first["exp_avg"] = torch.zeros(7)
    save_state_file(state, ckpt / "optimizer.safetensors")
    _reseal(ckpt)
    return "optimizer.safetensors: does not fit the optimizer (exp_avg of parameter"


def _pickle_as_rng(ckpt: Path, marker: Path) -> str:
    _plant_payload(ckpt / "rng-0.safetensors", marker)
    _reseal(ckpt)
    return "rng-0.safetensors: not a readable safetensors file"


def _pickle_as_legacy_rng(ckpt: Path, marker: Path) -> str:
    _to_legacy(ckpt)
    _plant_payload(ckpt / "rng-0.pt", marker)
    return "rng-0.pt: refused: the pickle names "


def _foreign_legacy_rng(ckpt: Path, marker: Path) -> str:
    _to_legacy(ckpt)
    torch.save({"weights": torch.zeros(3)}, ckpt / "rng-0.pt")  # loads safely, but is not random states
    return "rng-0.pt: not this program's random states (not a random-state file"


def _pickle_as_legacy_optimizer(ckpt: Path, marker: Path) -> str:
    _to_legacy(ckpt)
    _plant_payload(ckpt / "optimizer.pt", marker)
    return "optimizer.pt: refused: the pickle names "


def _truncated_legacy_weights(ckpt: Path, marker: Path) -> str:
    _to_legacy(ckpt)
    f = ckpt / "trainable.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    return "trainable.safetensors: not a readable safetensors file"


DAMAGE = [_truncate_weights, _bad_state_json, _resealed_bad_state_json, _state_of_another_step, _flipped_byte,
          _no_manifest, _foreign_rng_file, _foreign_rng_state, _foreign_optimizer_state, _pickle_as_rng,
          _pickle_as_legacy_rng, _foreign_legacy_rng, _pickle_as_legacy_optimizer, _truncated_legacy_weights]  # fmt: skip


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__.strip("_"))
def test_each_kind_of_damage_is_named_and_skipped(damage, runs, tmp_path, warnings_seen) -> None:
    out, newest = _copy(runs, tmp_path)
    marker = tmp_path / "payload-ran"
    expected = damage(newest, marker)
    _resume_and_compare(runs, out)
    assert not marker.exists()  # nothing was unpickled
    damaged = [r.getMessage() for r in warnings_seen.records if "is damaged" in r.getMessage()]
    assert len(damaged) == 1 and "\n" not in damaged[0], damaged
    assert f"{newest}/" in damaged[0] and expected in damaged[0], damaged[0]
    assert (out / "checkpoints" / "step-00000004.corrupt").is_dir()


def test_the_planted_payload_is_live_when_unpickled_unsafely(tmp_path: Path) -> None:
    """The files the tests above plant do run code when loaded the way the previous version loaded them."""
    marker = tmp_path / "payload-ran"
    _plant_payload(tmp_path / "rng-0.pt", marker)
    torch.load(tmp_path / "rng-0.pt", weights_only=False)
    assert marker.exists()


def test_a_checkpoint_written_before_the_manifest_resumes_exactly(runs, tmp_path, warnings_seen) -> None:
    out, newest = _copy(runs, tmp_path)
    _to_legacy(newest)
    _resume_and_compare(runs, out)
    assert "written before checkpoints had a manifest" in warnings_seen.text
    assert "step-00000004 (step 4" in warnings_seen.text and "is damaged" not in warnings_seen.text


def test_no_intact_checkpoint_is_one_line_and_runs_nothing(runs, tmp_path) -> None:
    out, _ = _copy(runs, tmp_path)
    marker = tmp_path / "payload-ran"
    for ckpt in sorted((out / "checkpoints").iterdir()):
        _pickle_as_legacy_rng(ckpt, marker)
    with pytest.raises(W2SError) as err:
        train_sft(runs["model"], runs["rows"], out, cfg())
    msg = str(err.value)
    newest = out / "checkpoints" / "step-00000004"
    assert "\n" not in msg and msg.startswith(
        f"no intact checkpoint in {out / 'checkpoints'} ({newest}/rng-0.pt"
    )
    assert msg.count("rng-0.pt: refused") == 3 and msg.endswith("or rerun with resume: false to start over")
    assert not marker.exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == "step-00000004"  # left as found


def test_a_damaged_best_checkpoint_is_not_exported(runs, tmp_path) -> None:
    out = tmp_path / "run"
    calls: list[int] = []

    def valid(model, tokenizer) -> float:  # best after epoch 1 (step 3); its weights damaged before export
        calls.append(1)
        if len(calls) == 2:
            f = out / "checkpoints" / "step-00000003" / "trainable.safetensors"
            f.write_bytes(f.read_bytes()[:1000])
        return 1.0 if len(calls) == 1 else 0.0

    with pytest.raises(W2SError) as err:
        train_sft(runs["model"], runs["rows"], out, cfg(export="best"), valid_fn=valid)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(
        f"cannot export the best checkpoint {out / 'checkpoints' / 'step-00000003'}:"
    )
    assert "trainable.safetensors: 1000 bytes" in msg and msg.endswith(
        "rerun with train.export=last to export the last weights instead"
    )
    assert not (out / "model").exists() and not (out / "result.json").exists()
    last = train_sft(runs["model"], runs["rows"], out, cfg(export="last"), valid_fn=valid)
    assert last.exported_step == 6 and (out / "model" / "model.safetensors").is_file()


def test_cli_refuses_a_run_folder_with_planted_pickles_in_one_line(runs, tmp_path, capsys) -> None:
    """`w2s train sft` on a copied run folder whose checkpoints carry a crafted rng file: exit 2, one line,
    and the payload did not run."""
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in runs["rows"]))
    out = tmp_path / "run"
    args = ["train", "sft", str(REPO / "configs" / "train-sft-tiny.yaml"), f"model={runs['model']}",
            f"data=[{data}]", f"out_dir={out}", "train.max_steps=2", "train.checkpoint_every=1",
            "train.max_length=512"]  # fmt: skip
    assert main(args) == 0
    capsys.readouterr()
    shutil.rmtree(out / "model")
    (out / "result.json").unlink()  # as if killed before the end
    marker = tmp_path / "payload-ran"
    for ckpt in (out / "checkpoints").iterdir():
        _pickle_as_legacy_rng(ckpt, marker)
    assert main(args) == 2
    err = capsys.readouterr().err  # the log lines, then the error
    last = err.rstrip("\n").splitlines()[-1]
    assert last.startswith(f"w2s: error: no intact checkpoint in {out / 'checkpoints'} "), err
    assert "rng-0.pt: refused: the pickle names" in last and "Traceback" not in err
    assert not marker.exists()
