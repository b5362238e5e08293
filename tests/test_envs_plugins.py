"""Plugins beyond the Python API: task suites from an installed package (entry-point group
``w2s_agents.suites``) that ``w2s run`` plays, and env classes that define a name reserved by ``TextEnv``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from w2s_agents.cli import main
from w2s_agents.envs import make_env, register_env
from w2s_agents.envs.base import EngineStatus, TextEnv
from w2s_agents.envs.demos import suite_env, suite_task_ids
from w2s_agents.envs.registration import OVERRIDABLE, reserved_names
from w2s_agents.envs.suites import EnvSuite, get_suite
from w2s_agents.errors import ConfigError, W2SError

REPO = Path(__file__).resolve().parents[1]


class _Minimal(TextEnv):
    env_id = "test/Minimal-v0"

    def task_ids(self, split=None):
        return ["t/0"]

    def default_task(self):
        return "t/0"

    def _load_task(self, task_id):
        return "Win."

    def _engine_reset(self):
        return EngineStatus("Start.", 0.0, 1.0, False, False)

    def _engine_step(self, command):
        return EngineStatus("Won.", 1.0, 1.0, True, False)


def test_reserved_names_cover_textenv_state_and_leave_the_hooks_free() -> None:
    reserved = reserved_names()
    state = set(vars(_Minimal()))  # every attribute TextEnv's constructor sets
    assert state <= reserved and {"_status", "_actions", "_done", "_info", "reset", "step"} <= reserved
    assert not reserved & OVERRIDABLE and {"_engine_step", "_engine_state_key", "close"} <= OVERRIDABLE


def test_a_plugin_method_named_status_is_refused_at_registration() -> None:
    class Clashing(_Minimal):
        def _status(self) -> str:  # would be overwritten by TextEnv's constructor
            return "mine"

    with pytest.raises(W2SError) as err:
        register_env("test/Clashing-v0", Clashing)
    msg = str(err.value)
    assert "test/Clashing-v0" in msg and "Clashing defines _status, reserved by TextEnv" in msg
    assert "\n" not in msg
    with pytest.raises(W2SError, match="unknown env id 'test/Clashing-v0'"):
        make_env("test/Clashing-v0")  # nothing was registered


def _write_plugin(root: Path, suites: str) -> None:
    """A distribution on ``root`` (as pip installs one) declaring the Vault env of examples/custom_env.py and
    the entry points ``suites`` of the ``w2s_agents.suites`` group."""
    pkg = root / "acme_vault"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    shutil.copy(REPO / "examples" / "custom_env.py", pkg / "vault.py")
    (pkg / "bad.py").write_text("NOT_A_SUITE = 42\nOTHER = None\n")
    dist = root / "acme_vault-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-vault\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[w2s_agents.envs]\nexample/Vault-v0 = acme_vault.vault:VaultEnv\n\n[w2s_agents.suites]\n" + suites
    )


def test_plugin_suites_are_found_through_entry_points(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    _write_plugin(
        tmp_path,
        "vault = acme_vault.vault:VAULT_SUITE\nnumber = acme_vault.bad:NOT_A_SUITE\n"
        "renamed = acme_vault.vault:VAULT_SUITE\nmissing = acme_vault.bad:NOWHERE\n",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    suite = get_suite("vault")
    assert isinstance(suite, EnvSuite) and suite.env_id == "example/Vault-v0"
    assert suite_task_ids("vault", "train") == [f"vault/{i}" for i in range(6)]  # the env's own split
    assert suite_task_ids("vault", "test") == [f"vault/{i}" for i in range(6, 10)]
    env = suite_env("vault", max_steps=7, admissible_commands=True)  # an option VaultEnv lacks is left out
    try:
        _, info = env.reset(options={"task": "vault/3"})
        assert env.max_steps == 7 and info["expert_plan"]
    finally:
        env.close()
    for name, why in (
        ("number", "acme_vault.bad:NOT_A_SUITE' of acme-vault gives int, not an EnvSuite"),
        ("renamed", "gives a suite named 'vault'"),
        (
            "missing",
            "cannot load entry point missing = 'acme_vault.bad:NOWHERE' of acme-vault: AttributeError",
        ),
        ("absent", "unknown task suite 'absent'; registered: .*vault"),
    ):
        with pytest.raises(ConfigError, match=why):
            get_suite(name)
    assert main(["envs", "suites"]) == 0  # the broken plugin suites are reported, the others listed
    captured = capsys.readouterr()
    assert (
        "vault  example/Vault-v0  env train / env valid / env test  corridors of 3 to 6 rooms" in captured.out
    )
    assert "tw-simple  w2s/TextWorld-v0" in captured.out
    assert len(captured.err.splitlines()) == 3 and "w2s: warning: task suite 'number'" in captured.err


def test_env_suite_checks_its_fields() -> None:
    with pytest.raises(ConfigError, match="unknown split 'dev'"):
        EnvSuite("s", "acme/Lab-v0", tasks={"dev": ["a"]})
    with pytest.raises(ConfigError, match="tasks of split train must be a list of task ids"):
        EnvSuite("s", "acme/Lab-v0", tasks={"train": "a/0"})
    with pytest.raises(ConfigError, match="env_id must be a registered env id"):
        EnvSuite("s", "Lab")
    assert EnvSuite("s", "acme/Lab-v0", tasks={"train": ["a/0", "a/1"]}).task_ids("train") == ["a/0", "a/1"]


RUN = """\
run: {{name: vault, out_dir: {out}}}
weak: {{tiny_preset: nano}}
strong: {{tiny_preset: nano}}
tasks: {{suite: vault, train: 3, valid: 0, test: 2, max_steps: 8}}
explore: {{samplers: [{{temperature: 0.0}}, {{temperature: 1.5}}], seeds: 1, max_steps: 8}}
search: {{iterations: 20, sft_min_value: 0.0}}
train:
  weak_sft: {{lr: 0.003, epochs: 1, batch_size: 4}}
  strong_sft: {{lr: 0.003, epochs: 1, batch_size: 4}}
  mcts_sft: {{lr: 0.003, epochs: 1, batch_size: 4}}
  variants: [w2s-mcts]
  ceiling: false
eval: {{misfit_states: 4}}
"""


@pytest.mark.slow
def test_w2s_run_on_an_installed_plugin_suite(tmp_path: Path) -> None:
    """A package (pyproject with both entry points) installed into a temporary folder by pip; ``w2s run`` with
    ``tasks.suite: vault`` plays its env through every stage."""
    src = tmp_path / "src"
    (src / "acme_vault").mkdir(parents=True)
    (src / "acme_vault" / "__init__.py").write_text("")
    shutil.copy(REPO / "examples" / "custom_env.py", src / "acme_vault" / "vault.py")
    (src / "pyproject.toml").write_text(
        textwrap.dedent(
            """\
            [build-system]
            requires = ["setuptools>=68"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "acme-vault"
            version = "0.1"

            [project.entry-points."w2s_agents.envs"]
            "example/Vault-v0" = "acme_vault.vault:VaultEnv"

            [project.entry-points."w2s_agents.suites"]
            vault = "acme_vault.vault:VAULT_SUITE"

            [tool.setuptools]
            packages = ["acme_vault"]
            """
        )
    )
    site = tmp_path / "site"
    env = {**os.environ, "W2S_PROGRESS": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    pip = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
    ]
    proc = subprocess.run(
        [*pip, "--target", str(site), str(src)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (site / "acme_vault" / "vault.py").is_file() and list(site.glob("acme_vault-0.1.dist-info"))
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    config = tmp_path / "vault.yaml"
    config.write_text(RUN.format(out=tmp_path / "runs"))
    proc = subprocess.run(
        [sys.executable, "-m", "w2s_agents.cli", "run", str(config)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seed_dir = tmp_path / "runs" / "vault" / "seed-0"
    tasks = json.loads((seed_dir / "tasks" / "tasks.json").read_text())
    tasks |= json.loads((seed_dir / "held-out" / "tasks.json").read_text())
    assert tasks == {"train": ["vault/0", "vault/1", "vault/2"], "valid": [], "test": ["vault/6", "vault/7"]}
    demos = [json.loads(line) for line in (seed_dir / "demos" / "demos.jsonl").read_text().splitlines()]
    assert len(demos) == 3 and all(d["success"] and d["env_id"] == "example/Vault-v0" for d in demos)
    explored = (seed_dir / "explore").rglob("*.jsonl")
    episodes = [json.loads(line) for f in explored for line in f.read_text().splitlines()]
    assert len(episodes) == 3 * 2 and {e["env_id"] for e in episodes} == {"example/Vault-v0"}
    assert (tmp_path / "runs" / "vault" / "report.md").is_file() and "W2S-MCTS" in proc.stdout
