"""The fault battery: malformed inputs walked through the ``w2s`` command line, and what each one got.

Each :class:`FaultCase` writes its inputs into an empty folder and names the ``w2s`` arguments that feed them
in; :func:`run_case` runs the command line in that folder, in this process (``w2s_agents.cli.main``, with
stdout and stderr captured as the user sees them), and sorts the outcome:

* ``clear``: a non-zero exit status, stderr exactly one line starting ``w2s: error:`` that holds the case's
  expected fragment (what is wrong and where), no traceback, and the folder exactly as it was (nothing
  written, nothing half-written, no input changed);
* ``traceback``: an exception escaped the command line, or stderr shows one;
* ``silent``: exit status 0, the input was accepted;
* ``unclear``: anything else (several lines, a message without the fragment, files written or changed).

Used by ``tests/test_fault_battery.py`` (every case must be clear) and ``bench/faults.py`` (prints the counts).
Inputs are tiny, and each case fails before any model is built, so the battery runs in seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CASES", "FaultCase", "Outcome", "run_battery", "run_case"]

OUTCOMES = ("clear", "traceback", "silent", "unclear")
"""The kinds of outcome, in the order the counts are printed."""


@dataclass(frozen=True)
class FaultCase:
    """One malformed input: ``build(folder)`` writes the inputs and returns the ``w2s`` arguments."""

    name: str
    group: str  # what kind of input is malformed: config, override, store, tree, rows, model, args, output
    build: Callable[[Path], list[str]]
    expect: str  # a fragment the error line must hold (what is wrong, and where)


@dataclass(frozen=True)
class Outcome:
    """What one case got."""

    case: str
    kind: str  # one of OUTCOMES
    status: int | None  # exit status (None when an exception escaped)
    stderr: str
    changed: tuple[str, ...]  # files created, changed or removed in the case's folder

    def describe(self) -> str:
        """One line for a failure message."""
        return f"{self.case}: {self.kind}, exit {self.status}, changed {list(self.changed)}, stderr {self.stderr!r}"


# ------------------------------------------------------------------------------------------------- inputs


def _write(folder: Path, name: str, text: str | bytes) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _trajectories() -> list:
    from w2s_agents.types import Source, Step, Trajectory

    def traj(seed: int, actions: list[str], ret: float, end: str) -> Trajectory:
        return Trajectory(
            task_id="house/0",
            env_id="w2s/Fake-v0",
            source=Source(model="weak", role="weak", seed=seed),
            instruction="Leave the house.",
            initial_observation="start",
            steps=tuple(Step(action=a, observation=f"after {a}") for a in actions),
            return_=ret,
            success=end == "won",
            end=end,
        )

    return [
        traj(1, ["take key", "open door", "go north"], 1.0, "won"),
        traj(2, ["take key", "go south"], 0.0, "lost"),
        traj(3, ["look"], 0.0, "truncated"),
    ]


def _store_lines() -> list[str]:
    from w2s_agents.store import encode_trajectory

    return [encode_trajectory(t).decode("utf-8") for t in _trajectories()]


def _store(folder: Path, name: str = "s.jsonl") -> Path:
    return _write(folder, name, "".join(_store_lines()))


def _trees(folder: Path) -> Path:
    from w2s_agents.tree import build_trees, tree_filename

    out = folder / "trees"
    for task_id, tree in build_trees(_trajectories()).items():
        tree.save(out / tree_filename(task_id))
    return out


def _tree_file(folder: Path) -> Path:
    return next(_trees(folder).glob("*.json"))


def _edit_tree(folder: Path, edit: Callable[[dict], None]) -> Path:
    path = _tree_file(folder)
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _pair(i: int, same: bool = False) -> dict:
    from w2s_agents.messages import agent_message, episode_messages

    chosen = [agent_message("go north", f"the exit {i}")]
    return {
        "prompt": episode_messages("Leave the house.", f"start {i}", [("", "open door", "door open")]),
        "chosen": chosen,
        "rejected": chosen if same else [agent_message("go south")],
        "task_id": f"house/{i}",
    }


def _rows_file(folder: Path, rows: list[dict | str], name: str = "pairs.jsonl") -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    return _write(folder, name, "".join(line + "\n" for line in lines))


def _train_config(
    folder: Path, data: str, extra: str = "", model: str = "model", out_dir: str = "out"
) -> Path:
    (folder / model).mkdir(exist_ok=True)
    return _write(
        folder,
        "train.yaml",
        f"model: {model}\nweak_model: {model}\ndata: [{data}]\nout_dir: {out_dir}\n{extra}",
    )


def _model_without_tokenizer(folder: Path) -> Path:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "num_hidden_layers": 1,
        "vocab_size": 64,
    }
    _write(folder, "model/config.json", json.dumps(config))
    return folder / "model"


def _sft_row() -> dict:
    from w2s_agents.messages import episode_messages

    return {"messages": episode_messages("Leave the house.", "start", [("", "go north", None)])}


def _run_config(folder: Path, text: str = "") -> Path:
    return _write(folder, "exp.yaml", f"run:\n  name: r\n  out_dir: runs\n{text}")


def _experiment(text: str) -> Callable[[Path], list[str]]:
    return lambda d: ["config", "show", str(_write(d, "c.yaml", text))]


# -------------------------------------------------------------------------------------------------- cases

CASES: tuple[FaultCase, ...] = (
    # --- experiment config files (w2s config show validates as w2s run does)
    FaultCase("config: unknown key", "config", _experiment("run:\n  sed: 3\n"), "c.yaml:2: unknown config key 'run.sed'"),
    FaultCase("config: wrong type", "config", _experiment("run:\n  seed: big\n"), "c.yaml:2: config key 'run.seed': expected int"),
    FaultCase("config: bad YAML", "config", _experiment("run:\n  seed: 1\n\tname: x\n"), "c.yaml:3: invalid YAML"),
    FaultCase("config: empty file", "config", _experiment(""), "c.yaml: the config file is empty"),
    FaultCase("config: only comments", "config", _experiment("# run:\n#   seed: 1\n"), "c.yaml: the config file is empty"),
    FaultCase("config: missing file", "config", lambda d: ["config", "show", "nope.yaml"], "config file not found: nope.yaml"),
    FaultCase("config: a list, not a mapping", "config", _experiment("- run\n- seed\n"), "c.yaml:1: a config file must be a mapping"),
    FaultCase("config: duplicate key", "config", _experiment("run:\n  seed: 1\n  seed: 2\n"), "c.yaml:3: duplicate config key 'seed'"),
    FaultCase("config: not UTF-8", "config", lambda d: ["config", "show", str(_write(d, "c.yaml", b"run:\n  name: \xff\n"))], "cannot read config file c.yaml"),
    FaultCase("config: value out of range", "config", _experiment("tasks:\n  train: 0\n"), "'train' must be >= 1, got 0"),
    FaultCase("config: section is a value", "config", _experiment("run: 3\n"), "c.yaml:1: config key 'run': expected mapping"),
    FaultCase("config: run name with a slash", "config", _experiment("run:\n  name: a/b\n"), "'name' must be letters, digits"),
    # --- KEY=VALUE overrides
    FaultCase("override: unknown key", "override", lambda d: ["config", "show", "run.sed=3"], "override 'run.sed=3': unknown config key 'run.sed'"),
    FaultCase("override: wrong type", "override", lambda d: ["config", "show", "run.seed=abc"], "override 'run.seed=abc': config key 'run.seed': expected int"),
    FaultCase("override: no key", "override", lambda d: ["config", "show", "=3"], "override '=3': expected KEY=VALUE"),
    FaultCase("override: empty key part", "override", lambda d: ["config", "show", "run..seed=3"], "override 'run..seed=3': expected KEY=VALUE"),
    FaultCase("override: two config files", "override", lambda d: ["config", "show", "a.yaml", "b.yaml"], "expected at most one config file"),
    FaultCase("override: train.method against the command", "override", lambda d: ["train", "dpo", str(_train_config(d, "pairs.jsonl")), "train.method=sft"], "override 'train.method=sft' disagrees with the command"),
    FaultCase("override: train.method in the file", "override", lambda d: ["train", "sft", str(_train_config(d, "rows.jsonl", "train:\n  method: dpo\n"))], "train.method is 'dpo' but the command trains 'sft'"),
    # --- w2s run: stages and the run folder
    FaultCase("run: --from no stage", "args", lambda d: ["run", str(_run_config(d)), "--from", "nostage"], "--from 'nostage': no such stage"),
    FaultCase("run: --until no stage", "args", lambda d: ["run", str(_run_config(d)), "--until", "nostage"], "--until 'nostage': no such stage"),
    FaultCase("run: --until before --from", "args", lambda d: ["run", str(_run_config(d)), "--from", "eval", "--until", "trees"], "--until 'trees' comes before --from 'eval'"),
    FaultCase("run: run folder below a file", "output", lambda d: ["run", str(_run_config(d)), f"run.out_dir={_write(d, 'afile', 'x')}"], "afile is a file, not a folder"),
    # --- trajectory stores
    FaultCase("store: bad JSON line", "store", lambda d: ["store", "check", str(_write(d, "s.jsonl", _store_lines()[0] + "{oops\n"))], "s.jsonl:2: invalid JSON"),
    FaultCase("store: missing fields", "store", lambda d: ["store", "check", str(_write(d, "s.jsonl", '{"schema": "w2s.trajectory/1"}\n'))], "s.jsonl:1: invalid trajectory record"),
    FaultCase("store: no schema", "store", lambda d: ["store", "check", str(_write(d, "s.jsonl", '{"task_id": "a"}\n'))], "s.jsonl:1: invalid trajectory record: missing field 'schema'"),
    FaultCase("store: lone surrogate", "store", lambda d: ["store", "check", str(_write(d, "s.jsonl", _store_lines()[1].replace('"go south"', '"go \\ud800south"')))], "s.jsonl:1: invalid trajectory record: field 'steps[1].action' holds a lone surrogate"),
    FaultCase("store: not UTF-8", "store", lambda d: ["store", "check", str(_write(d, "s.jsonl", b"\xff\xfe\n"))], "s.jsonl:1: not UTF-8"),
    FaultCase("store: missing file", "store", lambda d: ["store", "check", "nope.jsonl"], "trajectory file not found: nope.jsonl"),
    FaultCase("store: a JSON list", "store", lambda d: ["store", "check", str(_write(d, "s.jsonl", "[1, 2]\n"))], "s.jsonl:1: invalid trajectory record"),
    FaultCase("tree build: lone surrogate", "store", lambda d: ["tree", "build", str(_write(d, "s.jsonl", "".join(_store_lines()[:1]) + _store_lines()[1].replace('"go south"', '"go \\ud800south"'))), "-o", "trees"], "s.jsonl:2: invalid trajectory record: field 'steps[1].action' holds a lone surrogate"),
    FaultCase("tree build: bad line in the middle", "store", lambda d: ["tree", "build", str(_write(d, "s.jsonl", _store_lines()[0] + "not json\n" + _store_lines()[1])), "-o", "trees"], "s.jsonl:2: invalid JSON"),
    FaultCase("tree build: missing store", "store", lambda d: ["tree", "build", "nope.jsonl", "-o", "trees"], "trajectory file not found: nope.jsonl"),
    FaultCase("tree build: unknown task", "store", lambda d: ["tree", "build", str(_store(d)), "-o", "trees", "--task", "nope"], "no trajectories to build trees from for tasks ['nope']"),
    FaultCase("tree build: -o is a file", "output", lambda d: ["tree", "build", str(_store(d)), "-o", str(_write(d, "afile", "x"))], "-o/--out afile: is an existing file"),
    # --- tree files
    FaultCase("tree: invalid JSON", "tree", lambda d: ["tree", "summary", str(_write(d, "t.json", '{"schema": "w2s.tree/2",\n "nodes": ['))], "t.json:2: invalid JSON"),
    FaultCase("tree: unknown schema", "tree", lambda d: ["tree", "summary", str(_edit_tree(d, lambda t: t.update(schema="w2s.tree/99")))], "unsupported tree schema 'w2s.tree/99'"),
    FaultCase("tree: nodes not a list", "tree", lambda d: ["tree", "summary", str(_edit_tree(d, lambda t: t.update(nodes={})))], "'nodes' and 'edges' must be lists"),
    FaultCase("tree: node without parent", "tree", lambda d: ["tree", "summary", str(_edit_tree(d, lambda t: t["edges"].pop()))], "no parent"),
    FaultCase("tree: attribute of the wrong type", "tree", lambda d: ["tree", "summary", str(_edit_tree(d, lambda t: t["nodes"][1].update(visits="3")))], "node 1: attribute 'visits' must be int"),
    FaultCase("tree: empty folder", "tree", lambda d: ["tree", "summary", str(_write(d, "empty/.keep", "").parent)], "no tree files (*.json) in folder empty"),
    FaultCase("search: -o is a file", "output", lambda d: ["search", str(_trees(d)), "-o", str(_write(d, "afile", "x"))], "-o/--out afile: is an existing file"),
    FaultCase("search: one bad tree among good ones", "tree", lambda d: ["search", str(_trees(d)), str(_write(d, "z.json", "{}")), "-o", "out"], "z.json: missing field 'schema'"),
    FaultCase("search: unknown setting", "override", lambda d: ["search", str(_trees(d)), "-o", "out", "--set", "iteratons=5"], "unknown config key 'iteratons'"),
    FaultCase("search: bad --trajectories file", "store", lambda d: ["search", str(_trees(d)), "-o", "out", "--trajectories", str(_write(d, "e.jsonl", "{oops\n"))], "e.jsonl:1: invalid JSON"),
    FaultCase("search: empty config file", "config", lambda d: ["search", str(_trees(d)), "-o", "out", "--config", str(_write(d, "s.yaml", "\n"))], "s.yaml: the config file is empty"),
    FaultCase("search --online: no --model", "args", lambda d: ["search", "--online", str(_trees(d)), "-o", "out", "--suite", "tw-simple"], "--model"),
    FaultCase("search --online: --model not a folder", "model", lambda d: ["search", "--online", str(_trees(d)), "-o", "out", "--suite", "tw-simple", "--model", "nowhere"], "nowhere"),
    FaultCase("search: --model without --online", "args", lambda d: ["search", str(_trees(d)), "-o", "out", "--model", str(_write(d, "m/.keep", "").parent)], "--online"),
    FaultCase("search --online: an offline-only option", "args", lambda d: ["search", "--online", str(_trees(d)), "-o", "out", "--suite", "tw-simple", "--model", str(_write(d, "m/.keep", "").parent), "--gamma", "2"], "--gamma"),
    # --- rows and pairs files (w2s train checks the data before it loads a model)
    FaultCase("pairs: chosen equals rejected in every pair", "rows", lambda d: ["train", "dpo", str(_train_config(d, str(_rows_file(d, [_pair(0, True), _pair(1, True)]))))], "pairs.jsonl:1: 'chosen' equals 'rejected' in every pair"),
    FaultCase("pairs: bad JSON line", "rows", lambda d: ["train", "dpo", str(_train_config(d, str(_rows_file(d, [_pair(0), "{oops"]))))], "pairs.jsonl:2: invalid JSON"),
    FaultCase("pairs: missing rejected", "rows", lambda d: ["train", "dpo", str(_train_config(d, str(_rows_file(d, [{k: v for k, v in _pair(0).items() if k != "rejected"}]))))], "pairs.jsonl:1: a preference pair needs 'prompt', 'chosen' and 'rejected'"),
    FaultCase("pairs: prompt ends on the agent", "rows", lambda d: ["train", "dpo", str(_train_config(d, str(_rows_file(d, [dict(_pair(0), prompt=_pair(0)["chosen"])]))))], "pairs.jsonl:1: 'prompt' must end with a user turn"),
    FaultCase("pairs: missing file", "rows", lambda d: ["train", "dpo", str(_train_config(d, "nope.jsonl"))], "nope.jsonl"),
    FaultCase("rows: SFT row without messages", "rows", lambda d: ["train", "sft", str(_train_config(d, str(_rows_file(d, [{"prompt": "x"}], "rows.jsonl"))))], "rows.jsonl:1: an SFT row needs 'messages'"),
    FaultCase("rows: message with a bad role", "rows", lambda d: ["train", "sft", str(_train_config(d, str(_rows_file(d, [{"messages": [{"role": "robot", "content": "x"}]}], "rows.jsonl"))))], "rows.jsonl:1: 'messages[0]' must be"),
    FaultCase("train: empty config file", "config", lambda d: ["train", "sft", str(_write(d, "t.yaml", "# todo\n"))], "t.yaml: the config file is empty"),
    FaultCase("train: no data files", "config", lambda d: ["train", "sft", str(_write(d, "t.yaml", "model: m\ndata: []\n"))], "'data' must list at least one data file"),
    FaultCase("train: out_dir is a file", "output", lambda d: ["train", "sft", str(_train_config(d, str(_rows_file(d, [_sft_row()], "rows.jsonl")), out_dir=str(_write(d, "afile", "x"))))], "out_dir"),
    # --- model folders
    FaultCase("model: hub name", "model", lambda d: ["model", "info", "meta-llama/Llama-2-7b-hf"], "is not a local directory"),
    FaultCase("model: folder without config.json", "model", lambda d: ["model", "info", str(_write(d, "m/readme.txt", "x").parent)], "no config.json here"),
    FaultCase("model: config.json not JSON", "model", lambda d: ["model", "info", str(_write(d, "m/config.json", "{x").parent)], "m/config.json: not a valid model config"),
    FaultCase("model: config.json failing the architecture check", "model", lambda d: ["model", "info", str(_write(d, "m/config.json", '{"model_type": "llama", "hidden_size": 32, "num_attention_heads": 7}').parent)], "m/config.json: not a valid model config: Class validation error"),
    FaultCase("model: unknown model_type", "model", lambda d: ["model", "info", str(_write(d, "m/config.json", '{"model_type": "no-such-arch"}').parent)], "m/config.json: not a valid model config"),
    FaultCase("model: folder without a tokenizer", "model", lambda d: ["model", "info", str(_model_without_tokenizer(d))], "no tokenizer here (looked for tokenizer.json, tokenizer_config.json"),
    FaultCase("model: training a folder without a tokenizer", "model", lambda d: ["train", "sft", str(_train_config(d, str(_rows_file(d, [_sft_row()], "rows.jsonl")), model=str(_model_without_tokenizer(d))))], "no tokenizer here"),
    FaultCase("model tiny: no text", "model", lambda d: ["model", "tiny", "m", "--text", str(_write(d, "t.txt", "\n"))], "no training text"),
    FaultCase("model tiny: folder exists", "model", lambda d: ["model", "tiny", str(_write(d, "m/x", "x").parent), "--text", str(_write(d, "t.txt", "take key\n"))], "model folder m already exists; pass --overwrite to replace it"),
    # --- rollout
    FaultCase("rollout: output below a file", "output", lambda d: ["rollout", str(_write(d, "r.yaml", "run:\n  out_dir: runs\n")), f"rollout.output={_write(d, 'afile', 'x')}/t.jsonl"], "rollout.output"),
    FaultCase("rollout: output is a folder", "output", lambda d: ["rollout", str(_write(d, "r.yaml", "run:\n  out_dir: runs\n")), f"rollout.output={d}"], "is a folder; give a file path"),
    FaultCase("rollout: overrides without a config", "args", lambda d: ["rollout", "rollout.workers=2"], "w2s rollout needs a config file"),
    FaultCase("rollout: unknown key", "config", lambda d: ["rollout", str(_write(d, "r.yaml", "rollout:\n  workerz: 2\n"))], "r.yaml:2: unknown config key 'rollout.workerz'"),
    # --- w2s report
    FaultCase("report: no metrics", "args", lambda d: ["report", str(d)], "no metrics"),
    FaultCase("report: invalid metrics.json", "args", lambda d: ["report", str(_write(d, "metrics.json", "{\n oops").parent)], "metrics.json:2: not valid JSON"),
    # --- command-line arguments
    FaultCase("args: unknown command", "args", lambda d: ["grow"], "argument COMMAND: invalid choice: 'grow'"),
    FaultCase("args: unknown option", "args", lambda d: ["tree", "build", "s.jsonl", "-o", "t", "--bogus"], "w2s tree build: unrecognized arguments: --bogus"),
    FaultCase("args: missing -o", "args", lambda d: ["search", "trees"], "the following arguments are required: -o/--out"),
    FaultCase("args: not an int", "args", lambda d: ["search", "trees", "-o", "out", "--iterations", "abc"], "argument --iterations: invalid int value: 'abc'"),
    FaultCase("args: bad choice", "args", lambda d: ["search", "trees", "-o", "out", "--value", "best"], "argument --value: invalid choice: 'best'"),
    FaultCase("args: stray argument after options", "args", lambda d: ["tree", "summary", "t.json", "--json", "extra=1"], "unrecognized arguments: extra=1"),
    FaultCase("args: tree file not found", "args", lambda d: ["tree", "summary", "nope.json"], "tree file or folder not found: nope.json"),
)  # fmt: skip


# ------------------------------------------------------------------------------------------------ running


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder below ``folder`` with a hash of its content (folders: ``"dir"``)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            out[os.path.relpath(os.path.join(root, name), folder)] = "dir"
        for name in files:
            path = Path(root, name)
            out[os.path.relpath(path, folder)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def run_case(case: FaultCase, folder: Path) -> Outcome:
    """Build ``case``'s inputs in the empty ``folder``, run ``w2s`` on them there, and sort the outcome."""
    from w2s_agents.cli import main

    folder.mkdir(parents=True, exist_ok=True)
    here = Path.cwd()
    os.chdir(folder)
    try:
        # inputs named relative to the folder, as a user in it would type them
        argv = [os.path.relpath(a, folder) if os.path.isabs(a) and a.startswith(str(folder)) else a
                for a in case.build(folder)]  # fmt: skip
        before = _snapshot(folder)
        out, err = io.StringIO(), io.StringIO()
        status: int | None
        escaped = False
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = main(argv)
            except SystemExit as exc:  # argparse's usage errors, --help
                status = exc.code if isinstance(exc.code, int) else 1
            except Exception:  # what the console script would show as a traceback
                traceback.print_exc(file=err)
                status, escaped = None, True
        after = _snapshot(folder)
    finally:
        os.chdir(here)
    changed = tuple(sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k)))
    stderr = err.getvalue()
    lines = stderr.strip().splitlines()
    if escaped or "Traceback (most recent call last)" in stderr:
        kind = "traceback"
    elif status == 0:
        kind = "silent"
    elif len(lines) == 1 and lines[0].startswith("w2s: error: ") and case.expect in lines[0] and not changed:
        kind = "clear"
    else:
        kind = "unclear"
    return Outcome(case.name, kind, status, stderr, changed)


def run_battery(root: Path, cases: tuple[FaultCase, ...] = CASES) -> list[Outcome]:
    """Run every case in its own folder below ``root``; the outcomes in the cases' order."""
    return [run_case(case, root / f"case-{i:03d}") for i, case in enumerate(cases)]
