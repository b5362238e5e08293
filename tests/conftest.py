"""Test-suite set-up: offline, CPU-only, and no files left in the user's home.

Environment variables are set at import time, before any test module imports transformers, textworld or ray:
nothing is fetched from a model hub, progress bars stay off, and HOME points at a temporary folder so that
tools which write to ``$HOME`` (TextWorld's Inform7 writes ``$HOME/Inform``, Ray writes ``~/.ray``, the HF cache)
leave nothing behind.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

_HOME = Path(tempfile.mkdtemp(prefix="w2s-test-home-"))
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
os.environ.update(
    {
        "HOME": str(_HOME),
        "HF_HOME": str(_HOME / "hf"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "W2S_PROGRESS": "0",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "TOKENIZERS_PARALLELISM": "false",
        "CUDA_VISIBLE_DEVICES": os.environ.get("W2S_TEST_CUDA_VISIBLE_DEVICES", ""),
    }
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository's root folder."""
    return REPO


@pytest.fixture(scope="session")
def game_texts() -> list[str]:
    """A small corpus of text-game lines for training tiny tokenizers."""
    rooms = ["kitchen", "cellar", "garden", "attic", "pantry", "hallway"]
    things = ["apple", "key", "lamp", "coin", "knife", "box"]
    texts = []
    for i, room in enumerate(rooms):
        for j, thing in enumerate(things):
            texts.append(f"-= {room.title()} =- You are in a {room}. You see a {thing} on the table.")
            texts.append(f"take {thing}")
            texts.append(
                f"You take the {thing} from the table. Your score has just gone up by {i + j} points."
            )
            texts.append(f"go {['north', 'south', 'east', 'west'][(i + j) % 4]}")
            texts.append(f"open {thing} box with {things[(j + 1) % len(things)]}")
    return texts


@pytest.fixture(scope="session")
def game_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TextWorld game cache shared by the tests of one session (games are generated once)."""
    return tmp_path_factory.mktemp("games")


@pytest.fixture(scope="session")
def tw_test_suites() -> dict:
    """One tiny registered TextWorld suite per game recipe (``test-tw-simple``, ..., ``test-custom``), keyed by
    challenge name; 2 train, 1 valid and 1 test game each."""
    from w2s_agents.envs.suites import TextWorldSuite, register_suite

    recipes = [
        ("tw-simple", {}),
        ("tw-coin_collector", {"level": 2}),
        ("tw-treasure_hunter", {"level": 2}),
        ("tw-cooking", {"recipe": 1, "take": 1, "go": 1, "open": True}),
        ("custom", {"world_size": 3, "nb_objects": 6, "quest_length": 3}),
    ]
    return {
        challenge: register_suite(
            TextWorldSuite(
                f"test-{challenge}",
                challenge,
                settings,
                sizes={"train": 2, "valid": 1, "test": 1},
                seed=1000,
                description=f"tiny {challenge} suite for tests",
            )
        )
        for challenge, settings in recipes
    }
