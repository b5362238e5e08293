"""Experiment tracking (``report_to``): TensorBoard event files and W&B offline runs read back, the training
loop's curves under TRL's names, a resumed run's curves, a missing package refused in one line, no stage key
or fingerprint changed, and every stage of the shared feature run tracked under the run's name."""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from w2s_agents.config import from_dict
from w2s_agents.errors import ConfigError, W2SError
from w2s_agents.pipeline.cache import stage_keys
from w2s_agents.pipeline.experiment import load_experiment
from w2s_agents.pipeline.runner import build_stages, run_pipeline, stage_names
from w2s_agents.trainers import TrainConfig, run_fingerprint, train_dpo
from w2s_agents.trainers.tracking import TrackingSpec, check_backends, scalars, wandb_run_id

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")


@pytest.fixture
def wandb_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """W&B offline and silent, its folders and the home folder in ``tmp_path`` (returned: the home folder)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-env" / var.lower()))
    return home


def tb_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files in ``log_dir``: tag -> [(step, value)] as TensorBoard shows them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def wandb_records(path: Path) -> Iterator[Any]:
    """The records of a W&B run file (``run-<id>.wandb``): a ``:W&B`` header, then records in 32 KiB blocks,
    each chunk with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last), as LevelDB's
    log."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_run(run_dir: Path, timeout: float = 30.0) -> dict[str, Any]:
    """An offline W&B run folder read back: its run record, history rows and summary. W&B's service writes the
    file after ``finish`` returns: it is read again until it ends with its exit record."""
    (file,) = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + timeout
    while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(file)):
        assert time.monotonic() < deadline, f"{file} has no exit record after {timeout} s"
        time.sleep(0.1)
    out: dict[str, Any] = {"history": [], "summary": {}}
    for record in wandb_records(file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out |= {"name": record.run.display_name, "group": record.run.run_group, "id": record.run.run_id,
                    "job_type": record.run.job_type, "project": record.run.project}  # fmt: skip
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
        elif kind == "history":
            out["history"].append(
                {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
            )
        elif kind == "summary":
            out["summary"] |= {
                "/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.summary.update
            }
    return out


def offline_runs(root: Path) -> dict[str, dict[str, Any]]:
    """Every offline W&B run under ``root/wandb/``, by run name (the newest folder of a name)."""
    runs = {}
    for d in sorted((root / "wandb").glob("offline-run-*")):
        run = wandb_run(d)
        runs[run["name"]] = run | {"dir": d}
    return runs


# ------------------------------------------------------------------ the trackers


def test_scalars_flatten_numbers_only() -> None:
    values = {"episodes": 4, "won": True, "best_paths": {"trees": 2, "kind": "tree"}, "ids": [1], "x": None}
    assert scalars(values, "search/") == {
        "search/episodes": 4.0,
        "search/won": 1.0,
        "search/best_paths/trees": 2.0,
    }
    assert (
        wandb_run_id("mini/seed-0/w2s-mcts", "0123456789abcdefff") == "mini-seed-0-w2s-mcts-0123456789abcdef"
    )


def test_tensorboard_tracker_writes_scalars_config_and_summary(tmp_path: Path) -> None:
    spec = TrackingSpec(("tensorboard",), tmp_path / "tb", tmp_path, name="t")
    trackers = spec.open(identity="a", config={"lr": 0.1})
    for step in (1, 2, 3):
        trackers.log({"train/loss": 1.0 / step, "train/nan": float("nan")}, step)
    trackers.log_summary({"run/steps": 3})
    trackers.finish()
    got = tb_scalars(tmp_path / "tb")
    assert got == {"train/loss": [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))], "run/steps": [(3, 3.0)]}
    # a session starting at step 2 (a resumed run) hides the first session's events from step 2 on
    again = spec.open(identity="a", start_step=2)
    again.log({"train/loss": 7.0}, 2)
    again.finish()
    assert tb_scalars(tmp_path / "tb")["train/loss"] == [(1, 1.0), (2, 7.0)]


def test_wandb_tracker_offline_run_holds_history_and_summary(tmp_path: Path, wandb_env: Path) -> None:
    spec = TrackingSpec(("wandb",), tmp_path / "tb", tmp_path / "out", name="mini/seed-0/explore",
                        group="mini", job_type="explore", config={"seed": 0})  # fmt: skip
    trackers = spec.open(identity="k1", config={"stage": "explore"})
    trackers.log({"rollout/success_rate": 0.25, "rollout/episodes": 8}, 0)
    trackers.log({"rollout/success_rate": 0.5}, 1)
    trackers.log_summary({"run/best": 0.5})
    trackers.finish()
    (run,) = offline_runs(tmp_path / "out").values()
    assert run["dir"].name.endswith(wandb_run_id("mini/seed-0/explore", "k1"))
    assert (run["name"], run["group"], run["job_type"], run["project"]) == (
        "mini/seed-0/explore", "mini", "explore", "w2s-agents",
    )  # fmt: skip
    assert [(h["_step"], h["rollout/success_rate"]) for h in run["history"]] == [(0, 0.25), (1, 0.5)]
    assert run["summary"]["run/best"] == 0.5 and run["summary"]["rollout/episodes"] == 8
    assert not (tmp_path / "tb").exists()
    assert not any(wandb_env.iterdir())


def test_wandb_defaults_offline_and_keeps_its_folders_in_the_run(
    tmp_path: Path, wandb_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without WANDB_MODE and an API key the run is offline; W&B's config, cache and data folders default to
    the run folder and the environment is left as it was."""
    for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.delenv(var)
    spec = TrackingSpec(("wandb",), tmp_path / "tb", tmp_path / "out", name="solo")
    trackers = spec.open(identity="x")
    (tracker,) = trackers.trackers
    assert tracker.mode == "offline"  # type: ignore[attr-defined]
    trackers.log({"a": 1.0}, 0)
    trackers.finish()
    assert list(offline_runs(tmp_path / "out")) == ["solo"]
    assert not any(wandb_env.iterdir())  # nothing in the home folder
    assert not any(k in os.environ for k in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"))


def test_a_missing_tracker_package_is_one_line_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(W2SError) as err:
        check_backends(["tensorboard", "wandb"], "train.report_to")
    message = str(err.value)
    assert "\n" not in message
    assert (
        message.startswith("train.report_to lists wandb") and 'pip install "w2s-agents[tracking]"' in message
    )
    # w2s run refuses before anything is written
    overrides = [f"run.out_dir={tmp_path}", "run.report_to=[tensorboard]", "train.mcts_sft.report_to=[wandb]"]
    cfg = load_experiment(None, overrides)
    with pytest.raises(W2SError, match=r"^train\.mcts_sft\.report_to lists wandb"):
        run_pipeline(cfg)
    assert not any(tmp_path.iterdir())


def test_report_to_keys_are_checked() -> None:
    with pytest.raises(ConfigError, match="report_to"):
        load_experiment(None, ["run.report_to=[mlflow]"])
    with pytest.raises(ConfigError, match="'report_to' must not repeat a tracker"):
        load_experiment(None, ["train.weak_sft.report_to=[wandb,wandb]"])
    assert load_experiment(None).run.report_to == [] and TrainConfig().report_to is None


def test_report_to_changes_no_stage_key_and_no_fingerprint(tmp_path: Path) -> None:
    """Where numbers are reported is not what is computed: no stage is redone, no training run restarts."""
    for base in ([], ["train.baselines=[eto,best-of-n]", "run.rounds=2", "tasks.valid=3"]):
        keys = stage_keys(build_stages(load_experiment(None, base), 0))
        tracked = [*base, "run.report_to=[tensorboard,wandb]", "train.weak_sft.report_to=[wandb]",
                   "train.treedpo.report_to=[]", "train.eto.report_to=[tensorboard]"]  # fmt: skip
        assert stage_keys(build_stages(load_experiment(None, tracked), 0)) == keys
    model = tmp_path / "m"
    model.mkdir()
    assert run_fingerprint(TrainConfig(report_to=["wandb"]), model, "d") == run_fingerprint(
        TrainConfig(), model, "d"
    )


# ------------------------------------------------------------------ the training loop


def test_dpo_run_reports_trl_metrics_to_both_trackers(
    train_models: dict[str, Path], pair_rows: list[dict], tmp_path: Path, wandb_env: Path
) -> None:
    """A standalone DPO run with ``report_to: [tensorboard, wandb]``: every step's loss, learning rate,
    gradient norm and DPO metrics, the epoch's validation loss and the summary, equal to the run's curves."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = from_dict(TrainConfig, dict(method="dpo", lr=1e-2, batch_size=4, max_length=512, epochs=2,
                                             valid_fraction=0.3, checkpoint_every=0, warmup_ratio=0.0,
                                             report_to=["tensorboard", "wandb"]))  # fmt: skip
        out = tmp_path / "dpo"
        result = train_dpo(
            train_models["policy"], pair_rows, out, config, reference_path=train_models["weak"]
        )
    finally:
        torch.set_num_threads(threads)
    steps = [e["step"] for e in result.metrics_curve]
    assert steps == list(range(1, result.steps + 1)) and result.valid_curve
    dpo = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected"]  # fmt: skip
    tb = tb_scalars(out / "tb")
    for name in ["loss", "grad_norm", "learning_rate", *dpo]:
        assert tb[f"train/{name}"] == [
            (e["step"], pytest.approx(e[name], rel=1e-5)) for e in result.metrics_curve
        ]
    assert [s for s, _ in tb["train/tokens_per_second"]] == steps and all(
        v > 0 for _, v in tb["train/tokens_per_second"]
    )
    assert tb["train/epoch"][-1] == (result.steps, pytest.approx(2.0))
    assert tb["eval/valid_loss"] == [
        (v["step"], pytest.approx(v["value"], rel=1e-5)) for v in result.valid_curve
    ]
    assert tb["run/steps"] == [(result.steps, result.steps)]
    assert tb["run/tokens_per_second"][0][1] == pytest.approx(result.tokens_per_second, rel=1e-5)
    assert tb["final/rewards/margins"][0][1] == pytest.approx(
        result.final_metrics["rewards/margins"], rel=1e-5
    )
    (run,) = offline_runs(out).values()
    assert (run["name"], run["job_type"]) == ("dpo", "dpo")
    history = [h for h in run["history"] if "train/loss" in h]
    assert [h["_step"] for h in history] == steps
    assert [h["train/rewards/margins"] for h in history] == pytest.approx(
        [e["rewards/margins"] for e in result.metrics_curve]
    )
    assert run["summary"]["run/best_valid_loss"] == pytest.approx(result.best_value)
    assert run["summary"]["run/tokens"] == result.train_tokens


class _Stop(Exception):
    """Stops a training run from inside, as a kill would."""


def test_a_resumed_run_continues_its_curves_and_its_wandb_run(
    train_models: dict[str, Path], sft_rows: list[dict], tmp_path: Path, wandb_env: Path, monkeypatch
) -> None:
    """Stopped after step 5 (its last checkpoint at step 4) and resumed: TensorBoard shows each step once, the
    second session continues the first's W&B run (same id, from ``tracking.json``); a finished run reused as
    it is reports nothing; a run started over gets a W&B run of its own."""
    import torch

    from w2s_agents.trainers import train_sft
    from w2s_agents.trainers.reporting import TRACKING_FILE, RunReporter

    settings = dict(lr=5e-3, batch_size=4, max_length=256, epochs=3, valid_fraction=0.0, checkpoint_every=2,
                    warmup_ratio=0.0, report_to=["tensorboard", "wandb"])  # fmt: skip
    config = from_dict(TrainConfig, settings)
    out = tmp_path / "sft"
    step = RunReporter.step

    def stop_after_5(self, state, record):
        step(self, state, record)
        if state["step"] == 5:
            raise _Stop

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with monkeypatch.context() as mp:
            mp.setattr(RunReporter, "step", stop_after_5)
            with pytest.raises(_Stop):
                train_sft(train_models["policy"], sft_rows, out, config)
        identity = json.loads((out / TRACKING_FILE).read_text())["identity"]
        result = train_sft(train_models["policy"], sft_rows, out, config)
        assert train_sft(train_models["policy"], sft_rows, out, config) == result  # finished: reused
    finally:
        torch.set_num_threads(threads)
    assert result.steps == 9
    curve = [(e["step"], pytest.approx(e["loss"], rel=1e-5)) for e in result.metrics_curve]
    assert tb_scalars(out / "tb")["train/loss"] == curve
    first, second = (wandb_run(d) for d in sorted((out / "wandb").glob("offline-run-*")))
    assert first["id"] == second["id"] == wandb_run_id(out.name, identity)
    assert (first["exit_code"], second["exit_code"]) == (1, 0)  # the stopped session is marked failed
    assert [h["_step"] for h in first["history"] if "train/loss" in h] == [1, 2, 3, 4, 5]
    assert [h["_step"] for h in second["history"] if "train/loss" in h] == [5, 6, 7, 8, 9]
    # started over: checkpoints removed, a new identity and W&B run
    torch.set_num_threads(1)
    try:
        train_sft(train_models["policy"], sft_rows, out, replace(config, max_steps=2), resume=False)
    finally:
        torch.set_num_threads(threads)
    assert json.loads((out / TRACKING_FILE).read_text())["identity"] != identity
    assert len(list((out / "wandb").glob("offline-run-*"))) == 3


# ------------------------------------------------------------------ w2s run


def _reported_tag(seed_dir: Path, stage: str) -> str | None:
    """A tag that ``stage`` reports (pipeline/tracking.py's table), None for the stages that report nothing
    and for training stages that were skipped."""
    if stage.startswith("explore") or stage == "strong-explore":
        return "rollout/episodes"
    if stage.startswith("search"):
        return "search/nodes"
    if stage.startswith("expand"):
        return "expand/new_nodes"
    if stage == "eval":
        return "test/weak-sft/mean_return"
    info = seed_dir / stage / "model.json"
    if info.is_file() and "skipped" not in json.loads(info.read_text()):
        return "train/loss"
    return None


@pytest.mark.slow
def test_every_stage_of_the_feature_run_is_tracked_under_the_run_name(feature_run: Any) -> None:
    """The shared feature run (``run.report_to: [tensorboard, wandb]``, stopped and resumed): each stage that
    ran has its TensorBoard event files in ``tb/seed-0/<stage>/`` and exactly one offline W&B run named
    ``<run>/seed-0/<stage>`` in the run's group, holding the same numbers as the stage's own files."""
    cfg = feature_run.cfg
    assert cfg.run.report_to == ["tensorboard", "wandb"]
    run_dir = feature_run.result.run_dir
    seed_dir = run_dir / "seed-0"
    names = stage_names(cfg)
    tracked = {name: tag for name in names if (tag := _reported_tag(seed_dir, name)) is not None}
    assert {"weak-sft", "explore", "explore-b", "search", "w2s-mcts", "search-r2", "eval"} <= set(tracked)
    runs = [wandb_run(d) for d in sorted((run_dir / "wandb").glob("offline-run-*"))]
    # one W&B run per stage that ran, in either invocation: the resumed one reported none of the cached stages
    assert sorted(r["name"] for r in runs) == sorted(f"{cfg.run.name}/seed-0/{name}" for name in tracked)
    by_stage = {r["job_type"]: r for r in runs}
    assert {r["group"] for r in runs} == {cfg.run.name}
    for name in names:
        tb_dir = run_dir / "tb" / "seed-0" / name
        if name not in tracked:
            assert not tb_dir.exists(), name
            continue
        tag = tracked[name]
        tb = tb_scalars(tb_dir)
        history = [h for h in by_stage[name]["history"] if tag in h]
        assert history, (name, tag)
        if tag == "train/loss":  # every optimizer step of the stage's training run
            result = json.loads((seed_dir / name / "train" / "result.json").read_text())
            curve = [(e["step"], e["loss"]) for e in result["metrics_curve"]]
            assert tb[tag] == [(s, pytest.approx(v, rel=1e-5)) for s, v in curve], name
            assert [(h["_step"], h[tag]) for h in history] == [(s, pytest.approx(v)) for s, v in curve], name
        else:  # the stage's numbers, once, at step 0
            assert [s for s, _ in tb[tag]] == [0] and len(history) == 1, name
    explored = json.loads((seed_dir / "explore" / "explore.json").read_text())
    explore = by_stage["explore"]["summary"]
    assert explore["rollout/episodes"] == explored["episodes"]
    assert explore["rollout/success_rate"] == pytest.approx(explored["successes"] / explored["episodes"])
    searched = json.loads((seed_dir / "search" / "_done.json").read_text())["summary"]
    assert by_stage["search"]["summary"]["search/pairs"] == searched["pairs"]
    assert by_stage["search"]["summary"]["search/nodes"] > 0
    returns = json.loads((seed_dir / "eval" / "_done.json").read_text())["summary"]
    assert by_stage["eval"]["summary"]["test/w2s-mcts/mean_return"] == pytest.approx(returns["w2s-mcts"])
    # a DPO stage (the ceiling, ETO; TreeDPO when its trees gave pairs): DPO metrics, validation, summary
    dpo = [n for n, tag in tracked.items() if tag == "train/loss" and _method(seed_dir, n) == "dpo"]
    assert dpo
    scalars_of = tb_scalars(run_dir / "tb" / "seed-0" / dpo[0])
    assert {
        "train/rewards/margins",
        "train/learning_rate",
        "eval/valid_success",
        "run/tokens_per_second",
    } <= set(scalars_of)


def _method(seed_dir: Path, stage: str) -> str:
    return json.loads((seed_dir / stage / "model.json").read_text())["method"]
