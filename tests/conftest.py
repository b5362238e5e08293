"""Test-suite set-up: offline, CPU-only, and no files left in the user's home.

Environment variables are set at import time, before any test module imports transformers, textworld or ray:
nothing is fetched from a model hub, progress bars stay off, and HOME points at a temporary folder so that
tools which write to ``$HOME`` (TextWorld's Inform7 writes ``$HOME/Inform``, Ray writes ``~/.ray``, the HF cache)
leave nothing behind.
"""

from __future__ import annotations

import atexit
import gc
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from w2s_agents.types import Source, Step, Trajectory

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
os.environ.pop("RAY_ADDRESS", None)  # rollouts would join that cluster; tests start their own Ray

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


# ------------------------------------------------------------------ trajectory trees and search

TREE_INSTRUCTION = "Leave the house."


def _make_traj(
    steps: list[tuple[str, str] | tuple[str, str, str]],
    ret: float,
    end: str,
    *,
    model: str = "weak",
    seed: int = 0,
    task: str = "house/0",
    initial: str = "start",
    role: str = "weak",
) -> Trajectory:
    """A trajectory from ``(action, observation_after[, thought])`` tuples."""
    return Trajectory(
        task_id=task,
        env_id="w2s/Fake-v0",
        source=Source(model=model, role=role, seed=seed),
        instruction=TREE_INSTRUCTION,
        initial_observation=initial,
        steps=tuple(Step(action=s[0], observation=s[1], thought=s[2] if len(s) > 2 else "") for s in steps),
        return_=ret,
        success=end == "won",
        end=end,
    )


def _golden_trajectories() -> list[Trajectory]:
    """Four episodes of one task; their tree (canonical ids) is::

    0 root "start"
    ├── 1 look                       (T4, error)
    └── 2 take key  (T1, T2, T3)
        ├── 3 go south               (T2, lost)
        └── 4 open door (T1, T3)
            ├── 5 go north           (T1, won)
            └── 6 go west            (T3, truncated)
    """
    return [
        _make_traj(
            [
                ("take key", "got key"),
                ("open door", "door open"),
                ("go north", "you win", "the exit is north"),
            ],
            1.0,
            "won",
            seed=1,
        ),
        _make_traj([("take key", "got key", "x"), ("go south", "you fall in a pit")], 0.0, "lost", seed=2),
        _make_traj(
            [("Take  Key", "got key", "grab it"), ("open door", "door open"), ("go west", "a wall")],
            0.5,
            "truncated",
            model="strong",
            seed=3,
        ),
        _make_traj([("look", "start")], 0.0, "error", seed=4),
    ]


@pytest.fixture
def make_traj():
    """Factory of small hand-written trajectories (see ``_make_traj``)."""
    return _make_traj


@pytest.fixture
def golden_trajectories() -> list:
    """Four hand-written episodes of one task whose tree, values and pairs the tests compute by hand."""
    return _golden_trajectories()


# ------------------------------------------------------------------ text environments


@pytest.fixture(scope="session")
def game_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TextWorld game cache shared by the tests of one session (games are generated once)."""
    return tmp_path_factory.mktemp("games")


@pytest.fixture
def w2s_cache(game_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``W2S_CACHE`` for one test that runs the pipeline: the session's cache, so that games are made once."""
    path = game_cache_dir.parent / "w2s-cache"
    monkeypatch.setenv("W2S_CACHE", str(path))
    return path


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


# ------------------------------------------------------------------ search visualisation

# Markup planted in env and model text: the viewer must show it as text and run none of it. Each payload sets
# window.__pwned if it ever runs.
PLANTED_ACTION = "<script>window.__pwned = 'action'</script>"
PLANTED_OBSERVATION = "<img src=x onerror=\"window.__pwned = 'observation'\"> & </script><b>bold</b>"
PLANTED_THOUGHT = "</script><script>window.__pwned = 'thought'</script><!-- \u2028 \u2029"


@pytest.fixture(scope="session")
def viz_trajectories() -> list[Trajectory]:
    """The golden episodes plus episodes of two more models, one of them with planted markup (see PLANTED_*)."""
    trajs = _golden_trajectories()
    trajs.append(
        _make_traj(
            [(PLANTED_ACTION, PLANTED_OBSERVATION, PLANTED_THOUGHT)], 0.25, "lost", model="evil", seed=5
        )
    )
    trajs.append(
        _make_traj(
            [("take key", "got key"), ("open door", "door open"), ("go north", "you win")],
            1.0,
            "won",
            model="strong",
            seed=6,
        )
    )
    trajs.append(
        _make_traj([("take key", "got key"), ("dance", "nothing happens")], 0.0, "truncated", seed=7)
    )
    return trajs


@pytest.fixture(scope="session")
def planted() -> dict[str, str]:
    """The planted markup of ``viz_trajectories``: ``{"action": ..., "observation": ..., "thought": ...}``."""
    return {"action": PLANTED_ACTION, "observation": PLANTED_OBSERVATION, "thought": PLANTED_THOUGHT}


_ARTIFACTS: list[tuple[str, Path]] = []


@pytest.fixture(scope="session")
def artifact_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder for files tests keep for people to look at (screenshots): ``$W2S_TEST_ARTIFACTS`` when set (CI
    sets tests/artifacts), else a folder under pytest's temporary base (pytest keeps the last runs')."""
    env = os.environ.get("W2S_TEST_ARTIFACTS")
    path = Path(env) if env else tmp_path_factory.mktemp("artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def keep_artifact():
    """``keep_artifact(what, path)``: list ``path`` as a kept test artefact at the end of the run."""

    def keep(what: str, path: Path) -> None:
        _ARTIFACTS.append((what, path))
        print(f"test artefact: {what}: {path}")

    return keep


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus) -> None:  # pytest hook: before the other plugins' session ends
    # Finalise the py4j objects of the Java envs' stopped JVMs now. Left to a garbage collection that comes
    # while a plugin imports a module at session end (assertion rewriting builds an AST), their finalizers make
    # CPython before 3.11.8 fail with "AST constructor recursion depth mismatch" after every test has passed.
    gc.collect()


def pytest_terminal_summary(terminalreporter) -> None:  # pytest hook: where the kept artefacts are
    if _ARTIFACTS:
        terminalreporter.section("test artefacts")
        for what, path in _ARTIFACTS:
            terminalreporter.write_line(f"{what}: {path}")


# ------------------------------------------------------------------ trainers

ROOMS = ["kitchen", "cellar", "garden", "attic", "pantry", "hallway"]
THINGS = ["apple", "key", "lamp", "coin", "knife", "box"]


def _agent_episode(i: int) -> tuple[str, str, list[tuple[str, str, str | None]]]:
    """A small three-step episode of a text game: (instruction, first observation, turns)."""
    room, thing = ROOMS[i % len(ROOMS)], THINGS[(i // len(ROOMS)) % len(THINGS)]
    turns = [
        ("I should look around first", "look", f"You are in the {room}. You see a {thing}."),
        ("", f"take {thing}", f"You take the {thing}."),
        (f"the {thing} goes north", "go north", None),
    ]
    return f"Bring the {thing} north.", f"-= {room.title()} =- You are in a {room}.", turns


@pytest.fixture(scope="session")
def train_texts() -> list[str]:
    """Text of the agent conversations of the trainer tests (system prompt, observations, actions)."""
    from w2s_agents.messages import SYSTEM_PROMPT, episode_messages

    texts = [SYSTEM_PROMPT] * 3
    for i in range(36):
        texts.extend(m["content"] for m in episode_messages(*_agent_episode(i)))
    return texts


@pytest.fixture(scope="session")
def train_models(tmp_path_factory: pytest.TempPathFactory, train_texts: list[str]) -> dict[str, Path]:
    """Tiny (nano) models for the trainer tests: ``policy`` and ``weak``, whose tokenizers were trained on
    different text (different vocabularies and merges)."""
    from w2s_agents.agents.models import create_tiny_model

    root = tmp_path_factory.mktemp("train-models")
    policy = create_tiny_model(root / "policy", train_texts, preset="nano", vocab_size=600, seed=1)
    other = [t.upper() for t in train_texts] + [t[::-1] for t in train_texts] + train_texts[:20]
    weak = create_tiny_model(root / "weak", other, preset="nano", vocab_size=400, seed=2)
    return {"policy": policy, "weak": weak}


_TRAIN_CHILD = """
import json, sys, time
import torch
torch.set_num_threads(1)
from w2s_agents.config import from_dict
from w2s_agents.log import setup_logging
from w2s_agents.trainers import TrainConfig, logps, {trainer}

model, rows_file, out, cfg_file, mode = sys.argv[1:6]
if mode == "slow":  # give the parent time to kill the run between checkpoints
    original = logps.token_logps
    def slow(*args, **kwargs):
        time.sleep(0.2)
        return original(*args, **kwargs)
    logps.token_logps = slow
setup_logging("INFO")
config = from_dict(TrainConfig, json.loads(open(cfg_file).read()))
result = {trainer}(model, json.loads(open(rows_file).read()), out, config{kwargs})
print("steps", result.steps)
"""


@dataclass
class KilledRun:
    """What :func:`_kill_and_resume` saw: the uninterrupted run, the killed run and its resumption."""

    reference: Path
    """The uninterrupted run's folder."""
    killed: Path
    """The folder of the run that was killed and then resumed."""
    uninterrupted: subprocess.CompletedProcess
    killed_returncode: int | None
    checkpoints_at_kill: list[str]
    """The checkpoint folders there were when the run was killed, sorted."""
    result_at_kill: bool
    """Whether the killed run had written result.json."""
    resumed: subprocess.CompletedProcess


def _kill_and_resume(
    tmp_path: Path, trainer: str, model: Path, rows: list[dict], config: dict, kill_at: str, kwargs: str = ""
) -> KilledRun:
    """Train in child processes: once uninterrupted, once slowed down and killed with SIGKILL as soon as
    checkpoint ``kill_at`` (e.g. ``step-00000002``) has its ``state.json``, then the killed run resumed.
    ``trainer`` names the function of w2s_agents.trainers (``train_sft``) called with ``(model, rows, out,
    config`` then ``kwargs``, Python text with the names ``model`` and ``out``)."""
    rows_file, cfg_file, child = tmp_path / "rows.json", tmp_path / "cfg.json", tmp_path / "child.py"
    rows_file.write_text(json.dumps(rows))
    cfg_file.write_text(json.dumps(config))
    child.write_text(_TRAIN_CHILD.format(trainer=trainer, kwargs=kwargs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "W2S_PROGRESS": "0"}
    base = [sys.executable, str(child), str(model), str(rows_file)]

    def run(out: Path) -> subprocess.CompletedProcess:
        return subprocess.run([*base, str(out), str(cfg_file), "fast"], capture_output=True, text=True, env=env,
                              timeout=240)  # fmt: skip

    reference, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    uninterrupted = run(reference)
    proc = subprocess.Popen([*base, str(killed), str(cfg_file), "slow"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    target = killed / "checkpoints" / kill_at / "state.json"
    deadline = time.monotonic() + 180
    while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    folder = killed / "checkpoints"
    at_kill = (
        sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []
    )
    result_at_kill = (killed / "result.json").exists()
    return KilledRun(reference, killed, uninterrupted, proc.returncode, at_kill, result_at_kill, run(killed))


@pytest.fixture(scope="session")
def kill_and_resume():
    """``kill_and_resume(tmp_path, trainer, model, rows, config, kill_at, kwargs="")``: a training run in a
    child process killed after a checkpoint and resumed, next to an uninterrupted one (a :class:`KilledRun`)."""
    return _kill_and_resume


def _two_processes_and_one(
    tmp_path: Path, model: Path, pair_rows: list[dict], launcher: list[str], env: dict[str, str] | None = None
) -> tuple[dict[str, Any], Any]:
    """Train DPO on ``pair_rows`` with two processes started by ``launcher`` (the command before ``-m w2s_agents
    train dpo JOB``, run in ``tmp_path``; ``env`` added to the environment) and in this process with one thread
    and gradient accumulation 2 on the same micro-batches. Checks that the launch worked, that only the main
    process reported, that both ran 6 steps and that their weights agree; returns ``(the two processes'
    result.json, the one process's TrainResult)``."""
    import torch
    from safetensors.torch import load_file

    from w2s_agents.config import from_dict
    from w2s_agents.trainers import TrainConfig, train_dpo

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in pair_rows))
    train = {"lr": 1e-2, "beta": 0.5, "batch_size": 2, "epochs": 2, "max_length": 512, "valid_fraction": 0.0,
             "warmup_ratio": 0.0, "checkpoint_every": 0, "reference": "strong"}  # fmt: skip
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({"model": str(model), "data": [str(pairs)], "out_dir": str(tmp_path / "ddp"),
                               "train": train}))  # fmt: skip
    cmd = [*launcher, "-m", "w2s_agents", "train", "dpo", str(job)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "W2S_PROGRESS": "0", **(env or {})}
    done = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("dpo, 12 rows") == 1  # only the main process reports
    assert "x2 processes" in done.stderr
    ddp = json.loads((tmp_path / "ddp" / "result.json").read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two processes
    try:
        single = from_dict(TrainConfig, {**train, "method": "dpo", "grad_accum": 2})
        one = train_dpo(model, pairs, tmp_path / "one", single, reference_path=model)
    finally:
        torch.set_num_threads(threads)
    # 12 pairs, 2 per micro-batch, one micro-batch per process per step: 3 steps an epoch
    assert ddp["steps"] == one.steps == 6
    wa = load_file(str(one.model_dir / "model.safetensors"))
    wb = load_file(str(tmp_path / "ddp" / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=1e-4)
    return ddp, one


@pytest.fixture(scope="session")
def two_processes_and_one():
    """``two_processes_and_one(tmp_path, model, pair_rows, launcher, env=None)``: DPO trained by two launched
    processes and by one with accumulation, checked to agree (see ``_two_processes_and_one``)."""
    return _two_processes_and_one


@pytest.fixture
def sft_rows() -> list[dict]:
    """Twelve SFT rows (three agent turns each) of six tasks, from two sources."""
    from w2s_agents.messages import episode_messages

    return [
        {"messages": episode_messages(*_agent_episode(i)), "task_id": f"game/{i % 6}",
         "sources": ["weak-a" if i % 3 else "weak-b"]}
        for i in range(12)
    ]  # fmt: skip


@pytest.fixture
def pair_rows() -> list[dict]:
    """Twelve preference pairs of six tasks: step pairs and continuation pairs (an observation inside); by
    ``i % 3`` both sources on both sides (easy), weak-a alone (easy), weak-b chosen over weak-a (hard)."""
    from w2s_agents.messages import agent_message, episode_messages

    rows = []
    for i in range(12):
        instruction, first, turns = _agent_episode(i)
        thing = THINGS[(i // len(ROOMS)) % len(THINGS)]
        prompt = episode_messages(instruction, first, [turns[0]])
        chosen = [agent_message(f"take {thing}")]
        if i % 2:  # continuation level: the action, its observation, the next action
            chosen += [
                {"role": "user", "content": f"You take the {thing}."},
                agent_message("go north", "done"),
            ]
        rows.append({
            "prompt": prompt, "chosen": chosen, "rejected": [agent_message("go south")],
            "level": "continuation" if i % 2 else "step", "task_id": f"game/{i % 6}",
            "chosen_sources": [["weak-a", "weak-b"], ["weak-a"], ["weak-b"]][i % 3],
            "rejected_sources": [["weak-a", "weak-b"], ["weak-a"], ["weak-a"]][i % 3],
        })  # fmt: skip
    return rows


# ------------------------------------------------------------------ agents


@pytest.fixture(scope="session")
def tw_game_files(game_cache_dir: Path, tw_test_suites: dict) -> list[str]:
    """Paths of the four ``test-tw-simple`` games (compiled ``.z8`` files, usable as task ids in any process)."""
    from w2s_agents.envs.textworld_games import GameCache

    suite = tw_test_suites["tw-simple"]
    cache = GameCache(game_cache_dir)
    return [
        str(cache.get(suite.game_spec(split, i)))
        for split in ("train", "valid", "test")
        for i in range(suite.sizes[split])
    ]


@pytest.fixture(scope="session")
def nano_model_dir(tmp_path_factory: pytest.TempPathFactory, game_texts: list[str]) -> Path:
    """A tiny random-weight ``nano`` Llama model whose tokenizer knows the game text and the agent prompts."""
    from w2s_agents.agents.models import create_tiny_model
    from w2s_agents.messages import SYSTEM_PROMPT

    texts = [
        *game_texts,
        SYSTEM_PROMPT,
        "Thought: I should look around.\nAction: look",
        "Admissible commands now:",
    ]
    return create_tiny_model(tmp_path_factory.mktemp("models") / "nano", texts, preset="nano", vocab_size=512)


@pytest.fixture
def one_torch_thread():
    """Run the test with one torch thread (much faster than two on a machine whose cores are busy)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_torch_thread_module():
    """One torch thread for a whole test module, its module fixtures included (tiny models run fastest, and
    steadiest on a shared machine, on one CPU thread); use with ``pytestmark = pytest.mark.usefixtures(...)``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------ a game with state keys (best paths)

# a corridor of rooms: hall - cellar - stairs - vault (east), and a side room (north of the hall); reaching the
# stairs scores half the points, the vault all of them, but the vault door closes after 3 moves: reaching it on
# move 4 or later loses the game (with the points scored so far)
VAULT_MOVES = {
    ("hall", "go east"): "cellar",
    ("cellar", "go west"): "hall",
    ("cellar", "go east"): "stairs",
    ("stairs", "go west"): "cellar",
    ("stairs", "go east"): "vault",
    ("hall", "go north"): "side",
    ("side", "go south"): "hall",
}


class VaultGame:
    """The game above; the state key is the room (the move counter is not part of the state)."""

    env_id = "w2s/Vault-v0"
    instruction = "Reach the vault."

    def __init__(self, door_closes: int = 3) -> None:
        self.door_closes = door_closes
        self.room, self.moves, self.score = "hall", 0, 0.0

    def _info(self) -> dict[str, Any]:
        won = self.room == "vault" and self.moves <= self.door_closes
        lost = self.room == "vault" and not won
        return {"score": self.score, "won": won, "lost": lost, "state_key": self.room}

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[str, dict]:
        self.room, self.moves, self.score = "hall", 0, 0.0
        return "You are in the hall.", {**self._info(), "instruction": self.instruction}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        before = self.score
        self.moves += 1
        self.room = VAULT_MOVES.get((self.room, action), self.room)
        if self.room == "stairs":
            self.score = max(self.score, 0.5)
        if self.room == "vault" and self.moves <= self.door_closes:
            self.score = 1.0
        info = self._info()
        return f"You are in the {self.room}.", self.score - before, info["won"] or info["lost"], False, info


def play_vault(actions: list[str], seed: int, door_closes: int = 3) -> Trajectory:
    """The episode of ``actions`` in the vault game, recorded as a rollout would (model ``weak``)."""
    from w2s_agents.episode import EpisodeRecorder

    env = VaultGame(door_closes)
    rec, info = EpisodeRecorder.reset(env, "vault/0", Source(model="weak", role="weak", seed=seed))
    terminated = False
    for a in actions:
        obs, reward, terminated, _, info = env.step(a)
        rec.step(a, obs, reward, info)
        if terminated:
            break
    return rec.finish(info, terminated)


@pytest.fixture(scope="session")
def vault_game() -> type:
    """The vault corridor game above, an env whose state key is the room."""
    return VaultGame


@pytest.fixture(scope="session")
def vault_play():
    """``play(actions, seed, door_closes=3)``: an episode of the vault game with its state keys."""
    return play_vault


# ------------------------------------------------------------------ miniature pipeline runs


def _pipeline_runs() -> ModuleType:
    """tests/pipeline_runs.py, loaded once (pytest's importlib mode puts no test folder on ``sys.path``)."""
    name = "w2s_test_pipeline_runs"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("pipeline_runs.py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def pipeline_runs() -> ModuleType:
    """The module tests/pipeline_runs.py: the miniature experiment ``MINI`` and the feature run's settings."""
    return _pipeline_runs()


@pytest.fixture(scope="session")
def feature_run(tmp_path_factory: pytest.TempPathFactory, game_cache_dir: Path) -> Any:
    """The miniature run with every pipeline feature on (``FEATURES`` of tests/pipeline_runs.py), stopped after
    round 2's exploration and resumed, once per session: a ``FeatureRun``. The tests of scarce demos, several
    weak models, the baselines, rounds and the run's artefacts assert on it; a test that reruns it sets
    ``W2S_CACHE`` with the ``w2s_cache`` fixture and changes none of the run's stages."""
    import torch

    threads = torch.get_num_threads()
    # one torch thread: with the other core busy, two make the nano models' small products several times slower
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("W2S_CACHE", str(game_cache_dir.parent / "w2s-cache"))
            root = tmp_path_factory.mktemp("feature-run")
            # the run reports to W&B (pipeline_runs.TRACKING): offline and silent, its folders in the run's tmp
            mp.setenv("WANDB_MODE", "offline")
            mp.setenv("WANDB_SILENT", "true")
            for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
                mp.setenv(var, str(root / "wandb-env" / var.lower()))
            return _pipeline_runs().run_features(root)
    finally:
        torch.set_num_threads(threads)
