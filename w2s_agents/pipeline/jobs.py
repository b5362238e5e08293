"""Stages side by side: ``run.jobs`` > 1 runs every stage whose dependencies have finished at once, each in a
process of its own, up to ``jobs`` at a time.

The stage graph of a run is wide: strong SFT, the ceiling's SFT and the weak agent's exploration depend only on
the models; the test games are made while the models train; with several run seeds, the seeds' stages are
independent of each other. On a machine whose cores one stage cannot keep busy (tiny models on a CPU, where a
second torch thread speeds a stage up far less than twice) or with several GPUs, running them side by side
shortens the run (docs/benchmarks.md, bench/pipeline). What each stage computes does not change: a stage reads only the outputs of the stages it
depends on, seeds itself, and writes only its own folder.

Scheduling (:func:`run_jobs`): a stage is *ready* when every stage it depends on has finished. Of the ready stages,
the one with the longest chain of stages after it starts first (ties: pipeline order), so the chain that decides
when the run ends (exploration, search, W2S training, evaluation) is never kept waiting by a stage off it. Each
stage runs in a child process (the ``forkserver`` start method, with torch and the stage modules imported once by
the server) with ``threads`` torch threads; by default the CPU's cores divided by ``jobs``, or all of them for a
stage that starts while nothing else runs or waits. A child writes its stage's ``_done.json`` itself, so a stage
that finished is finished even if the parent dies a moment later; a child whose parent dies (however it dies,
SIGKILL included) ends within a second, so a resumed run never finds a stage's folder being written by a
leftover process. The first stage to fail stops the others (they resume like any interrupted stage) and its error
is raised in the parent as the stage raised it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection, wait
from typing import Any

from w2s_agents.errors import W2SError

__all__ = ["Job", "JobResult", "cpu_count", "run_jobs", "stage_call", "stage_process_init"]

logger = logging.getLogger(__name__)

_PRELOAD = ["torch", "transformers", "w2s_agents.pipeline.runner"]
"""Modules the fork server imports once, so that a stage's process starts in a fraction of a second."""

TERMINATE_GRACE_S = 10.0
"""How long a stopped stage's process has to exit after SIGTERM before it is killed."""


@dataclass(frozen=True)
class Job:
    """One stage to run: its id (unique in the run, e.g. ``seed-0/explore``), the ids it waits for, and the
    picklable call that runs it in a child process (it returns the stage's summary)."""

    id: str
    deps: tuple[str, ...]
    call: Callable[[], Mapping[str, Any]]


@dataclass(frozen=True)
class JobResult:
    """A finished job: its id, its summary and its wall time in seconds."""

    id: str
    summary: dict[str, Any]
    seconds: float


def cpu_count() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _watch_parent(parent: int) -> None:
    """End this process within a second once the process ``parent`` is gone."""

    def watch() -> None:
        while True:
            time.sleep(0.5)
            try:
                os.kill(parent, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:  # the pid now belongs to someone else's process
                os._exit(1)

    threading.Thread(target=watch, name="w2s-parent-watch", daemon=True).start()


def _dumps(call: Callable[[], Mapping[str, Any]]) -> bytes:
    """``call`` pickled for a child process; with cloudpickle (a dependency of gymnasium), functions that a child
    cannot import (defined in a script's ``__main__`` or registered by value) travel by value."""
    try:
        import cloudpickle
    except ImportError:  # pragma: no cover - cloudpickle comes with gymnasium
        return pickle.dumps(call)
    return cloudpickle.dumps(call)


def _child(
    payload: bytes,
    threads: int,
    parent: int,
    init: Callable[[], None] | None,
    conn: Connection,
    where: tuple[dict[str, str], str],
) -> None:
    """The body of a stage's process: run the pickled call and send ``("ok", summary, seconds)`` or the error."""
    _watch_parent(parent)
    conn.send(("started",))
    try:
        # the fork server's environment and folder are those of when it started: take the parent's of now
        env, cwd = where
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd)
        if init is not None:
            init()
        if threads:
            import torch

            torch.set_num_threads(threads)
        call = pickle.loads(payload)
        t0 = time.perf_counter()
        summary = dict(call() or {})
        conn.send(("ok", summary, time.perf_counter() - t0))
    except BaseException as exc:
        tb = traceback.format_exc()
        try:
            pickle.dumps(exc)
            conn.send(("error", exc, tb))
        except Exception:
            conn.send(("error", W2SError(f"{type(exc).__name__}: {exc}"), tb))
    finally:
        conn.close()


def _chain_lengths(jobs: Sequence[Job]) -> dict[str, int]:
    """Per job, the number of jobs on the longest chain of dependants after it (0 for a job nothing waits on)."""
    dependants: dict[str, list[str]] = {j.id: [] for j in jobs}
    for j in jobs:
        for d in j.deps:
            if d in dependants:
                dependants[d].append(j.id)
    memo: dict[str, int] = {}

    def length(i: str) -> int:
        if i not in memo:
            memo[i] = max((1 + length(k) for k in dependants[i]), default=0)
        return memo[i]

    return {j.id: length(j.id) for j in jobs}


@dataclass
class _Running:
    job: Job
    process: Any
    conn: Connection
    bootstrapped: bool = False
    """The process reported that it started (it got past importing the parent's main module)."""
    eof: bool = False


def _context() -> multiprocessing.context.BaseContext:
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        return ctx
    return multiprocessing.get_context("spawn")


def _stop(running: Mapping[str, _Running]) -> None:
    """Stop the processes of ``running`` (SIGTERM, then SIGKILL after the grace time) and wait for them."""
    for r in running.values():
        if r.process.is_alive():
            r.process.terminate()
    deadline = time.monotonic() + TERMINATE_GRACE_S
    for r in running.values():
        r.process.join(max(0.0, deadline - time.monotonic()))
        if r.process.is_alive():
            r.process.kill()
            r.process.join()
        r.conn.close()


def run_jobs(
    jobs: Sequence[Job],
    *,
    max_jobs: int,
    threads: int = 0,
    init: Callable[[], None] | None = None,
    on_start: Callable[[Job, int], None] | None = None,
    on_done: Callable[[JobResult], None] | None = None,
) -> list[JobResult]:
    """Run ``jobs`` (in dependency order, up to ``max_jobs`` at once, each in a process of its own).

    Args:
        jobs: the jobs; a dependency that is not among them counts as finished.
        max_jobs: how many run at once (>= 1).
        threads: torch threads per job; 0: the cores divided by ``max_jobs``, or all of them for a job that
            starts while no other job runs or is ready.
        init: called first in every child process (picklable), e.g. to set up logging.
        on_start: called in this process when a job starts, with its thread count.
        on_done: called in this process when a job finishes.

    Returns:
        One result per job, in the order they finished.

    Raises:
        W2SError: a dependency cycle, or a job's process ended without a result (killed, out of memory).
        Exception: the exception a job raised (re-raised here after the other jobs are stopped).
    """
    if max_jobs < 1:
        raise ValueError(f"max_jobs must be >= 1, got {max_jobs}")
    ids = {j.id for j in jobs}
    chain = _chain_lengths(jobs)
    order = {j.id: i for i, j in enumerate(jobs)}
    pending = sorted(jobs, key=lambda j: (-chain[j.id], order[j.id]))
    finished: set[str] = set()
    running: dict[str, _Running] = {}
    results: list[JobResult] = []
    ctx = _context()
    cores = cpu_count()

    def ready() -> list[Job]:
        return [j for j in pending if all(d in finished or d not in ids for d in j.deps)]

    try:
        while pending or running:
            for job in ready():
                if len(running) >= max_jobs:
                    break
                alone = not running and len(ready()) == 1
                n = threads or (cores if alone else max(1, cores // max_jobs))
                parent_conn, child_conn = ctx.Pipe(duplex=False)
                process = ctx.Process(
                    target=_child,
                    args=(
                        _dumps(job.call),
                        n,
                        os.getpid(),
                        init,
                        child_conn,
                        (dict(os.environ), os.getcwd()),
                    ),
                    name=f"w2s-stage-{job.id}",
                    daemon=False,
                )
                process.start()
                child_conn.close()
                running[job.id] = _Running(job, process, parent_conn)
                pending.remove(job)
                if on_start is not None:
                    on_start(job, n)
            if not running:
                stuck = ", ".join(j.id for j in pending)
                raise W2SError(f"stages wait on each other and none can start: {stuck}")
            by_conn = {r.conn: r for r in running.values() if not r.eof}
            by_sentinel = {r.process.sentinel: r for r in running.values()}
            for ready_obj in wait([*by_conn, *by_sentinel]):
                r = by_conn.get(ready_obj) or by_sentinel.get(ready_obj)  # type: ignore[call-overload]
                if r is None or r.job.id not in running:
                    continue
                message = None
                if not r.eof:
                    try:
                        message = r.conn.recv() if r.conn.poll() else None
                    except EOFError:
                        r.eof = True
                    except Exception as exc:  # a result that does not unpickle here
                        message = (
                            "error",
                            W2SError(f"stage {r.job.id}: its result could not be read: {exc}"),
                            "",
                        )
                if message is not None and message[0] == "started":
                    r.bootstrapped = True
                    continue
                if message is None and r.process.is_alive():
                    continue  # the pipe closed before the process exited: its sentinel follows
                r.process.join()
                r.conn.close()
                del running[r.job.id]
                if message is None:
                    hint = (
                        "killed or out of memory?"
                        if r.bootstrapped
                        else "it failed while starting: a script that runs stages side by side (run.jobs > 1) "
                        'must make that call under `if __name__ == "__main__":`, since each stage\'s process '
                        "imports the script"
                    )
                    raise W2SError(
                        f"stage {r.job.id}: its process ended without a result (exit code {r.process.exitcode}; "
                        f"{hint}); run again to resume it"
                    )
                if message[0] == "error":
                    _, exc, tb = message
                    logger.debug("stage %s failed:\n%s", r.job.id, tb)
                    raise exc
                result = JobResult(r.job.id, message[1], float(message[2]))
                finished.add(r.job.id)
                results.append(result)
                if on_done is not None:
                    on_done(result)
    finally:
        if running:
            logger.info("stopping %s (they resume on the next run)", ", ".join(running))
            _stop(running)
    return results


def stage_call(
    run: Callable[[Any], Mapping[str, Any] | None],
    ctx: Any,
    finish: Callable[[Any, float, Mapping[str, Any]], None],
    init: Callable[[], None] | None = None,
) -> Callable[[], dict[str, Any]]:
    """The picklable call of a pipeline stage for a :class:`Job`: ``init()`` (e.g. seeding), ``run(ctx)``, then
    ``finish(ctx, seconds, summary)`` (the stage's ``_done.json``) in the child, before the parent hears of it."""
    return partial(_run_stage, run, ctx, finish, init)


def _run_stage(
    run: Callable[[Any], Mapping[str, Any] | None],
    ctx: Any,
    finish: Callable[[Any, float, Mapping[str, Any]], None],
    init: Callable[[], None] | None,
) -> dict[str, Any]:
    if init is not None:
        init()
    t0 = time.perf_counter()
    summary = dict(run(ctx) or {})
    finish(ctx, time.perf_counter() - t0, summary)
    return summary


def stage_process_init(log_level: str, log_file: str | os.PathLike[str] | None) -> None:
    """The start of a stage's process: the run's logging (stderr and ``log_file``, appended), and no progress
    bars unless ``W2S_PROGRESS`` asks for them (the bars of stages side by side would overwrite each other)."""
    from w2s_agents.log import setup_logging

    os.environ.setdefault("W2S_PROGRESS", "0")
    setup_logging(log_level, log_file)
