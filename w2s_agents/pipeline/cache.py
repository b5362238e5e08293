"""Cached, resumable stages of a run, and the run manifest.

A run folder holds one sub-folder per stage. A stage is identified by a *key*: the hash of the config it reads,
its code version and the keys of the stages it depends on. When a stage finishes, ``<stage>/_done.json`` records
its key, timing and summary; a later run with the same key skips it. A stage that was stopped part-way keeps its
folder (``<stage>/_stage.json`` holds the key it was started with), so its own resume logic (a trajectory store,
training checkpoints) carries on from where it stopped; if the key changed, the stale folder is moved aside to
``<stage>.stale-<key>`` (never deleted) and the stage starts afresh. ``from_stage`` redoes that stage and every
stage after it, moving their old outputs aside the same way.

``manifest.json`` at the top of the run records package versions, platform, git commit, seeds and the timings of
every stage; it is rewritten atomically after each stage.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from w2s_agents.atomic import atomic_write
from w2s_agents.config import config_hash, config_to_dict
from w2s_agents.errors import ConfigError, W2SError

__all__ = [
    "MANIFEST_PACKAGES",
    "Stage",
    "StageContext",
    "StageGroup",
    "StageRecord",
    "collect_manifest",
    "finished_key",
    "link_finished_stages",
    "run_stage_groups",
    "run_stages",
    "stage_keys",
    "write_manifest",
]

logger = logging.getLogger(__name__)

DONE_FILE = "_done.json"
STARTED_FILE = "_stage.json"
MANIFEST_PACKAGES = (
    "w2s-agents",
    "torch",
    "transformers",
    "tokenizers",
    "accelerate",
    "peft",
    "trl",
    "datasets",
    "gymnasium",
    "networkx",
    "numpy",
    "ray",
    "textworld",
    "scienceworld",
)


@dataclass(frozen=True)
class StageContext:
    """What a stage's function receives."""

    name: str
    directory: Path
    """The stage's own folder (created; may hold partial outputs of an interrupted attempt)."""
    run_dir: Path
    key: str
    outputs: Mapping[str, Path]
    """The folders of every stage that ran before (by name), for reading their outputs."""

    def output(self, stage: str) -> Path:
        """The folder of an earlier stage; raises W2SError when it did not run in this pipeline."""
        try:
            return self.outputs[stage]
        except KeyError:
            raise W2SError(
                f"stage {self.name!r} needs the outputs of stage {stage!r}, which did not run"
            ) from None


@dataclass(frozen=True)
class Stage:
    """One step of a pipeline.

    Attributes:
        name: folder name and ``--from`` name (letters, digits, '-', '_').
        run: the work; returns a JSON-serialisable summary kept in ``_done.json``.
        config: the part of the experiment config this stage reads (any dataclass/dict/list of them); its
            hash is part of the stage key, so changing it reruns the stage and everything that depends on it.
        deps: names of the stages whose outputs it reads.
        version: bump when the stage's code changes what it writes, to invalidate old outputs.
    """

    name: str
    run: Callable[[StageContext], Mapping[str, Any] | None]
    config: Any = None
    deps: tuple[str, ...] = ()
    version: int = 1


@dataclass
class StageRecord:
    """Outcome of one stage in one invocation."""

    name: str
    key: str
    status: str
    """``"done"`` (ran now), ``"cached"`` (skipped, outputs reused)."""
    seconds: float
    summary: dict[str, Any] = field(default_factory=dict)


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "__dataclass_fields__"):
        return config_to_dict(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def stage_keys(stages: Sequence[Stage]) -> dict[str, str]:
    """The key of every stage: hash of (name, version, config part, keys of its dependencies).

    Raises:
        ConfigError: duplicate names, or a dependency that is not an earlier stage.
    """
    keys: dict[str, str] = {}
    for st in stages:
        if st.name in keys:
            raise ConfigError(f"pipeline: stage {st.name!r} appears twice")
        missing = [d for d in st.deps if d not in keys]
        if missing:
            raise ConfigError(
                f"pipeline: stage {st.name!r} depends on {missing}, which do not come before it"
            )
        keys[st.name] = config_hash(
            {
                "stage": st.name,
                "version": st.version,
                "config": _plain(st.config),
                "deps": [keys[d] for d in st.deps],
            }
        )
    return keys


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        logger.warning("%s is unreadable (%s); the stage will be redone", path, exc)
        return None


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    with atomic_write(path) as fh:
        json.dump(data, fh, indent=2, sort_keys=False, default=str)
        fh.write("\n")


def _move_aside(directory: Path, old_key: str) -> None:
    target = directory.with_name(f"{directory.name}.stale-{old_key}")
    n = 1
    while target.exists():
        n += 1
        target = directory.with_name(f"{directory.name}.stale-{old_key}-{n}")
    directory.rename(target)
    logger.info("moved the outputs of an older %s aside to %s", directory.name, target.name)


def _prepare(directory: Path, key: str, redo: bool) -> bool:
    """Make ``directory`` ready for a stage with ``key``; True when its finished outputs can be reused."""
    done = _read_json(directory / DONE_FILE)
    started = _read_json(directory / STARTED_FILE)
    if done is not None and done.get("key") == key and not redo:
        return True
    if directory.exists():
        old = (done or started or {}).get("key")
        if redo or old != key:
            _move_aside(directory, str(old or "unknown"))
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / STARTED_FILE).exists():
        _write_json(directory / STARTED_FILE, {"key": key, "started": time.time()})
    return False


def _finish(ctx: StageContext, seconds: float, summary: Mapping[str, Any]) -> None:
    """Record the stage of ``ctx`` finished: its ``_done.json`` with key, timing and summary."""
    _write_json(
        ctx.directory / DONE_FILE,
        {
            "key": ctx.key,
            "stage": ctx.name,
            "seconds": seconds,
            "finished": time.time(),
            "summary": dict(summary),
        },
    )


@dataclass(frozen=True)
class StageGroup:
    """The stages of one run folder (one run seed) for :func:`run_stage_groups`.

    Attributes:
        stages: the pipeline.
        run_dir: the run folder (created).
        on_stage: called after each stage (ran or cached), e.g. to refresh the manifest.
        init: with ``jobs`` > 1, called in a stage's process before it runs (picklable), e.g. to seed it.
    """

    stages: Sequence[Stage]
    run_dir: Path
    on_stage: Callable[[StageRecord], None] | None = None
    init: Callable[[], None] | None = None


def run_stages(
    stages: Sequence[Stage],
    run_dir: str | os.PathLike[str],
    *,
    from_stage: str | None = None,
    until: str | None = None,
    on_stage: Callable[[StageRecord], None] | None = None,
    jobs: int = 1,
    threads: int = 0,
) -> list[StageRecord]:
    """Run ``stages`` in order inside ``run_dir``, skipping those whose outputs exist for the same key.

    Args:
        stages: the pipeline.
        run_dir: the run folder (created).
        from_stage: redo this stage and every later one, even when cached.
        until: stop after this stage.
        on_stage: called after each stage (ran or cached), e.g. to refresh the manifest.
        jobs: > 1: run stages whose dependencies have finished side by side, each in a process of its own
            (:mod:`w2s_agents.pipeline.jobs`); 1: one after the other in this process.
        threads: with ``jobs`` > 1, torch threads per stage (0: the cores divided by ``jobs``).

    Returns:
        One record per stage that ran or was reused, in pipeline order.

    Raises:
        ConfigError: ``from_stage``/``until`` names no stage, or the pipeline is malformed.
    """
    group = StageGroup(stages, Path(run_dir), on_stage)
    return run_stage_groups([group], from_stage=from_stage, until=until, jobs=jobs, threads=threads)[0]


def _plan(group: StageGroup, from_stage: str | None, until: str | None) -> tuple[list[Stage], dict[str, str]]:
    """The stages of ``group`` this invocation covers (up to ``until``) and their keys; checks the names."""
    stages = list(group.stages)
    names = [s.name for s in stages]
    for opt, value in (("--from", from_stage), ("--until", until)):
        if value is not None and value not in names:
            raise ConfigError(f"{opt} {value!r}: no such stage; stages are {', '.join(names)}")
    keys = stage_keys(stages)
    if until is not None:
        stages = stages[: names.index(until) + 1]
    return stages, keys


def run_stage_groups(
    groups: Sequence[StageGroup],
    *,
    from_stage: str | None = None,
    until: str | None = None,
    jobs: int = 1,
    threads: int = 0,
    init: Callable[[], None] | None = None,
) -> list[list[StageRecord]]:
    """Run the stages of several run folders (e.g. the seeds of a run); see :func:`run_stages`.

    With ``jobs`` 1 the groups run one after the other, each stage in this process. With ``jobs`` > 1 every
    stage of every group whose dependencies have finished may run, up to ``jobs`` at once, each in a process of
    its own that first calls ``init`` (picklable; e.g. logging) and then its group's ``init``.

    Returns:
        Per group, one record per stage that ran or was reused, in pipeline order.

    Raises:
        ConfigError: ``from_stage``/``until`` names no stage, or a pipeline is malformed.
    """
    if jobs < 1:
        raise ConfigError(f"jobs: must be >= 1, got {jobs}")
    plans = [_plan(g, from_stage, until) for g in groups]  # every name is checked before anything runs
    if jobs == 1:
        return [
            _run_in_order(g, stages, keys, from_stage)
            for g, (stages, keys) in zip(groups, plans, strict=True)
        ]
    return _run_side_by_side(groups, plans, from_stage, jobs, threads, init)


def _cached_record(st: Stage, directory: Path, key: str, label: str = "") -> StageRecord:
    done = _read_json(directory / DONE_FILE) or {}
    logger.info("stage %s%s: reusing finished outputs (key %s)", label, st.name, key)
    return StageRecord(st.name, key, "cached", float(done.get("seconds", 0.0)), done.get("summary", {}))


def _run_in_order(
    group: StageGroup, stages: Sequence[Stage], keys: Mapping[str, str], from_stage: str | None
) -> list[StageRecord]:
    run_dir = group.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    names = [s.name for s in stages]
    redo_from = names.index(from_stage) if from_stage in names else len(group.stages)
    outputs: dict[str, Path] = {}
    records: list[StageRecord] = []
    for i, st in enumerate(stages):
        directory = run_dir / st.name
        key = keys[st.name]
        if _prepare(directory, key, redo=i >= redo_from):
            record = _cached_record(st, directory, key)
        else:
            logger.info("stage %s: running (key %s)", st.name, key)
            t0 = time.perf_counter()
            ctx = StageContext(st.name, directory, run_dir, key, dict(outputs))
            summary = dict(st.run(ctx) or {})
            seconds = time.perf_counter() - t0
            _finish(ctx, seconds, summary)
            record = StageRecord(st.name, key, "done", seconds, summary)
            logger.info("stage %s: done in %.1f s", st.name, seconds)
        outputs[st.name] = directory
        records.append(record)
        if group.on_stage is not None:
            group.on_stage(record)
    return records


def _upstream(stages: Sequence[Stage]) -> dict[str, set[str]]:
    """Per stage, every stage it depends on directly or through others."""
    by = {s.name: s for s in stages}
    memo: dict[str, set[str]] = {}

    def up(name: str) -> set[str]:
        if name not in memo:
            memo[name] = set()
            for d in by[name].deps if name in by else ():
                memo[name] |= {d, *up(d)}
        return memo[name]

    return {s.name: up(s.name) for s in stages}


def _run_side_by_side(
    groups: Sequence[StageGroup],
    plans: Sequence[tuple[list[Stage], dict[str, str]]],
    from_stage: str | None,
    jobs: int,
    threads: int,
    init: Callable[[], None] | None,
) -> list[list[StageRecord]]:
    from w2s_agents.pipeline.jobs import Job, JobResult, run_jobs, stage_call

    labels = [g.run_dir.name for g in groups]
    if len(set(labels)) < len(labels):
        labels = [f"{i}:{label}" for i, label in enumerate(labels)]
    records: list[dict[str, StageRecord]] = [{} for _ in groups]
    to_run: list[Job] = []
    where: dict[str, tuple[int, Stage, str]] = {}
    for gi, (group, (stages, keys)) in enumerate(zip(groups, plans, strict=True)):
        group.run_dir.mkdir(parents=True, exist_ok=True)
        names = [s.name for s in stages]
        redo_from = names.index(from_stage) if from_stage in names else len(group.stages)
        upstream = _upstream(stages)
        for i, st in enumerate(stages):
            directory = group.run_dir / st.name
            key = keys[st.name]
            if _prepare(directory, key, redo=i >= redo_from):
                records[gi][st.name] = rec = _cached_record(st, directory, key, f"{labels[gi]}/")
                if group.on_stage is not None:
                    group.on_stage(rec)
                continue
            # a stage reads only what it depends on: the folders of the rest may be half-written now
            outputs = {n: group.run_dir / n for n in names if n in upstream[st.name]}
            ctx = StageContext(st.name, directory, group.run_dir, key, outputs)
            job_id = f"{labels[gi]}/{st.name}"
            call = stage_call(st.run, ctx, _finish, group.init)
            to_run.append(Job(job_id, tuple(f"{labels[gi]}/{d}" for d in st.deps), call))
            where[job_id] = (gi, st, key)

    def started(job: Job, n: int) -> None:
        logger.info("stage %s: started (%d torch threads; key %s)", job.id, n, where[job.id][2])

    def done(result: JobResult) -> None:
        gi, st, key = where[result.id]
        records[gi][st.name] = rec = StageRecord(st.name, key, "done", result.seconds, result.summary)
        logger.info("stage %s: done in %.1f s", result.id, result.seconds)
        if groups[gi].on_stage is not None:
            groups[gi].on_stage(rec)

    run_jobs(to_run, max_jobs=jobs, threads=threads, init=init, on_start=started, on_done=done)
    return [
        [recs[s.name] for s in stages if s.name in recs]
        for recs, (stages, _) in zip(records, plans, strict=True)
    ]


def finished_key(folder: Path) -> str | None:
    """The key a stage folder finished with (its ``_done.json``), or None when it did not finish."""
    try:
        return json.loads((folder / DONE_FILE).read_text(encoding="utf-8")).get("key")
    except (OSError, ValueError, AttributeError):
        return None


def link_finished_stages(
    run_dir: str | os.PathLike[str], stages: Sequence[Stage], sources: Sequence[str | os.PathLike[str]]
) -> list[str]:
    """Reuse stages finished in other run folders: each stage folder of ``run_dir`` that does not exist yet
    becomes a relative symbolic link to the folder of the same stage in the first of ``sources`` that finished it
    with the same key (a link of an earlier call whose target no longer holds that key is replaced; the target
    is never touched). The run's key check then reuses the folder as its own. Safe because no stage writes into
    the folder of another, and a finished stage is never written again (``from_stage`` moves the link aside).

    Returns:
        The linked stage names.
    """
    run_dir = Path(run_dir)
    here = run_dir.resolve()
    linked: list[str] = []
    for name, key in stage_keys(stages).items():
        folder = run_dir / name
        if folder.is_symlink():
            if finished_key(folder) == key:
                continue
            folder.unlink()
        elif folder.exists():
            continue
        for source in map(Path, sources):
            target = source / name
            if source.resolve() == here:
                continue
            if target.is_dir() and finished_key(target) == key:
                run_dir.mkdir(parents=True, exist_ok=True)
                folder.symlink_to(
                    os.path.relpath(target.resolve(), run_dir.resolve()), target_is_directory=True
                )
                logger.info("stage %s: reusing %s (key %s)", name, target, key)
                linked.append(name)
                break
    return linked


def _git_commit() -> dict[str, Any] | None:
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(dirty)}


def _versions(packages: Sequence[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def collect_manifest(
    config: Any,
    records: Sequence[StageRecord],
    *,
    seeds: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest of a run: config hash, package versions, platform, git commit, seeds, stage timings."""
    return {
        "schema": "w2s.manifest/1",
        "config_hash": config_hash(config),
        "command": sys.argv,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": {"cpus": os.cpu_count(), "processor": platform.machine()},
        "packages": _versions(MANIFEST_PACKAGES),
        "git": _git_commit(),
        "seeds": dict(seeds or {}),
        "stages": [
            {"name": r.name, "key": r.key, "status": r.status, "seconds": round(r.seconds, 3)}
            for r in records
        ],
        **dict(extra or {}),
    }


def write_manifest(path: str | os.PathLike[str], manifest: Mapping[str, Any]) -> None:
    """Write the manifest atomically."""
    _write_json(Path(path), manifest)
