"""Packaging and layering: one import namespace, a clean wheel, the design's import rules, a CPU-only torch."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
MAPPED = {"w2s_agents": "w2s_agents", "w2s_agents.envs": "envs", "w2s_agents.search": "search",
          "w2s_agents.trainers": "trainers"}  # fmt: skip


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


@pytest.mark.slow
def test_installed_namespace_and_no_bare_top_level_names(tmp_path: Path) -> None:
    code = (
        "import importlib.util, w2s_agents.envs, w2s_agents.search, w2s_agents.trainers\n"
        "print(w2s_agents.envs.__file__)\n"
        "print([n for n in ('envs', 'search', 'trainers') if importlib.util.find_spec(n) is not None])\n"
    )
    # run outside the checkout, as a user's script would: the repository root is not on sys.path there
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    envs_file, bare = out.stdout.splitlines()
    assert Path(envs_file).parent.name == "envs"
    assert bare == "[]"


def test_every_package_folder_is_listed_in_pyproject() -> None:
    cfg = _pyproject()["tool"]["setuptools"]
    assert cfg["package-dir"] == MAPPED
    listed = set(cfg["packages"])
    found = set()
    for pkg, folder in MAPPED.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            found.add(".".join([pkg, *rel.parts]))
    assert found == listed, f"packages missing from pyproject: {sorted(found - listed)}"


@pytest.mark.slow
def test_wheel_holds_only_the_w2s_agents_namespace(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for folder in set(MAPPED.values()):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    code = "import sys; from setuptools import build_meta as b; print(b.build_wheel(sys.argv[1]))"
    out = subprocess.run([sys.executable, "-c", code, str(dist)], cwd=src, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    wheel = dist / out.stdout.strip().splitlines()[-1]
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"w2s_agents", "w2s_agents-0.1.0.dist-info"}
    for sub in ("envs", "search", "trainers"):
        assert f"w2s_agents/{sub}/__init__.py" in names
    assert "w2s_agents/py.typed" in names
    for asset in ("tree.js", "index.js", "viewer.css"):  # the viewer pages inline these package data files
        assert f"w2s_agents/viz/assets/{asset}" in names
    entry_points = zipfile.ZipFile(wheel).read("w2s_agents-0.1.0.dist-info/entry_points.txt").decode()
    assert "w2s = w2s_agents.cli:main" in entry_points


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.slow
def test_nothing_imports_the_installed_folders_by_bare_names() -> None:
    """envs/, search/ and trainers/ install as w2s_agents.<name>; a bare ``import search`` works only from a
    checkout. (The layering contract itself is tests/test_layering.py.)"""
    for folder in ("w2s_agents", "envs", "search", "trainers", "tests", "bench", "examples"):
        for path in (REPO / folder).rglob("*.py"):
            bare = {m for m in _imports(path) if m.split(".")[0] in ("envs", "search", "trainers")}
            assert not bare, f"{path.relative_to(REPO)} imports {sorted(bare)}; use w2s_agents.<name>"


def test_light_imports_do_not_load_torch() -> None:
    code = "import sys, w2s_agents, w2s_agents.cli, w2s_agents.pipeline.experiment; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_torch_is_a_cpu_build_without_cuda_packages_on_a_cpu_machine() -> None:
    import torch

    if torch.cuda.is_available() or os.environ.get("W2S_TEST_CUDA_VISIBLE_DEVICES"):
        pytest.skip("a GPU machine installs the CUDA build")
    nvidia = sorted(d.metadata["Name"] for d in importlib.metadata.distributions()
                    if (d.metadata["Name"] or "").lower().startswith("nvidia-"))  # fmt: skip
    assert nvidia == [], f"CUDA packages installed on a CPU-only machine: {nvidia}"
    assert torch.version.cuda is None, f"torch {torch.__version__} is a CUDA build"
