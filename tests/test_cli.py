"""The `w2s` command line: every listed command works, errors are one line with exit status 2."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from w2s_agents.cli import build_parser, main
from w2s_agents.store import TrajectoryStore, encode_trajectory, scan_store
from w2s_agents.types import Source, Step, Trajectory


def _traj(seed: int, won: bool) -> Trajectory:
    steps = (Step("open door", "The door opens."), Step("go north", "You win." if won else "You fall."))
    return Trajectory("tw/0", "w2s/Toy-v0", Source("weak", "weak", "s", seed=seed), "Escape.", "A door.", steps,
                      1.0 if won else 0.0, won, "won" if won else "lost")  # fmt: skip


def _subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.append((*prefix, name))
                out.extend(_subcommands(sub, (*prefix, name)))
    return out


def test_console_script_is_installed_and_lists_commands() -> None:
    exe = shutil.which("w2s", path=str(Path(sys.executable).parent))
    assert exe, "the w2s console script is not installed next to the interpreter"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in (
        "config",
        "model",
        "store",
        "envs",
        "tree",
        "search",
        "viz",
        "train",
        "rollout",
        "run",
        "report",
    ):
        assert cmd in out
    assert "w2s-agents 0.1.0" in subprocess.run([exe, "--version"], capture_output=True, text=True).stdout


# the least arguments each command that needs some parses with
REQUIRED_ARGS = {
    ("model", "tiny"): ["x"],
    ("model", "info"): ["x"],
    ("store", "check"): ["x"],
    ("tree", "build"): ["x", "-o", "d"],
    ("tree", "summary"): ["x"],
    ("search",): ["x", "-o", "d"],
    ("viz",): ["x"],
    ("report",): ["x"],
    ("envs", "tasks"): ["x"],
    ("envs", "play"): ["x"],
    ("envs", "demos"): ["x", "-o", "f"],
    ("train", "sft"): ["x"],
    ("train", "dpo"): ["x"],
    ("train", "mcts-sft"): ["x"],
    ("train", "pg"): ["x"],
    ("rollout",): ["x"],
}


def test_every_listed_command_has_a_handler_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    commands = _subcommands(build_parser())
    leaves = [c for c in commands if not any(o[: len(c)] == c and len(o) > len(c) for o in commands)]
    assert {("config", "show"), ("model", "tiny"), ("store", "check")} <= set(leaves)
    for cmd in leaves:
        with pytest.raises(SystemExit) as exit_:
            main([*cmd, "--help"])
        assert exit_.value.code == 0
        ns = build_parser().parse_args([*cmd, *REQUIRED_ARGS.get(cmd, [])])
        assert callable(ns.func), cmd
    capsys.readouterr()


def test_config_show_and_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "run.seed=7"]) == 0
    out = capsys.readouterr().out
    assert "seed: 7" in out and "embedded default config" in out
    cfg = tmp_path / "c.yaml"
    cfg.write_text("run:\n  name: mine\n")
    assert main(["config", "show", str(cfg)]) == 0
    assert "name: mine" in capsys.readouterr().out
    assert main(["config", "keys", "--grep", "strong."]) == 0
    out = capsys.readouterr().out
    assert "strong.tiny_preset" in out and "run.seed" not in out


def test_config_errors_are_one_line_with_status_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("run:\n  seed: 1\n  nmae: x\n")
    assert main(["config", "show", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"w2s: error: {cfg}:3: unknown config key 'run.nmae' (did you mean 'name'?)")
    assert main(["config", "show", "weak.vocab_size=big"]) == 2
    assert "expected int, got 'big'" in capsys.readouterr().err
    assert main(["config", "show", "a.yaml", "b.yaml"]) == 2
    assert "at most one config file" in capsys.readouterr().err


def test_store_check_reports_and_repairs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t.jsonl"
    with TrajectoryStore(path) as store:
        store.append(_traj(0, True))
        store.append(_traj(1, False))
    assert main(["store", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "2 trajectories, 1 tasks, success 0.500, mean return 0.500, mean steps 2.0" in out
    with path.open("ab") as fh:
        fh.write(encode_trajectory(_traj(2, True))[:30])
    assert main(["store", "check", str(path)]) == 1
    assert "torn last record" in capsys.readouterr().out
    assert main(["store", "check", "--repair", str(path)]) == 0
    assert scan_store(path).torn_bytes == 0 and scan_store(path).records == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(encode_trajectory(_traj(0, True)).decode() + "{}\n")
    assert main(["store", "check", str(bad)]) == 2
    assert (
        f"w2s: error: {bad}:2: invalid trajectory record: missing field 'schema'" in capsys.readouterr().err
    )


def test_model_tiny_and_info(
    tmp_path: Path, game_texts: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(game_texts))
    trajs = tmp_path / "t.jsonl"
    with TrajectoryStore(trajs) as store:
        store.append(_traj(0, True))
    out_dir = tmp_path / "nano"
    assert main(["model", "tiny", str(out_dir), "--preset", "nano", "--text", str(texts),
                 "--trajectories", str(trajs), "--vocab-size", "512"]) == 0  # fmt: skip
    assert "tiny nano model" in capsys.readouterr().out
    meta = json.loads((out_dir / "w2s_model.json").read_text())
    assert meta["preset"] == "nano" and meta["corpus_texts"] == len(game_texts) + 2 + 2 * 2
    assert main(["model", "tiny", str(out_dir), "--preset", "nano", "--text", str(texts)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["model", "info", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "float32" in out and "template present" in out


def test_model_info_on_a_hub_name_fails_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "info", "Qwen/Qwen2.5-0.5B"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("w2s: error: model path 'Qwen/Qwen2.5-0.5B' is not a local directory")
    assert err.count("\n") == 1


def test_module_entry_point() -> None:
    out = subprocess.run([sys.executable, "-m", "w2s_agents", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "w2s-agents" in out.stdout


def test_overrides_are_accepted_after_options(capsys: pytest.CaptureFixture[str]) -> None:
    # argparse leaves KEY=VALUE after an option over; the command line adds them to the overrides
    assert main(["run", "--until", "trees", "--list-stages", "train.ceiling=false", "run.seed=3"]) == 0
    stages = capsys.readouterr().out.split()
    assert "trees" in stages and "ceiling" not in stages
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--list-stages", "--until", "trees", "--bogus"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        "w2s: error: w2s run: unrecognized arguments: --bogus (see `w2s run --help`)\n"
    )


def test_output_paths_are_checked_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from w2s_agents.cli.args import check_output_dir, check_output_file
    from w2s_agents.errors import W2SError

    afile = tmp_path / "afile"
    afile.write_text("x")
    assert check_output_dir(tmp_path / "new" / "deeper", "-o/--out") == tmp_path / "new" / "deeper"
    assert check_output_file(tmp_path / "new" / "t.jsonl", "rollout.output") == tmp_path / "new" / "t.jsonl"
    with pytest.raises(W2SError, match=r"^-o/--out .*afile: is an existing file; give a folder$"):
        check_output_dir(afile, "-o/--out")
    with pytest.raises(W2SError, match=r"^rollout.output .*afile/t.jsonl: .*afile is a file, not a folder$"):
        check_output_file(afile / "t.jsonl", "rollout.output")
    with pytest.raises(W2SError, match=r"^rollout.output .*: is a folder; give a file path$"):
        check_output_file(tmp_path, "rollout.output")
    # a folder without write permission (simulated: root may write anywhere)
    monkeypatch.setattr("os.access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(W2SError, match=rf"^rollout.output .*new/t.jsonl: folder {tmp_path} is not writable$"):
        check_output_file(tmp_path / "new" / "t.jsonl", "rollout.output")
    monkeypatch.setattr("os.access", lambda path, mode: Path(path) != afile)
    with pytest.raises(W2SError, match=r"afile: the file is not writable$"):
        check_output_file(afile, "rollout.output")
    assert not (tmp_path / "new").exists()  # checking creates nothing
