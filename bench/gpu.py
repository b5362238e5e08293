"""The GPU check: real model sizes with random weights, the project's agent and trainers on one GPU, one table.

``python bench/gpu.py`` (or ``make gpu-check``; ``bash bench/gpu-check.sh`` on a bare GPU machine) builds
Qwen2.5-0.5B- and Qwen2.5-1.5B-shaped models locally (their published shapes, written out below; random
weights; nothing is downloaded) with a byte-level BPE tokenizer trained here on synthetic text-game episodes,
and measures, each measurement on its own (a failure is recorded in the table and the others carry on):

* **rollouts**: decisions/s and tokens/s of the project's :class:`~w2s_agents.agents.Agent` (transformers
  backend) on prompts shaped like real episodes, batched (64 and 16 states per call) vs one at a time, in both
  action modes (``choose``: every admissible command scored; ``generate``: a ReAct answer decoded);
* **training**: bf16 SFT and DPO tokens/s, MFU and peak memory with full fine-tuning and with LoRA, through the
  project's training loop (:class:`~w2s_agents.trainers.Trainer`'s own optimizer step, without its checkpoints
  and export) and, for full-fine-tuning SFT, a bare torch loop on the same batches;
* **end to end** on the device through the public APIs: a few steps of SFT, MCTS-SFT and TreeDPO, a run killed
  (SIGKILL) after its checkpoint and resumed, the export reloaded and acting, the choose mode's prefix cache.

It writes one markdown report (stdout and ``--out``, default ``$OUT/gpu.md`` when ``OUT`` is set, else
``bench/results/gpu.md``) and the same figures as JSON beside it. Everything it needs is torch, transformers,
tokenizers, peft, accelerate, safetensors, numpy, networkx and pyyaml: no ray, textworld, gymnasium, trl or
datasets. The checkout is imported from where this file lies when the project is not installed.

    python bench/gpu.py                                   # one H100/H200: both sizes (4-5 minutes, estimated)
    python bench/gpu.py --sizes 1.5b --budget-s 200
    python bench/gpu.py --device cpu --tiny --budget-s 60  # a smoke run of every section on the CPU

MFU (model FLOPs utilisation) = model FLOPs per second / the GPU's dense bf16 peak, from the device's name
(H100 SXM and H200: 989 TFLOP/s; an unknown device gets tokens/s and no MFU). Model FLOPs per token, with N the
parameters (tied embedding counted once), V*H the embedding matrix and N_body = N - V*H:

* full fine-tuning: 6 * N (forward 2, backward 4 per weight);
* LoRA: 4 * N + 6 * N_lora (the frozen weights run forward (2) and pass gradients to their inputs (2) but get
  no weight gradient; the adapters are trained in full);
* the column "MFU (run)" counts the output head where it ran: the project's loop runs it only on the positions
  that predict agent tokens, the bare loop on every position (6 * N_body + 6 * V*H * head share; LoRA 4 / 4 / 6).
  Attention-score FLOPs (12 * layers * hidden * sequence per token, PaLM's count) are left out of both; the
  notes give their share.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import logging
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "W2S_PROGRESS": "0",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent


def import_from_checkout() -> None:
    """Make ``w2s_agents`` (and ``w2s_agents.trainers``, ``.search``, ``.envs``) importable from this checkout
    when the project is not installed: the repository root goes on ``sys.path`` and, as pyproject's
    package-dir mapping does for an installed wheel, onto the package's search path, so ``trainers/`` is found
    as ``w2s_agents.trainers``."""
    if importlib.util.find_spec("w2s_agents") is None:
        sys.path.insert(0, str(REPO))
    import w2s_agents

    if importlib.util.find_spec("w2s_agents.trainers") is None:
        w2s_agents.__path__.append(str(REPO))


if str(HERE) not in sys.path:  # run by path (python bench/gpu.py, runpy): the sibling module is importable
    sys.path.insert(0, str(HERE))

GiB = 1024**3

PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 836.0),
    ("H100", 989.0),  # the SXM part, named e.g. "NVIDIA H100 80GB HBM3"
    ("H200", 989.0),
)
"""Dense bf16 peak (vendor datasheets, no sparsity) by a fragment of the device name; the first match counts."""


@dataclass(frozen=True)
class ModelSize:
    """The shape of a model to build (published config values) and how the check trains it."""

    label: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int = 151936
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_positions: int = 32768
    seq_len: int = 2048  # tokens per training sequence
    sft_rows: int = 8  # SFT sequences per micro-batch
    dpo_pairs: int = 4  # DPO pairs (two sequences each) per micro-batch
    new_tokens: int = 64  # generate mode: tokens per answer (the agent's default)
    context: int = 2048  # the agent's max_context_tokens (its default)
    states: int = 64  # rollout states, all decided in one call
    small_batch: int = 16  # states per call in the smaller batch (the rollout engine's default batch)


SIZES: dict[str, ModelSize] = {
    # Qwen/Qwen2.5-0.5B(-Instruct) config.json: 0.49B parameters
    "0.5b": ModelSize("Qwen2.5-0.5B", hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864),
    # Qwen/Qwen2.5-1.5B(-Instruct) config.json: 1.54B parameters (1.31B without the embedding)
    "1.5b": ModelSize("Qwen2.5-1.5B", hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960),
    # a smoke-test shape for the CPU (--tiny)
    "tiny": ModelSize(
        "tiny Qwen2",
        hidden=64,
        layers=2,
        heads=4,
        kv_heads=2,
        intermediate=192,
        vocab=4096,
        max_positions=4096,
        seq_len=128,
        sft_rows=2,
        dpo_pairs=1,
        new_tokens=8,
        context=512,
        states=8,
        small_batch=4,
    ),
}


# ------------------------------------------------------------------------------------------------ report


@dataclass
class Table:
    """One section of the report: a markdown table and the notes under it."""

    title: str
    columns: list[str]
    rows: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        """The section as markdown."""
        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |"]
        lines.append("| " + " | ".join("---" for _ in self.columns) + " |")
        for row in self.rows:
            lines.append("| " + " | ".join(row.get(c, "").replace("|", "/") for c in self.columns) + " |")
        for note in self.notes:
            lines.extend(["", note])
        return "\n".join(lines)


@dataclass
class Measurement:
    """One planned measurement: its row of a table, what computes the row, and when it runs."""

    table: Table
    row: dict[str, str]  # the cells that name the measurement
    run: Callable[[], dict[str, str]]  # the other cells
    priority: int  # lower runs first; rows keep their planned order in the table
    status_column: str = "note"


class Budget:
    """Wall-clock budget of the check: measurements that would start after it is spent are skipped."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()

    @property
    def elapsed(self) -> float:
        """Seconds since the check started."""
        return time.perf_counter() - self.start

    def spent(self) -> bool:
        """Whether the budget is used up."""
        return self.elapsed >= self.seconds


def run_plan(plan: list[Measurement], budget: Budget, release: Callable[[], None]) -> None:
    """Run the measurements in priority order, each in its own try/except; a failure or a spent budget is written
    into the measurement's row and the next one runs. ``release`` frees device memory after each."""
    for m in plan:
        m.table.rows.append(m.row)
    for m in m_sorted(plan):
        label = " / ".join(v for v in m.row.values() if v)
        if budget.spent():
            m.row[m.status_column] = (
                f"skipped: the budget of {budget.seconds:.0f} s was spent ({budget.elapsed:.0f} s)"
            )
            logging.getLogger("gpu-check").warning("skipped %s (budget spent)", label)
            continue
        t0 = time.perf_counter()
        logging.getLogger("gpu-check").warning("measuring %s", label)
        try:
            m.row.update(m.run())
        except Exception as exc:  # one failing measurement must not lose the others
            where = traceback.extract_tb(exc.__traceback__)[-1]
            message = " ".join(str(exc).split())[:300]
            m.row[m.status_column] = (
                f"error: {type(exc).__name__}: {message} ({Path(where.filename).name}:{where.lineno})"
            )
            logging.getLogger("gpu-check").error("%s failed:\n%s", label, traceback.format_exc())
        finally:
            release()
        m.row.setdefault("time", f"{time.perf_counter() - t0:.1f} s")


def m_sorted(plan: list[Measurement]) -> list[Measurement]:
    """The plan by priority (stable: the planned order within a priority)."""
    return sorted(plan, key=lambda m: m.priority)


def _peak_tflops(device_name: str) -> float | None:
    for fragment, tflops in PEAK_BF16_TFLOPS:
        if fragment in device_name:
            return tflops
    return None


def environment(device: str) -> dict[str, Any]:
    """Device, peak FLOP/s and library versions."""
    import peft
    import torch
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        env |= {
            "device": props.name,
            "multiprocessors": props.multi_processor_count,
            "memory_gib": props.total_memory / GiB,
            "peak_tflops": _peak_tflops(props.name),
        }
    else:
        env |= {"device": f"CPU ({os.cpu_count()} cores, {platform.machine()})", "peak_tflops": None}
    return env


def render(env: dict[str, Any], tables: list[Table], budget: Budget, args: argparse.Namespace) -> str:
    """The whole report as markdown."""
    peak = f"{env['peak_tflops']:.0f} TFLOP/s dense bf16 (datasheet)" if env.get("peak_tflops") else "unknown"
    device = env["device"]
    if "multiprocessors" in env:
        device += f", {env['multiprocessors']} SMs, {env['memory_gib']:.1f} GiB"
    head = [
        "## GPU check (`bench/gpu.py`)",
        "",
        f"Device: {device}; peak {peak}. Python {env['python']}, torch {env['torch']} (CUDA {env['cuda']}), "
        f"transformers {env['transformers']}, peft {env['peft']}. Run of {env['date']}: sizes "
        f"{', '.join(args.sizes)}, {budget.elapsed:.0f} s of a {budget.seconds:.0f} s budget.",
        "",
    ]
    return "\n".join(head) + "\n" + "\n\n".join(t.markdown() for t in tables if t.rows) + "\n"


def default_out() -> Path:
    """``$OUT/gpu.md`` on the device machine, else ``bench/results/gpu.md``."""
    out = os.environ.get("OUT")
    return Path(out) / "gpu.md" if out else HERE / "results" / "gpu.md"


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="0.5b,1.5b", help="models to build, comma-separated: 0.5b, 1.5b, tiny")
    p.add_argument("--tiny", action="store_true", help="shorthand for --sizes tiny (a CPU smoke run)")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument("--budget-s", type=float, default=330.0, help="skip measurements that would start later")
    p.add_argument(
        "--out", type=Path, default=None, help="markdown report (default: $OUT/gpu.md or bench/results)"
    )
    p.add_argument(
        "--steps", type=int, default=None, help="timed optimizer steps per training row (4; --tiny 2)"
    )
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed optimizer steps before them (2; --tiny 1)"
    )
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end checks")
    p.add_argument("--verbose", action="store_true", help="log the project's INFO messages")
    p.add_argument("--resume-child", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.sizes = ["tiny"] if args.tiny else [s.strip().lower() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in args.sizes if s not in SIZES]
    if unknown or not args.sizes:
        p.error(f"--sizes: unknown size {', '.join(unknown) or '(none)'}; choose from {', '.join(SIZES)}")
    args.steps = args.steps if args.steps is not None else (2 if args.tiny else 4)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the check; returns the exit status (0 when the report was written, whatever it holds)."""
    args = parse_args(argv)
    import_from_checkout()
    import gpu_checks

    if args.resume_child is not None:
        return gpu_checks.resume_child(args.resume_child)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu.py: error: --device cuda but no CUDA device is visible (a CPU smoke run: --device cpu --tiny)",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.device.startswith("cuda"):  # float32 matmuls (few: the trainers compute in bf16) may use TF32
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    budget = Budget(args.budget_s)
    env = environment(args.device)
    out = args.out or default_out()
    with tempfile.TemporaryDirectory(prefix="w2s-gpu-check-") as tmp:
        tables, plan = gpu_checks.plan(args, env, Path(tmp))
        run_plan(plan, budget, gpu_checks.release)
        text = render(env, tables, budget, args)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    data = {"environment": env, "elapsed_s": budget.elapsed, "budget_s": budget.seconds,
            "tables": [{"title": t.title, "columns": t.columns, "rows": t.rows, "notes": t.notes} for t in tables]}  # fmt: skip
    out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    print(f"written: {out} and {out.with_suffix('.json')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
