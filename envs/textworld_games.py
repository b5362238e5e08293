"""Generating TextWorld games in-process, cached on disk by the hash of their spec.

``GameCache(root).get(spec)`` returns the path of the compiled ``.z8`` game of a :class:`GameSpec`, generating
and compiling it (TextWorld's bundled Inform 7) on the first request and finding it on disk afterwards. Files are
``<root>/<challenge>/<key>.z8`` plus the ``.json`` game description TextWorld needs to track state; both are
written under temporary names and renamed into place, so a killed generation never leaves a half-written game.

The Inform 7 compiler creates ``$HOME/Inform`` on every run. To keep the user's home untouched, compilation runs
with ``HOME`` pointed at ``<root>/.inform-home`` (the variable is swapped under a lock for the duration of a
generation, since TextWorld starts the compiler with the process environment).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from w2s_agents.envs.suites import GameSpec
from w2s_agents.errors import W2SError

__all__ = ["GameCache", "default_cache_dir"]

logger = logging.getLogger(__name__)

_GENERATION_LOCK = threading.Lock()


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

    def _generate(self, spec: GameSpec, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=".gen-", dir=path.parent))
        try:
            with _private_home(self.root / ".inform-home"):
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
