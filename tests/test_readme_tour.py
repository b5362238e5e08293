"""The README's tour, run as written: its commands one by one in an empty folder, each exiting 0.

The commands are the fenced block after ``<!-- tour:commands -->`` in README.md. The set-up block before it
(``<!-- tour:setup -->``) activates the environment, sets ``REPO`` and changes into a scratch folder; the test
does the same by hand (the ``bin`` folder of the venv running the tests first on PATH, ``REPO`` the
repository, the working folder a fresh temporary one), with HOME, the game cache and TMPDIR inside the
temporary folder too.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from w2s_agents.search import read_pairs, read_sft_rows
from w2s_agents.store import read_trajectories
from w2s_agents.tree import TrajectoryTree

SETUP_MARK = "<!-- tour:setup -->"
COMMANDS_MARK = "<!-- tour:commands -->"


def tour_block(readme: str, mark: str) -> list[str]:
    """The lines of the fenced code block right after ``mark`` in ``readme`` (blank and comment lines dropped).

    Raises:
        AssertionError: the mark is missing, or no fenced block follows it.
    """
    at = readme.find(mark)
    assert at >= 0, f"README.md has no {mark}"
    m = re.compile(r"\s*```[a-z]*\n(.*?)\n```", re.S).match(readme, at + len(mark))
    assert m is not None, f"no fenced code block right after {mark} in README.md"
    return [line for line in m.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_the_tour_blocks_are_found(repo_root: Path) -> None:
    readme = (repo_root / "README.md").read_text(encoding="utf-8")
    setup = tour_block(readme, SETUP_MARK)
    commands = tour_block(readme, COMMANDS_MARK)
    # what the long test does in place of the set-up block
    assert any(line.startswith("source .venv/bin/activate") for line in setup)
    assert any(line.startswith("REPO=$PWD") for line in setup)
    assert any(re.search(r"\bcd \S+", line) for line in setup)
    assert all(line.startswith("w2s ") for line in commands), commands
    dpo = [c for c in commands if c.startswith("w2s train dpo")]
    assert dpo and commands.index(dpo[0]) > commands.index(
        next(c for c in commands if c.startswith("w2s search trees"))
    )


@pytest.mark.slow
def test_the_readme_tour_runs_as_written(repo_root: Path, tmp_path: Path) -> None:
    commands = tour_block((repo_root / "README.md").read_text(encoding="utf-8"), COMMANDS_MARK)
    bin_dir = Path(sys.executable).parent  # the venv running the tests, whose bin holds `w2s`
    assert (bin_dir / "w2s").is_file(), f"no w2s command in {bin_dir}"
    work, home, tmp = tmp_path / "tour", tmp_path / "home", tmp_path / "tmp"
    for d in (work, home, tmp):
        d.mkdir()
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "REPO": str(repo_root),
        "HOME": str(home),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "HF_HOME": str(home / "hf"),
        "W2S_CACHE": str(tmp_path / "w2s-cache"),
        "TMPDIR": str(tmp),
        "W2S_PROGRESS": "0",
        "HF_HUB_OFFLINE": "1",
    }
    for command in commands:
        proc = subprocess.run(
            ["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"

    demos = list(read_trajectories(work / "demos.jsonl"))
    assert len(demos) == 3 and all(t.success for t in demos)
    explored = list(read_trajectories(work / "runs" / "rollout-tiny" / "trajectories.jsonl"))
    assert len(explored) == 4 * 3 * 2  # games x samplers x seeds of configs/rollout-tiny.yaml
    # the weak SFT agent's episodes differ in return, so its trees have pairs
    assert len({round(t.return_, 6) for t in explored}) > 1
    trees = sorted((work / "trees").glob("*.json"))
    assert len(trees) == 4
    pairs = read_pairs(work / "data" / "pairs.jsonl")
    assert pairs and all(p.chosen != p.rejected for p in pairs)
    assert read_sft_rows(work / "data" / "sft.jsonl", success_only=False)[0]
    assert (work / "viz" / "index.html").is_file() and list((work / "trees").glob("tw-simple_train_0-*.svg"))
    for name in ("weak-sft", "strong-sft", "mcts-sft", "tree-dpo"):
        assert (work / "runs" / name / "model" / "config.json").is_file(), name
    dpo = json.loads((work / "runs" / "tree-dpo" / "result.json").read_text())
    assert dpo["method"] == "dpo" and dpo["rows"] == len(pairs) and dpo["steps"] > 0
    # online expansion grew every tree (into grown/, the inputs left as they were) and MCTS searched them
    for path in trees:
        before, after = TrajectoryTree.load(path), TrajectoryTree.load(work / "grown" / "trees" / path.name)
        assert len(after) > len(before)
        assert "weak-sft-search" in after.sources(0)
    assert read_sft_rows(work / "grown" / "data" / "sft.jsonl", success_only=False)[0]
    # nothing of the tour landed in the repository or outside the temporary folder
    assert not (repo_root / "demos.jsonl").exists() and not (repo_root / "grown").exists()
