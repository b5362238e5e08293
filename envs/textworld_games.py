"""Generating TextWorld games in-process, cached on disk by the hash of their spec.

``GameCache(root).get(spec)`` returns the path of the compiled ``.z8`` game of a :class:`GameSpec`, generating
and compiling it (TextWorld's bundled Inform 7) on the first request and finding it on disk afterwards. Files are
``<root>/<challenge>/<key>.z8`` plus the ``.json`` game description TextWorld needs to track state; both are
written under temporary names and renamed into place, so a killed generation never leaves a half-written game.

The Inform 7 compiler creates ``$HOME/Inform`` on every run. To keep the user's home untouched, compilation runs
with ``HOME`` pointed at ``<root>/.inform-home`` (the variable is swapped under a lock for the duration of a
generation, since TextWorld starts the compiler with the process environment).

:meth:`GameCache.generate` makes many games at once in worker processes (each compiling with a home folder of
its own), which is how a run prepares its task suite: a game takes about two seconds of one core to make.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import shutil
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

__all__ = ["GameCache", "default_cache_dir"]

logger = logging.getLogger(__name__)

_GENERATION_LOCK = threading.Lock()
_WORKER_HOME: Path | None = None  # the Inform home folder of a generation worker process (None elsewhere)


def default_cache_dir() -> Path:
    """Where generated games go: ``$W2S_CACHE/games`` if set, else ``$XDG_CACHE_HOME/w2s-agents/games``,
    else ``~/.cache/w2s-agents/games``."""
    if os.environ.get("W2S_CACHE"):
        return Path(os.environ["W2S_CACHE"]) / "games"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "w2s-agents" / "games"


@contextlib.contextmanager
def _private_home(folder: Path) -> Iterator[None]:
    """Run the body with ``HOME`` set to ``folder`` (where Inform 7 then writes its ``Inform`` folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    old = os.environ.get("HOME")
    os.environ["HOME"] = str(folder)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = old


class GameCache:
    """Compiled TextWorld games on disk, keyed by :meth:`GameSpec.key`.

    Args:
        root: cache folder (default :func:`default_cache_dir`); created on first use.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()

    def path(self, spec: GameSpec) -> Path:
        """Where the ``.z8`` game of ``spec`` is (or will be) stored."""
        return self.root / spec.challenge / f"{spec.key()}.z8"

    def contains(self, spec: GameSpec) -> bool:
        """Whether ``spec``'s game is already generated."""
        path = self.path(spec)
        return path.is_file() and path.with_suffix(".json").is_file()

    def get(self, spec: GameSpec) -> Path:
        """The path of ``spec``'s compiled game, generating it first if it is not cached.

        Raises:
            W2SError: TextWorld failed to generate or compile the game (message names the spec).
        """
        path = self.path(spec)
        if self.contains(spec):
            return path
        with _GENERATION_LOCK:
            if self.contains(spec):  # made by another thread meanwhile
                return path
            self._generate(spec, path)
        return path

    def generate(self, specs: Sequence[GameSpec], workers: int = 1) -> list[Path]:
        """Make every game of ``specs`` that is not cached yet, in ``workers`` processes at once (1: here, one
        after the other); returns their paths in order.

        Worker processes are fresh interpreters (``python -m w2s_agents.envs.textworld_games``), each with an
        Inform home folder of its own; nothing of the calling process (threads, a CUDA context, the main
        module) is inherited.

        Raises:
            W2SError: TextWorld failed to generate or compile a game (message names the spec).
        """
        from w2s_agents.log import progress

        missing = list({s.key(): s for s in specs if not self.contains(s)}.values())
        workers = min(workers, len(missing))
        if workers <= 1:
            for spec in progress(missing, desc="games", unit="game"):
                self.get(spec)
            return [self.path(s) for s in specs]
        start = time.perf_counter()
        homes = self.root / ".inform-home" / "workers"
        procs = []
        for i in range(workers):
            lines = [json.dumps(_spec_dict(s)) for s in missing[i::workers]]
            proc = subprocess.Popen(
                [sys.executable, "-m", __name__, str(self.root), str(homes / str(i))],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            assert proc.stdin is not None
            proc.stdin.write("\n".join(lines) + "\n")
            proc.stdin.close()
            procs.append(proc)
        errors = []
        with progress(total=len(missing), desc="games", unit="game") as bar:
            sel = selectors.DefaultSelector()
            for proc in procs:
                sel.register(proc.stdout, selectors.EVENT_READ)  # type: ignore[arg-type]
            open_pipes = len(procs)
            while open_pipes:
                for key, _ in sel.select():
                    line = key.fileobj.readline()  # type: ignore[union-attr]
                    if not line:
                        sel.unregister(key.fileobj)
                        open_pipes -= 1
                    elif line.startswith("done "):
                        bar.update(1)
            sel.close()
            for proc in procs:
                err = proc.stderr.read() if proc.stderr is not None else ""
                if proc.wait() != 0:
                    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
                    errors.append(lines[-1] if lines else f"exit status {proc.returncode}")
        shutil.rmtree(homes, ignore_errors=True)
        if errors:
            raise W2SError(f"game generation failed: {errors[0]}")
        logger.info(
            "generated %d games in %d processes in %.1fs", len(missing), workers, time.perf_counter() - start
        )
        return [self.path(s) for s in specs]

    def _generate(self, spec: GameSpec, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=".gen-", dir=path.parent))
        try:
            with _private_home(_WORKER_HOME or self.root / ".inform-home"):
                game_file = _make_and_compile(spec, tmp / "game.z8")
            # json first, z8 last: a .z8 on disk means both files are complete
            os.replace(game_file.with_suffix(".json"), path.with_suffix(".json"))
            os.replace(game_file, path)
        except W2SError:
            raise
        except Exception as exc:
            raise W2SError(
                f"TextWorld could not generate the {spec.challenge} game with seed {spec.seed} "
                f"and settings {dict(spec.settings)}: {type(exc).__name__}: {str(exc).strip()[:300]}"
            ) from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info(
            "generated %s game seed %d in %.1fs -> %s",
            spec.challenge,
            spec.seed,
            time.perf_counter() - start,
            path,
        )


def _spec_dict(spec: GameSpec) -> dict[str, Any]:
    return {"challenge": spec.challenge, "seed": spec.seed, "settings": dict(spec.settings)}


def _worker_main(root: str, home: str) -> int:
    """A generation worker: make the games of the spec lines on stdin, print ``done <key>`` after each."""
    global _WORKER_HOME
    _WORKER_HOME = Path(home)
    cache = GameCache(root)
    for line in sys.stdin:
        if line.strip():
            spec = GameSpec(**json.loads(line))
            cache.get(spec)
            sys.stdout.write(f"done {spec.key()}\n")  # the protocol with the parent, not user output
            sys.stdout.flush()
    return 0


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
    game.metadata["w2s_spec"] = {
        "challenge": spec.challenge,
        "seed": spec.seed,
        "settings": dict(spec.settings),
    }
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


if __name__ == "__main__":  # a worker of GameCache.generate
    try:
        sys.exit(_worker_main(sys.argv[1], sys.argv[2]))
    except W2SError as exc:
        sys.stderr.write(f"{exc}\n")
        sys.exit(1)
