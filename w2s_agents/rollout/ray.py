"""Rollouts on Ray: the only module of w2s-agents that imports ``ray``.

:func:`run_shards` runs shards of episodes (see :mod:`w2s_agents.rollout.collect`) on ``W`` Ray actors. Each actor
(:class:`RolloutWorker`) loads a replica of the agent's model and keeps its envs between shards; it runs one
shard at a time with the batched engine :func:`w2s_agents.rollout.run_episodes` and streams every trajectory
back the moment it ends (a Ray generator). The driver, the process that called
:func:`w2s_agents.rollout.collect`, is the single writer of the store: it writes each trajectory once, as it
arrives.

Failures: when an actor dies (killed, out of memory, a crashed interpreter), the episodes of its shard that
had not arrived go back to the front of the queue and a new actor is started in its place (at most
``max_worker_restarts`` times in a run); an exception raised by the rollout code itself is not retried but
raised, since running it again would fail again.

Ray runs locally by default: ``ray.init`` with ``num_cpus`` for the workers, no dashboard, a short private
temporary folder (removed at the end; Ray's socket paths must stay short) and ``RAY_AUTH_MODE=disabled`` unless
set. With an address (``"auto"``, ``"host:port"`` or ``"ray://host:port"``; from the options, else from the
``RAY_ADDRESS`` environment variable) it joins that cluster, after checking that the address answers; a Ray
instance already initialised in the process is used as it is and left running.

Placement: each worker asks Ray for ``worker_cpus`` CPUs and ``worker_gpus`` GPUs (a fraction below 1 shares a
GPU). With ``workers_per_node`` each worker is pinned to a node (Ray's node affinity, not soft), the nodes filled
evenly up to that many workers each; a replacement goes to the live node with the fewest workers.

Stops: ``ray.init`` replaces the process's SIGTERM handler (with one that aborts with a C++ stack dump);
:func:`ray_session` puts back the SIGTERM and SIGINT handlers the process had, so a stop runs the caller's
``finally`` blocks (the store closed, the workers killed, Ray shut down). A local instance gets a reaper process
(:mod:`w2s_agents.rollout.reaper`) that ends its processes and removes its folder the moment this process dies
without doing so itself (SIGKILL).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray

from w2s_agents.errors import W2SError

from .engine import AgentSpec, EnvFactory, EnvPool, EpisodeSpec, run_episodes
from .options import EngineOptions, RayOptions
from .reaper import ENV_VAR

if TYPE_CHECKING:
    from w2s_agents.types import Trajectory

__all__ = [  # RayOptions: from .options
    "RayOptions",
    "RolloutWorker",
    "check_reachable",
    "plan_nodes",
    "ray_session",
    "resolve_address",
    "run_shards",
    "worker_options",
]

logger = logging.getLogger(__name__)


# the longest path Ray puts under its temporary folder's parent: a socket, limited to 107 bytes (AF_UNIX)
_SOCKET_TAIL = len("/w2sray-12345678/session_2026-01-01_00-00-00_000000_1234567/sockets/plasma_store")


def _short_tmp_root() -> str:
    """The system's temporary root (``TMPDIR``) if it is short enough for Ray's socket paths, else ``/tmp``."""
    root = tempfile.gettempdir()
    return root if len(root) + _SOCKET_TAIL <= 107 else "/tmp"


_HANDLED = (signal.SIGTERM, signal.SIGINT)


def _signal_handlers() -> dict[int, Any]:
    """This process's Python handlers of SIGTERM and SIGINT (none off the main thread, where they cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    handlers = {sig: signal.getsignal(sig) for sig in _HANDLED}
    return {sig: h for sig, h in handlers.items() if h is not None}  # None: installed outside Python


def _restore_signal_handlers(handlers: dict[int, Any]) -> None:
    """Put back the handlers ``ray.init`` replaced.

    ``ray.init`` installs a SIGTERM handler of its own (``sys.exit(15)``), and the C++ core worker it starts then
    installs a crash reporter for SIGTERM that dumps a stack trace and aborts (exit status 134): a stop requested
    by SIGTERM would skip every ``finally`` of the caller. Setting the handler again from Python replaces both.
    """
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


class _Reaper:
    """The process that cleans up after a local Ray instance whose driver died (see :mod:`.reaper`)."""

    def __init__(self, temp_dir: str | None) -> None:
        self.token = uuid.uuid4().hex
        self.proc: subprocess.Popen[bytes] | None = None
        if not os.path.isdir("/proc"):  # it finds the instance's processes in /proc
            logger.debug("no /proc: a killed driver's Ray processes are not cleaned up")
            return
        script = Path(__file__).with_name("reaper.py")
        cmd = [
            sys.executable,
            "-I",
            "-S",
            str(script),
            self.token,
            str(os.getpid()),
            *([temp_dir] if temp_dir else []),
        ]
        # its own session: a Ctrl-C in the terminal (SIGINT to the driver's process group) does not reach it. The
        # pipe's write end is not inheritable, so only this process holds it.
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    @contextlib.contextmanager
    def marking(self) -> Iterator[None]:
        """The processes started in the body (Ray's) inherit ``W2S_RAY_SESSION=<token>``; this one keeps its
        environment."""
        before = os.environ.get(ENV_VAR)
        os.environ[ENV_VAR] = self.token
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(ENV_VAR, None)
            else:
                os.environ[ENV_VAR] = before

    def started(self, session_dir: str | None) -> None:
        """Tell the reaper the instance's session folder (how it recognises Ray's workers and agents)."""
        if self.proc is None or not session_dir:
            return
        try:
            self.proc.stdin.write(f"{session_dir}\n".encode())  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
        except OSError as exc:
            logger.warning(
                "the Ray reaper (pid %d) is gone (%s): a killed run may leave processes", self.proc.pid, exc
            )

    def finish(self, timeout_s: float = 10.0) -> None:
        """Let the reaper run now (it ends whatever of the instance is left and removes its folder) and wait."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        with contextlib.suppress(OSError):
            proc.stdin.close()  # type: ignore[union-attr]
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("the Ray reaper (pid %d) did not end within %.0f s", proc.pid, timeout_s)


def _session_dir(temp_dir: str) -> str | None:
    """The session folder of the local instance this process started (inside ``temp_dir``)."""
    node = getattr(ray._private.worker, "_global_node", None)  # no public API names it
    with contextlib.suppress(Exception):
        if node is not None:
            return str(node.get_session_dir_path())
    latest = Path(temp_dir) / "session_latest"
    return str(latest.resolve()) if latest.exists() else None


def resolve_address(options: RayOptions) -> tuple[str | None, str]:
    """The cluster to join and what named it: ``options.address`` (named by ``options.address_key``), else the
    ``RAY_ADDRESS`` environment variable; ``(None, "")`` when neither is set (a local instance)."""
    if options.address:
        return options.address, options.address_key
    env = os.environ.get("RAY_ADDRESS", "").strip()
    return (env, "RAY_ADDRESS") if env else (None, "")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:500] or type(exc).__name__


def check_reachable(address: str, where: str, timeout_s: float = 5.0) -> None:
    """Check that a TCP connection to the ``host:port`` of a cluster address opens within ``timeout_s`` (Ray
    itself would wait minutes for an address that does not answer). ``"auto"`` is not checked: Ray looks for a
    cluster on this machine itself.

    Raises:
        W2SError: the address is malformed or does not answer, naming ``where`` (the config key or
            ``RAY_ADDRESS``) and the address.
    """
    if address == "auto":
        return
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise W2SError(
            f"{where}: {address!r} is not a Ray cluster address ('auto', 'host:port' or 'ray://host:port')"
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise W2SError(
            f"{where}: cannot reach the Ray cluster at {address} ({exc.strerror or _one_line(exc)}); is it "
            "running and is the port open from here?"
        ) from None


@contextlib.contextmanager
def ray_session(options: RayOptions) -> Iterator[None]:
    """Ray initialised for the body: joined, started locally, or the instance already running.

    A local instance gets ``num_cpus = ceil(workers * worker_cpus)``, GPUs when workers ask for them, no
    dashboard and a private temporary folder; it is shut down and its folder removed afterwards. A reaper
    process (:mod:`w2s_agents.rollout.reaper`) does the same if this process dies without doing it (SIGKILL).
    A cluster address (``options.address``, else ``RAY_ADDRESS``) is joined instead, and only disconnected from
    afterwards. The SIGTERM and SIGINT handlers of this process are those it had before ``ray.init``.

    Raises:
        W2SError: Ray cannot start, or the cluster's address does not answer or cannot be joined.
    """
    if ray.is_initialized():
        yield
        return
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": options.log_to_driver,
        "configure_logging": False,
    }
    tmp: str | None = None
    reaper: _Reaper | None = None
    address, where = resolve_address(options)
    if address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if options.temp_dir is None:
            tmp = tempfile.mkdtemp(prefix="w2sray-", dir=_short_tmp_root())
        kwargs["_temp_dir"] = options.temp_dir or tmp
        kwargs["num_cpus"] = max(1, math.ceil(options.workers * options.worker_cpus))
        if options.worker_gpus > 0:
            kwargs["num_gpus"] = max(1, math.ceil(options.workers * options.worker_gpus))
        try:
            reaper = _Reaper(tmp)
        except OSError as exc:
            logger.warning(
                "cannot start the Ray reaper (%s): a killed run may leave Ray processes behind", exc
            )
    else:
        check_reachable(address, where)
        kwargs["address"] = address
        kwargs.pop("include_dashboard")
    logger.info("starting Ray (%s)", address or f"local, {kwargs.get('num_cpus')} CPUs")
    handlers = _signal_handlers()
    try:
        with reaper.marking() if reaper is not None else contextlib.nullcontext():
            ray.init(**kwargs)
    except BaseException as exc:  # also a stop (SIGTERM, Ctrl-C) while Ray starts: end what it started
        _restore_signal_handlers(handlers)
        if reaper is not None:
            reaper.finish()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(exc, Exception):
            raise
        if address is not None:
            raise W2SError(f"{where}: cannot join the Ray cluster at {address}: {_one_line(exc)}") from exc
        raise W2SError(f"cannot start Ray (local instance): {_one_line(exc)}") from exc
    _restore_signal_handlers(handlers)
    if reaper is not None:
        reaper.started(_session_dir(kwargs["_temp_dir"]))
    try:
        yield
    finally:
        try:
            ray.shutdown()
        finally:
            if reaper is not None:
                reaper.finish()
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)


def worker_options(options: RayOptions, node_id: str | None = None) -> dict[str, Any]:
    """The Ray actor options of a rollout worker: ``worker_cpus`` CPUs, ``worker_gpus`` GPUs (a fraction below 1
    shares a GPU), no restarts by Ray (the driver replaces dead workers) and, with ``node_id``, a hard affinity to
    that node."""
    opts: dict[str, Any] = {
        "num_cpus": options.worker_cpus,
        "num_gpus": options.worker_gpus,
        "max_restarts": 0,
        "max_concurrency": 1,
    }
    if node_id is not None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=False)
    return opts


def plan_nodes(options: RayOptions, n: int, live: Counter[str] | None = None) -> list[str | None]:
    """The nodes of up to ``n`` new workers: with ``workers_per_node``, the live nodes that can hold a worker
    (``worker_cpus`` CPUs and ``worker_gpus`` GPUs in all), filled evenly (fewest workers first, counting those in
    ``live``) up to that many each, so fewer than ``n`` when the cluster is full; without it, ``n`` times None
    (Ray places them)."""
    if not options.workers_per_node:
        return [None] * n
    counts: Counter[str] = Counter()
    nodes = []
    for node in ray.nodes():
        res = node.get("Resources") or {}
        if (
            node.get("Alive")
            and res.get("CPU", 0) >= options.worker_cpus
            and res.get("GPU", 0) >= options.worker_gpus
        ):
            nodes.append(node["NodeID"])
            counts[node["NodeID"]] = (live or Counter())[node["NodeID"]]
    planned: list[str | None] = []
    for _ in range(n):
        room = [nid for nid in nodes if counts[nid] < options.workers_per_node]
        if not room:
            break
        nid = min(room, key=lambda x: counts[x])  # the first of the least loaded
        counts[nid] += 1
        planned.append(nid)
    return planned


class RolloutWorker:
    """A Ray actor running shards of episodes with its own model replica and envs.

    Args:
        agent: how to load the agent (model folder, agent config, device, dtype).
        env: how to make envs.
        max_steps: step limit of an episode.
        engine: batching and retries of :func:`~w2s_agents.rollout.run_episodes`.
        threads: torch threads of this process.
    """

    def __init__(
        self, agent: AgentSpec, env: EnvFactory, max_steps: int, engine: EngineOptions, threads: int = 1
    ) -> None:
        import torch

        from w2s_agents.log import setup_logging

        setup_logging(os.environ.get("W2S_WORKER_LOG_LEVEL", "WARNING"))
        torch.set_num_threads(threads)
        self.agent = agent.load()
        self.env = env
        self.pool = EnvPool(env.make)  # envs live as long as the worker, across shards
        self.max_steps = max_steps
        self.engine = engine

    def pid(self) -> int:
        """The worker's process id."""
        return os.getpid()

    def run(self, shard: Sequence[EpisodeSpec]) -> Iterator[Trajectory]:
        """Run a shard, yielding each trajectory as it ends."""
        yield from run_episodes(
            self.agent,
            self.env,
            shard,
            batch_size=self.engine.batch_size,
            max_steps=self.max_steps,
            episode_retries=self.engine.episode_retries,
            pool=self.pool,
        )


_DEATH = (
    ray.exceptions.RayActorError,
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.NodeDiedError,
    ray.exceptions.ObjectLostError,
    ray.exceptions.OwnerDiedError,
)

# newer Ray raises this for an actor that is restarting or unreachable
_UNAVAILABLE = tuple(c for c in [getattr(ray.exceptions, "ActorUnavailableError", None)] if c is not None)


def _is_death(exc: BaseException) -> bool:
    return isinstance(exc, (*_DEATH, *_UNAVAILABLE))


class _Slot:
    """A worker actor and the shard it is running."""

    def __init__(self, actor: Any, pid: int | None, node: str | None = None) -> None:
        self.actor = actor
        self.pid = pid
        self.node = node
        self.shard: list[EpisodeSpec] = []
        self.arrived: set[tuple[str, str, int]] = set()


def run_shards(
    shards: Sequence[Sequence[EpisodeSpec]],
    agent: AgentSpec,
    env: EnvFactory,
    max_steps: int,
    engine: EngineOptions,
    options: RayOptions,
    write: Callable[[Trajectory], None],
    *,
    name: str,
) -> int:
    """Run ``shards`` on Ray workers, calling ``write`` (in this process) for every trajectory as it arrives.

    Args:
        shards: the episodes, in shards (each runs start to end on one worker).
        agent: how workers load the agent.
        env: how workers make envs.
        max_steps: step limit of an episode.
        engine: batching and retries of :func:`~w2s_agents.rollout.run_episodes` in each worker.
        options: workers, resources, cluster.
        write: stores one trajectory (the driver is the only writer).
        name: the agent's name (the ``model`` of episode keys).

    Returns:
        The number of workers that died (their episodes were re-run).

    Raises:
        W2SError: a worker could not start, no node can hold a worker (``workers_per_node``), the rollout code
            raised in a worker, or workers kept dying beyond ``max_worker_restarts``.
    """
    queue: deque[list[EpisodeSpec]] = deque(list(s) for s in shards if s)
    if not queue:
        return 0
    with ray_session(options):
        remote_cls = ray.remote(RolloutWorker)
        threads = options.worker_threads
        restarts_left = options.max_worker_restarts
        failures = 0

        def start_workers(n: int) -> list[_Slot]:
            live = Counter(s.node for s in [*running.values(), *idle] if s.node is not None)
            nodes = plan_nodes(options, n, live)
            actors = [
                remote_cls.options(**worker_options(options, node)).remote(
                    agent, env, max_steps, engine, threads
                )
                for node in nodes
            ]
            slots = []
            for actor, node in zip(actors, nodes, strict=True):
                try:
                    pid = ray.get(actor.pid.remote(), timeout=options.start_timeout_s)
                except ray.exceptions.GetTimeoutError as exc:
                    for a in actors:
                        ray.kill(a)
                    raise W2SError(
                        f"a rollout worker did not start within {options.start_timeout_s:.0f} s (does the Ray "
                        f"cluster have {options.worker_cpus} CPUs and {options.worker_gpus} GPUs free for it?)"
                    ) from exc
                except ray.exceptions.RayError as exc:
                    for a in actors:
                        ray.kill(a)
                    raise W2SError(f"a rollout worker failed to start: {_cause(exc)}") from exc
                slots.append(_Slot(actor, pid, node))
            logger.info("%d rollout workers ready (pids %s)", len(slots), [s.pid for s in slots])
            return slots

        running: dict[Any, _Slot] = {}
        idle: list[_Slot] = []
        wanted = min(options.workers, len(queue))
        idle = start_workers(wanted)
        if not idle:
            raise W2SError(
                f"no live node of the Ray cluster has {options.worker_cpus} CPUs and {options.worker_gpus} GPUs "
                "for a rollout worker (workers_per_node)"
            )
        if len(idle) < wanted:
            logger.warning(
                "%d rollout workers instead of %d: workers_per_node = %d on the cluster's nodes",
                len(idle),
                wanted,
                options.workers_per_node,
            )

        def assign() -> None:
            while idle and queue:
                slot = idle.pop()
                slot.shard = queue.popleft()
                slot.arrived = set()
                gen = slot.actor.run.options(num_returns="streaming").remote(slot.shard)
                running[gen] = slot

        assign()
        try:
            while running:
                ready, _ = ray.wait(list(running), num_returns=1)
                gen = ready[0]
                slot = running[gen]
                try:
                    ref = next(gen)
                    traj = ray.get(ref)
                except StopIteration:
                    del running[gen]
                    missing = [
                        s for s in slot.shard if (s.task_id, s.sampler.name, s.seed) not in slot.arrived
                    ]
                    if missing:  # cannot happen unless a worker skips episodes: run them again
                        logger.error(
                            "a worker finished a shard without %d of its episodes; re-queued", len(missing)
                        )
                        queue.appendleft(missing)
                    idle.append(slot)
                    assign()
                    continue
                except ray.exceptions.RayError as exc:
                    if not _is_death(exc):
                        raise W2SError(f"rollout worker (pid {slot.pid}) failed: {_cause(exc)}") from exc
                    del running[gen]
                    failures += 1
                    missing = [
                        s for s in slot.shard if (s.task_id, s.sampler.name, s.seed) not in slot.arrived
                    ]
                    logger.warning(
                        "rollout worker pid %s died (%s); %d unfinished episodes of its shard go to another worker",
                        slot.pid,
                        type(exc).__name__,
                        len(missing),
                    )
                    with contextlib.suppress(Exception):
                        ray.kill(slot.actor)
                    if missing:
                        queue.appendleft(missing)
                    if restarts_left > 0 and queue:
                        restarts_left -= 1
                        try:  # a failed start (its node died too) leaves the queue to the other workers
                            idle.extend(start_workers(1))
                        except W2SError as start_exc:
                            if not (running or idle):
                                raise
                            logger.warning("no replacement worker: %s", start_exc)
                    if not running and not idle and queue:
                        left = sum(len(s) for s in queue)
                        raise W2SError(
                            f"every rollout worker died and max_worker_restarts is used up (or no node has room "
                            f"for a replacement); {left} episodes were not run (the store holds all finished "
                            "ones: run again to resume)"
                        ) from exc
                    assign()
                    continue
                slot.arrived.add((traj.task_id, traj.source.sampler, traj.source.seed))
                if traj.source.model != name:
                    raise W2SError(f"a worker's agent is named {traj.source.model!r}, expected {name!r}")
                write(traj)
        finally:
            for slot in [*running.values(), *idle]:
                with contextlib.suppress(Exception):
                    ray.kill(slot.actor)
    return failures


def _cause(exc: BaseException) -> str:
    """The message of the exception a Ray error wraps (the worker's own error), on one line."""
    cause = getattr(exc, "cause", None)
    inner = cause if isinstance(cause, BaseException) else exc
    text = f"{type(inner).__name__}: {inner}"
    return " ".join(text.split())[:500]
