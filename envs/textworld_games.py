"""Generating TextWorld games in worker processes, with a time limit, cached on disk by the hash of their spec.

``GameCache(root).get(spec)`` returns the path of the compiled ``.z8`` game of a :class:`GameSpec`, generating
and compiling it (TextWorld's bundled Inform 7) on the first request and finding it on disk afterwards. Files are
``<root>/<challenge>/<key>.z8`` plus the ``.json`` game description TextWorld needs to track state.

Every game is made in a worker process (a fresh interpreter, ``python -m w2s_agents.envs.textworld_games``), so
that a generation can be stopped: a game that takes longer than ``timeout_s`` (default
:data:`DEFAULT_TIMEOUT_S`; config key ``tasks.generation_timeout_s``) has its worker killed and a one-line
:class:`~w2s_agents.errors.W2SError` naming the game and the key. :meth:`GameCache.generate` runs several workers
at once, which is how a run prepares its task suite (a small game takes about two seconds of one core).

Files and folders:

* A worker makes its games in a scratch folder ``<root>/.gen-<pid>-<random>`` of its own (also its ``HOME``,
  where Inform 7 writes its ``Inform`` folder, so the user's home stays untouched), then moves each finished
  game into place: json first, ``.z8`` last, so a ``.z8`` on disk means both files are whole.
* Only that move holds a lock (``fcntl.flock`` on ``<root>/.lock``, shared by every process using the cache).
  Two processes making the same game both make it; the one that comes second finds the game in place and
  discards its copy.
* The scratch folder goes on every exit path: the worker removes it when it ends (also on SIGTERM, and when its
  parent process dies: a watchdog thread notices within half a second); the parent removes it after stopping a
  worker (time limit, error, Ctrl-C); and a cache that starts generating removes the scratch folders of
  processes that no longer run (a generation killed with SIGKILL).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from w2s_agents.envs.suites import GameSpec
from w2s_agents.errors import W2SError

__all__ = ["DEFAULT_TIMEOUT_S", "TIMEOUT_KEY", "GameCache", "default_cache_dir"]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0
"""Longest time one game may take to generate and compile, in seconds (a small game takes about two)."""
TIMEOUT_KEY = "tasks.generation_timeout_s"
"""The config key that sets the time limit of a run's game generation (named in the time-limit error)."""

_SCRATCH_PREFIX = ".gen-"
_SCRATCH_PID = re.compile(r"^\.gen-(\d+)-")
_LEGACY_SCRATCH_AGE_S = 3600.0  # scratch folders without a pid (older versions) are removed after an hour
_STOP_GRACE_S = 3.0  # a stopped worker gets this long to clean up after SIGTERM before SIGKILL


def default_cache_dir() -> Path:
    """Where generated games go: ``$W2S_CACHE/games`` if set, else ``$XDG_CACHE_HOME/w2s-agents/games``,
    else ``~/.cache/w2s-agents/games``."""
    if os.environ.get("W2S_CACHE"):
        return Path(os.environ["W2S_CACHE"]) / "games"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "w2s-agents" / "games"


def check_timeout(timeout_s: Any, where: str = TIMEOUT_KEY) -> float:
    """``timeout_s`` as a float if it is a positive finite number of seconds.

    Raises:
        W2SError: it is not (the message names ``where``, the config key or argument).
    """
    ok = isinstance(timeout_s, int | float) and not isinstance(timeout_s, bool)
    if not ok or not math.isfinite(timeout_s) or timeout_s <= 0:
        raise W2SError(f"{where} must be a positive number of seconds, got {timeout_s!r}")
    return float(timeout_s)


def describe(spec: GameSpec) -> str:
    """``spec`` in words for messages: challenge, seed and settings."""
    return f"the {spec.challenge} game with seed {spec.seed} and settings {dict(spec.settings)}"


class GameCache:
    """Compiled TextWorld games on disk, keyed by :meth:`GameSpec.key`.

    Args:
        root: cache folder (default :func:`default_cache_dir`); created on first use.
        timeout_s: longest time one game may take to make (see :data:`DEFAULT_TIMEOUT_S`).

    Raises:
        W2SError: ``timeout_s`` is not a positive number.
    """

    def __init__(
        self, root: str | os.PathLike[str] | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        self.timeout_s = check_timeout(timeout_s, "GameCache timeout_s")

    def path(self, spec: GameSpec) -> Path:
        """Where the ``.z8`` game of ``spec`` is (or will be) stored."""
        return self.root / spec.challenge / f"{spec.key()}.z8"

    def contains(self, spec: GameSpec) -> bool:
        """Whether ``spec``'s game is already generated."""
        path = self.path(spec)
        return path.is_file() and path.with_suffix(".json").is_file()

    def get(self, spec: GameSpec, timeout_s: float | None = None) -> Path:
        """The path of ``spec``'s compiled game, generating it first (in a worker process) if it is not cached.

        Args:
            spec: the game.
            timeout_s: time limit of the generation (default: the cache's ``timeout_s``).

        Raises:
            W2SError: TextWorld failed to generate or compile the game, or took longer than the time limit
                (message names the spec).
        """
        if not self.contains(spec):
            self._run([spec], 1, self._timeout(timeout_s), show_progress=False)
        return self.path(spec)

    def generate(
        self, specs: Sequence[GameSpec], workers: int = 1, timeout_s: float | None = None
    ) -> list[Path]:
        """Make every game of ``specs`` that is not cached yet, in ``workers`` processes at once; returns their
        paths in order.

        Worker processes are fresh interpreters (``python -m w2s_agents.envs.textworld_games``); nothing of the
        calling process (threads, a CUDA context, the main module) is inherited.

        Args:
            specs: the games (repeats are made once).
            workers: processes at once.
            timeout_s: time limit of each game (default: the cache's ``timeout_s``).

        Raises:
            W2SError: TextWorld failed to generate or compile a game, or one took longer than the time limit
                (message names the spec); every worker is stopped and its scratch folder removed first.
        """
        timeout = self._timeout(timeout_s)
        missing = list({s.key(): s for s in specs if not self.contains(s)}.values())
        if missing:
            self._run(missing, max(1, min(workers, len(missing))), timeout, show_progress=True)
        return [self.path(s) for s in specs]

    def remove_stale_scratch(self) -> list[Path]:
        """Remove the scratch folders (``.gen-*``) of generations whose process no longer runs; returns them."""
        removed = []
        for folder in [*self.root.glob(f"{_SCRATCH_PREFIX}*"), *self.root.glob(f"*/{_SCRATCH_PREFIX}*")]:
            if folder.is_dir() and _is_stale(folder):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
        if removed:
            logger.info("removed %d scratch folders of stopped game generations", len(removed))
        return removed

    # ------------------------------------------------------------------------------ internals

    def _timeout(self, timeout_s: float | None) -> float:
        return self.timeout_s if timeout_s is None else check_timeout(timeout_s, "timeout_s")

    def _run(self, missing: list[GameSpec], workers: int, timeout_s: float, *, show_progress: bool) -> None:
        """Make ``missing`` (none cached) in ``workers`` worker processes, each game within ``timeout_s``."""
        from w2s_agents.log import progress

        self.root.mkdir(parents=True, exist_ok=True)
        self.remove_stale_scratch()
        start = time.perf_counter()
        by_key = {s.key(): s for s in missing}
        procs: list[subprocess.Popen[bytes]] = []
        sel = selectors.DefaultSelector()
        bar = progress(total=len(missing), desc="games", unit="game") if show_progress else None
        try:
            for i in range(workers):
                proc = subprocess.Popen(
                    [sys.executable, "-m", __name__, str(self.root)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    bufsize=0,  # read with os.read as data comes: a buffered line would hide from select
                    start_new_session=True,  # its own process group: stopping it also stops Inform 7
                )
                assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
                lines = "".join(json.dumps(_spec_dict(s)) + "\n" for s in missing[i::workers])
                proc.stdin.write(lines.encode("utf-8"))
                proc.stdin.close()
                sel.register(proc.stdout, selectors.EVENT_READ, (proc, "out"))
                sel.register(proc.stderr, selectors.EVENT_READ, (proc, "err"))  # read as it comes: never full
                procs.append(proc)
            current: dict[int, tuple[str, float]] = {}  # worker pid -> (key of the game it makes, since when)
            stderr: dict[int, bytes] = {proc.pid: b"" for proc in procs}
            pending: dict[int, bytes] = {proc.pid: b"" for proc in procs}  # stdout after its last newline
            while sel.get_map():
                now = time.monotonic()
                for key, since in current.values():
                    if now - since > timeout_s:
                        raise W2SError(
                            f"generating {describe(by_key[key])} took longer than {timeout_s:g}s "
                            f"(the limit is {TIMEOUT_KEY}); the game was not made"
                        )
                deadlines = [since + timeout_s - now for _, since in current.values()]
                for event, _ in sel.select(max(0.0, min(deadlines)) + 0.05 if deadlines else None):
                    proc, stream = event.data
                    data = os.read(event.fd, 65536)
                    if not data:
                        sel.unregister(event.fileobj)
                        current.pop(proc.pid, None)
                    elif stream == "err":
                        stderr[proc.pid] = (stderr[proc.pid] + data)[-8192:]
                    else:
                        *lines, pending[proc.pid] = (pending[proc.pid] + data).split(b"\n")
                        for line in (ln.decode(errors="replace") for ln in lines):
                            if line.startswith("start "):
                                current[proc.pid] = (line.split()[1], time.monotonic())
                            elif line.startswith("done "):
                                current.pop(proc.pid, None)
                                if bar is not None:
                                    bar.update(1)
            for proc in procs:
                if proc.wait() != 0:
                    err = [ln.strip() for ln in stderr[proc.pid].decode(errors="replace").splitlines()]
                    err = [ln for ln in err if ln]
                    raise W2SError(
                        f"game generation failed: {err[-1] if err else f'exit status {proc.returncode}'}"
                    )
        finally:
            sel.close()
            if bar is not None:
                bar.close()
            for proc in procs:
                _stop(proc)
                for folder in self.root.glob(f"{_SCRATCH_PREFIX}{proc.pid}-*"):
                    shutil.rmtree(folder, ignore_errors=True)
        logger.info(
            "generated %d games in %d processes in %.1fs", len(missing), workers, time.perf_counter() - start
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End a worker and its process group (SIGTERM, then SIGKILL after a grace period) and close its pipes."""
    if proc.poll() is None:
        for sig, grace in ((signal.SIGTERM, _STOP_GRACE_S), (signal.SIGKILL, None)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(grace)
                break
            except subprocess.TimeoutExpired:
                continue
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # Inform 7, if it outlived the worker
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


def _is_stale(folder: Path) -> bool:
    """Whether the process that owns the scratch ``folder`` (its name holds the pid) no longer runs."""
    match = _SCRATCH_PID.match(folder.name)
    if match is None:  # an older version's folder: no owner to ask
        try:
            return time.time() - folder.stat().st_mtime > _LEGACY_SCRATCH_AGE_S
        except OSError:
            return False
    pid = int(match.group(1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    cmdline = Path(f"/proc/{pid}/cmdline")
    with contextlib.suppress(OSError):  # a reused pid: alive, but not a generation worker
        return __name__.encode() not in cmdline.read_bytes()
    return False


@contextlib.contextmanager
def _cache_lock(root: Path) -> Iterator[None]:
    """Hold the cache's lock file (``<root>/.lock``), shared by every process that uses the cache."""
    with open(root / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _spec_dict(spec: GameSpec) -> dict[str, Any]:
    return {"challenge": spec.challenge, "seed": spec.seed, "settings": dict(spec.settings)}


def _watch_parent(parent: int) -> None:
    """End this worker (SIGTERM to itself, which removes its scratch folder) once its parent process is gone."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _worker_main(root: str) -> int:
    """A generation worker: make the games of the spec lines on stdin, printing ``start <key>`` before and
    ``done <key>`` after each (the protocol with the parent), in a scratch folder removed on every exit."""
    signal.signal(signal.SIGTERM, _terminated)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    cache = Path(root)
    cache.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"{_SCRATCH_PREFIX}{os.getpid()}-", dir=cache))
    try:
        os.environ["HOME"] = str(scratch / "home")  # Inform 7 writes $HOME/Inform
        (scratch / "home").mkdir()
        for line in sys.stdin:
            if line.strip():
                spec = GameSpec(**json.loads(line))
                sys.stdout.write(f"start {spec.key()}\n")
                sys.stdout.flush()
                _make_into(GameCache(cache), spec, scratch)
                sys.stdout.write(f"done {spec.key()}\n")
                sys.stdout.flush()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


def _make_into(cache: GameCache, spec: GameSpec, scratch: Path) -> None:
    """Make ``spec``'s game in ``scratch`` and move it into ``cache`` (unless another process was first)."""
    path = cache.path(spec)
    if cache.contains(spec):
        return
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(dir=scratch))
    try:
        try:
            game_file = _make_and_compile(spec, tmp / "game.z8")
        except W2SError:
            raise
        except Exception as exc:
            raise W2SError(
                f"TextWorld could not generate {describe(spec)}: {type(exc).__name__}: {str(exc).strip()[:300]}"
            ) from exc
        path.parent.mkdir(parents=True, exist_ok=True)
        with _cache_lock(cache.root):
            if cache.contains(spec):
                logger.info(
                    "%s was made meanwhile by another process; this copy is discarded", describe(spec)
                )
                return
            # json first, z8 last: a .z8 on disk means both files are complete
            os.replace(game_file.with_suffix(".json"), path.with_suffix(".json"))
            os.replace(game_file, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info(
        "generated %s game seed %d in %.1fs -> %s",
        spec.challenge,
        spec.seed,
        time.perf_counter() - start,
        path,
    )


def _make_and_compile(spec: GameSpec, out: Path) -> Path:
    """Generate ``spec``'s game and compile it to ``out`` (a ``.z8`` path); returns the compiled file."""
    import jericho
    from textworld.generator import compile_game
    from textworld.generator.game import GameOptions

    options = GameOptions()
    options.seeds = spec.seed
    options.path = str(out)
    options.file_ext = ".z8"
    options.force_recompile = True
    with warnings.catch_warnings():
        # some challenges play their game in Jericho to record the walkthrough; Jericho then warns that it
        # cannot read the score of TextWorld games (TextWorld tracks it itself)
        warnings.simplefilter("ignore", jericho.UnsupportedGameWarning)
        game = _make_game(spec, options)
    game.metadata["w2s_spec"] = _spec_dict(spec)
    return Path(compile_game(game, options))


def _make_game(spec: GameSpec, options: Any) -> Any:
    import textworld
    import textworld.challenges

    settings = dict(spec.settings)
    if spec.challenge == "custom":
        options.nb_rooms = settings["world_size"]
        options.nb_objects = settings["nb_objects"]
        options.quest_length = settings["quest_length"]
        options.quest_breadth = settings["quest_breadth"]
        game = textworld.generator.make_game(options)
    else:
        _, make, _ = textworld.challenges.CHALLENGES[spec.challenge]
        game = make(settings, options)
    return game


if __name__ == "__main__":  # a worker of GameCache
    try:
        sys.exit(_worker_main(sys.argv[1]))
    except W2SError as exc:
        sys.stderr.write(f"{exc}\n")
        sys.exit(1)
