"""Benchmark of the generation backends: the transformers backend vs the vLLM backend, side by side in one run.

The same tiny random-weight model (the ``weak`` and ``strong`` presets of the CPU quickstart), the same 16 greedy
episodes of a toy corridor game (16 live at once, one batched
agent call a step) and the same engine (:func:`w2s_agents.rollout.run_episodes`) on both backends; greedy decoding
makes both do the same work (their answers are equal token for token, as tests/test_backend_vllm.py checks).
Counted over the time of the agent's own calls (the envs' steps, the same on both sides, left out):

* generate mode: generated tokens/s and decisions/s;
* choose mode: decisions/s and scored tokens/s (each decision's prompt plus its candidates' tokens).

Each measurement runs ``--repeats`` times, the backends alternating, and the median is printed, with the ratio
vLLM / transformers. The engine's start (process spawn, model load, KV cache) is timed apart.

Runs where vLLM is installed: ``make vllm-env``, then
``.venv-vllm/bin/python bench/rollout_backends.py [--quick] [--presets weak strong] [--steps 6] [--repeats 3]``.
On a CPU both sides get one thread: torch in this process, ``OMP_NUM_THREADS=1`` in vLLM's worker process (vLLM
also runs its scheduler in a process of its own). Target on a CPU: vLLM at least 2x the transformers backend in
generate mode at batch 16.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("W2S_PROGRESS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # the machine's cores may be shared: no pinning
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


class Corridor:
    """Task ``corridor/N``: go east N times to win (the game of tests/test_backend_vllm.py, longer text)."""

    env_id = "bench/Corridor-v0"
    command_grammar = "go east, go west, look, take key, open door"
    COMMANDS = ("go east", "go west", "look", "take key", "open door", "inventory")

    def __init__(self) -> None:
        self.length = self.pos = 0

    def _info(self, won: bool = False) -> dict[str, Any]:
        return {
            "admissible_commands": list(self.COMMANDS),
            "won": won,
            "lost": False,
            "score": self.pos / self.length,
        }

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[str, dict]:
        self.length = int(options["task"].split("/")[1])
        self.pos = 0
        return self._observation(), {**self._info(), "instruction": "Reach the last room of the corridor."}

    def _observation(self) -> str:
        return (
            f"-= Room {self.pos} =- You are in room {self.pos} of {self.length} of a long corridor. A door leads "
            "east and another west. You see a key on the table and a lamp on the floor."
        )

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        before = self.pos
        self.pos += action == "go east"
        won = self.pos >= self.length
        return self._observation(), (self.pos - before) / self.length, won, False, self._info(won)

    def close(self) -> None:
        pass


class _TimedAgent:
    """The agent, with the wall time of its ``act`` calls counted."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.seconds = 0.0

    def act(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.agent.act(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    def __getattr__(self, name: str) -> Any:
        return getattr(self.agent, name)


def _run(agent: Any, tasks: list[str], steps: int, batch: int) -> dict[str, Any]:
    """Decisions/s and tokens/s of the agent's calls over the episodes of ``tasks`` (greedy), and the actions."""
    from w2s_agents.agents import Sampler
    from w2s_agents.rollout import plan_episodes, run_episodes

    timed = _TimedAgent(agent)
    trajs = list(run_episodes(timed, Corridor, plan_episodes(tasks, [Sampler()], [0]), batch_size=batch,
                              max_steps=steps))  # fmt: skip
    decisions = sum(t.num_steps for t in trajs)
    if agent.config.mode == "generate":
        tokens = sum(s.tokens_out for t in trajs for s in t.steps)
    else:
        tokens = sum(s.tokens_in + s.tokens_out for t in trajs for s in t.steps)
    return {"decisions/s": decisions / timed.seconds, "tokens/s": tokens / timed.seconds, "decisions": decisions,
            "tokens": tokens, "actions": [[s.action for s in t.steps] for t in trajs]}  # fmt: skip


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _measure(model: Path, args: argparse.Namespace, tasks: list[str]) -> dict[str, Any]:
    """Both backends on the model folder ``model``, both modes; the engine shut down afterwards."""
    from w2s_agents.agents import Agent, AgentConfig, VLLMOptions, load_model
    from w2s_agents.agents.vllm_backend import VLLMBackend, shutdown_engines

    lm = load_model(model, device="cpu")
    engine = VLLMOptions(kv_cache_space_gb=1.0, max_engines=1)
    start = time.perf_counter()
    backend = VLLMBackend(model, AgentConfig(max_context_tokens=args.context, backend="vllm", vllm=engine))
    out: dict[str, Any] = {"startup": time.perf_counter() - start, "modes": {}}
    out["parameters"] = sum(p.numel() for p in lm.model.parameters())
    for mode in ("generate", "choose"):
        cfg = AgentConfig(mode=mode, max_context_tokens=args.context, max_new_tokens=args.max_new_tokens)
        agents = {
            "transformers": Agent(lm, cfg),
            "vllm": Agent(backend, dataclasses.replace(cfg, backend="vllm", vllm=engine)),
        }
        for agent in agents.values():  # warm-up: one short run each
            _run(agent, tasks[:2], 1, 2)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in agents}
        for _ in range(args.repeats):
            for name, agent in agents.items():
                # every repeat starts from empty prefix caches
                if agent.prefix_cache is not None:
                    agent.prefix_cache.clear()
                if name == "vllm":
                    backend.engine.reset_prefix_cache()
                runs[name].append(_run(agent, tasks, args.steps, args.batch))
        out["modes"][mode] = {
            "median": {
                name: {k: statistics.median(r[k] for r in rs) for k in ("decisions/s", "tokens/s")}
                for name, rs in runs.items()
            },
            "per_decision": runs["vllm"][0]["tokens"] / runs["vllm"][0]["decisions"],
            "same": runs["vllm"][0]["actions"] == runs["transformers"][0]["actions"],
        }
    shutdown_engines()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--presets",
        nargs="+",
        default=["weak", "strong"],
        help="tiny model presets (vLLM's CPU attention needs a head size of at least 32: not nano)",
    )
    parser.add_argument("--batch", type=int, default=16, help="episodes live at once")
    parser.add_argument("--steps", type=int, default=6, help="steps per episode")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="generate mode: longest answer")
    parser.add_argument("--context", type=int, default=1024, help="agent.max_context_tokens")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (median printed)")
    parser.add_argument("--quick", action="store_true", help="one run each, 3 steps")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.steps = 1, 3

    import torch
    import transformers
    import vllm

    from w2s_agents.agents.models import create_tiny_model
    from w2s_agents.messages import SYSTEM_PROMPT

    torch.set_num_threads(1)
    tasks = [f"corridor/{n}" for n in range(args.steps + 2, args.steps + 2 + args.batch)]  # none ends early
    env = Corridor()
    texts = [SYSTEM_PROMPT, Corridor.command_grammar, *Corridor.COMMANDS, "Thought: go on\nAction: go east"]
    for n in range(12):
        env.reset(options={"task": f"corridor/{n + 1}"})
        texts.append(env._observation())
    results = {}
    with tempfile.TemporaryDirectory(prefix="w2s-bench-backends-") as tmp:
        for preset in args.presets:
            model = create_tiny_model(Path(tmp) / preset, texts, preset=preset, vocab_size=1024, seed=0)
            results[preset] = _measure(model, args, tasks)

    print(f"machine: {_cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, vllm {vllm.__version__}")  # fmt: skip
    print(f"{args.batch} greedy episodes at once, {args.steps} steps each, context {args.context}, answers up to "
          f"{args.max_new_tokens} tokens; float32; {args.repeats} run(s) per cell, median")  # fmt: skip
    for preset, res in results.items():
        print(
            f"tiny {preset} model: {res['parameters'] / 1e6:.2f}M parameters; vLLM engine start {res['startup']:.1f} s"
        )
    print()
    print("| model | mode | measure | transformers | vLLM | vLLM / transformers |")
    print("|---|---|---|---:|---:|---:|")
    for preset, res in results.items():
        for mode, m in res["modes"].items():
            unit = "generated tokens/s" if mode == "generate" else "scored tokens/s (prompt + candidates)"
            for key, label in (("tokens/s", unit), ("decisions/s", "decisions/s")):
                a, b = m["median"]["transformers"][key], m["median"]["vllm"][key]
                print(f"| {preset} | {mode} | {label} | {a:.1f} | {b:.1f} | {b / a:.2f}x |")
            same = "the same actions" if m["same"] else "DIFFERENT actions"
            print(f"| {preset} | {mode} | tokens per decision | {m['per_decision']:.0f} | | {same} |")


if __name__ == "__main__":
    main()
