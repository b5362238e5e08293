"""Cached, resumable stages: skip when finished, resume when interrupted, redo on change or --from."""

from __future__ import annotations

import json

import pytest

from w2s_agents.errors import ConfigError
from w2s_agents.pipeline.cache import (
    Stage,
    StageContext,
    collect_manifest,
    run_stages,
    stage_keys,
    write_manifest,
)


class Recorder:
    """Stage functions that log their calls and write one output file each."""

    def __init__(self):
        self.calls: list[str] = []
        self.fail_in: str | None = None

    def stage(self, name: str):
        def run(ctx: StageContext):
            self.calls.append(name)
            inputs = sorted(p.name for p in ctx.outputs.values())
            (ctx.directory / "partial.txt").open("a").write("x")
            if self.fail_in == name:
                raise KeyboardInterrupt  # the run is killed inside this stage
            (ctx.directory / "out.json").write_text(json.dumps({"inputs": inputs}))
            return {"name": name}

        return run


def pipeline(rec: Recorder, cfg_b: int = 1) -> list[Stage]:
    return [
        Stage("a", rec.stage("a"), config={"x": 1}),
        Stage("b", rec.stage("b"), config={"y": cfg_b}, deps=("a",)),
        Stage("c", rec.stage("c"), config={"z": 3}, deps=("b",)),
        Stage("d", rec.stage("d"), config=None, deps=("a",)),
    ]


def test_finished_stages_are_skipped(tmp_path):
    rec = Recorder()
    first = run_stages(pipeline(rec), tmp_path)
    assert rec.calls == ["a", "b", "c", "d"]
    assert [r.status for r in first] == ["done"] * 4
    assert json.loads((tmp_path / "c" / "out.json").read_text())["inputs"] == ["a", "b"]
    second = run_stages(pipeline(rec), tmp_path)
    assert rec.calls == ["a", "b", "c", "d"]
    assert [r.status for r in second] == ["cached"] * 4
    assert second[1].summary == {"name": "b"}


def test_a_changed_config_reruns_the_stage_and_its_dependants_only(tmp_path):
    rec = Recorder()
    run_stages(pipeline(rec), tmp_path)
    rec.calls.clear()
    records = run_stages(pipeline(rec, cfg_b=2), tmp_path)
    assert rec.calls == ["b", "c"]  # d depends on a only
    assert [r.status for r in records] == ["cached", "done", "done", "cached"]
    stale = sorted(p.name for p in tmp_path.iterdir() if ".stale-" in p.name)
    assert len(stale) == 2 and stale[0].startswith("b.stale-") and stale[1].startswith("c.stale-")


def test_an_interrupted_stage_resumes_in_its_folder(tmp_path):
    rec = Recorder()
    rec.fail_in = "c"
    with pytest.raises(KeyboardInterrupt):
        run_stages(pipeline(rec), tmp_path)
    assert not (tmp_path / "c" / "_done.json").exists()
    rec.fail_in = None
    rec.calls.clear()
    run_stages(pipeline(rec), tmp_path)
    assert rec.calls == ["c", "d"]
    # the partial work of the killed attempt was kept for the stage's own resume logic
    assert (tmp_path / "c" / "partial.txt").read_text() == "xx"


def test_from_stage_redoes_it_and_everything_after(tmp_path):
    rec = Recorder()
    run_stages(pipeline(rec), tmp_path)
    rec.calls.clear()
    run_stages(pipeline(rec), tmp_path, from_stage="b")
    assert rec.calls == ["b", "c", "d"]
    assert (tmp_path / "b" / "partial.txt").read_text() == "x"  # a fresh folder
    rec.calls.clear()
    records = run_stages(pipeline(rec), tmp_path, until="b")
    assert rec.calls == [] and [r.name for r in records] == ["a", "b"]


def test_bad_pipelines_and_names(tmp_path):
    rec = Recorder()
    with pytest.raises(ConfigError, match=r"--from 'e': no such stage; stages are a, b, c, d"):
        run_stages(pipeline(rec), tmp_path, from_stage="e")
    with pytest.raises(ConfigError, match="depends on \\['z'\\]"):
        stage_keys([Stage("a", rec.stage("a"), deps=("z",))])
    with pytest.raises(ConfigError, match="appears twice"):
        stage_keys([Stage("a", rec.stage("a")), Stage("a", rec.stage("a"))])


def test_manifest_records_versions_and_stages(tmp_path):
    rec = Recorder()
    records = run_stages(pipeline(rec), tmp_path)
    manifest = collect_manifest({"run": {"seed": 3}}, records, seeds={"run": 3})
    write_manifest(tmp_path / "manifest.json", manifest)
    back = json.loads((tmp_path / "manifest.json").read_text())
    assert back["schema"] == "w2s.manifest/1"
    assert back["packages"]["numpy"] and back["packages"]["w2s-agents"]
    assert [s["name"] for s in back["stages"]] == ["a", "b", "c", "d"]
    assert back["seeds"] == {"run": 3}


def test_stages_finished_in_another_run_folder_are_linked_and_reused(tmp_path):
    from w2s_agents.pipeline.cache import link_finished_stages

    rec = Recorder()
    first, second = tmp_path / "first", tmp_path / "second"
    run_stages(pipeline(rec), first)
    rec.calls.clear()
    # b's config differs: a and d are the same stages, b and c are not
    assert link_finished_stages(second, pipeline(rec, cfg_b=2), [tmp_path / "missing", first]) == ["a", "d"]
    assert (second / "a").is_symlink() and not (second / "a").readlink().is_absolute()
    records = run_stages(pipeline(rec, cfg_b=2), second)
    assert rec.calls == ["b", "c"]
    assert [r.status for r in records] == ["cached", "done", "done", "cached"]
    assert json.loads((second / "c" / "out.json").read_text())["inputs"] == ["a", "b"]
    assert link_finished_stages(second, pipeline(rec, cfg_b=2), [first]) == []  # already there
    # redoing a linked stage moves the link aside; the other run's folder is untouched
    run_stages(pipeline(rec, cfg_b=2), second, from_stage="a")
    assert not (second / "a").is_symlink() and (first / "a" / "_done.json").is_file()
    assert (first / "a" / "partial.txt").read_text() == "x"
    # a link whose target no longer holds the key is replaced, never followed into the target
    (tmp_path / "third").mkdir()
    (tmp_path / "third" / "d").symlink_to(first / "b", target_is_directory=True)
    assert link_finished_stages(tmp_path / "third", pipeline(rec), [first]) == ["a", "b", "c", "d"]
    assert (tmp_path / "third" / "d").resolve() == (first / "d").resolve()
