"""Benchmark of the rollout engine: batching the agent over many envs, and Ray workers.

Measured side by side in one run and printed as ratios (the machine's load changes between runs):

* env steps/s of the batched agent, 16 envs live and one model call per step for all of them, vs one env at a
  time (batch size 1), with the same tiny random-weight model, the same 16 episodes (tw-simple games) and the
  same engine (:func:`w2s_agents.rollout.run_episodes`); choose mode and generate mode; beside it the agent's
  decisions/s counted over the time of its own calls (the envs' steps, the same work on both sides, left out);
* env steps/s of :func:`w2s_agents.rollout.collect` on Ray with 2 workers vs 1 (one local Ray instance, started
  before the timing), counted from the first to the last episode (steady state) and over the whole call
  (worker start-up included).

* with ``--large-model`` (for a GPU): actions/s of a ~0.5B-parameter random-init Llama in bf16, 16 states at once
  vs one at a time, both modes (no envs in the loop).

Usage: ``python bench/rollout.py [--quick] [--preset weak] [--cache-dir DIR] [--no-ray] [--large-model [--only-large]]``.
Target: batched at least 4x the one-at-a-time rate on a CPU. Torch runs one thread per process (as Ray workers
do), so both sides use the same compute.
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

os.environ.setdefault("W2S_PROGRESS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class _TimedAgent:
    """The agent, with the wall time spent in its ``act`` calls counted (the rest of a rollout is the envs')."""

    def __init__(self, agent) -> None:
        self.agent = agent
        self.seconds = 0.0

    def act(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.agent.act(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    def __getattr__(self, name: str):
        return getattr(self.agent, name)


def _steps_per_s(agent, env, episodes, batch_size: int, max_steps: int) -> tuple[float, int, float]:
    """``(env steps/s, steps, agent decisions/s)``: the whole engine, and the agent's calls alone."""
    from w2s_agents.rollout import run_episodes

    timed = _TimedAgent(agent)
    start = time.perf_counter()
    steps = sum(
        t.num_steps for t in run_episodes(timed, env, episodes, batch_size=batch_size, max_steps=max_steps)
    )
    return steps / (time.perf_counter() - start), steps, steps / max(timed.seconds, 1e-9)


CONFIGS = [("choose", 512), ("choose", 1024), ("generate", 512), ("generate", 1024)]
"""(mode, context length) pairs measured; generate mode writes up to 64 tokens (the default)."""


def bench_batching(
    model: Path, env, tasks: list[str], quick: bool, rounds: int
) -> dict[tuple[str, int], dict]:
    from w2s_agents.agents import Agent, AgentConfig, Sampler, load_model
    from w2s_agents.rollout import plan_episodes

    lm = load_model(model, device="cpu")
    samplers = [Sampler(), Sampler(temperature=1.0)]
    episodes = plan_episodes(tasks, samplers, list(range(16 // (len(tasks) * len(samplers)))))
    assert len(episodes) == 16, len(episodes)
    max_steps = 4 if quick else 10
    out: dict[tuple[str, int], dict] = {}
    for mode, context in CONFIGS:
        agent = Agent(lm, AgentConfig(mode=mode, max_context_tokens=context))
        _steps_per_s(agent, env, episodes[:2], 2, 2)  # warm-up: games loaded, caches filled
        batched, single, agent_b, agent_s = [], [], [], []
        for _ in range(rounds):  # alternate, so that load changes hit both sides
            rate, steps_b, decide = _steps_per_s(agent, env, episodes, 16, max_steps)
            batched.append(rate)
            agent_b.append(decide)
            rate, steps_s, decide = _steps_per_s(agent, env, episodes, 1, max_steps)
            single.append(rate)
            agent_s.append(decide)
            assert steps_b == steps_s, (steps_b, steps_s)  # the same episodes, step for step
        out[mode, context] = {
            "batched": statistics.median(batched),
            "single": statistics.median(single),
            "ratios": [b / s for b, s in zip(batched, single, strict=True)],
            "agent_batched": statistics.median(agent_b),
            "agent_single": statistics.median(agent_s),
            "steps": steps_b,
        }
    return out


def bench_ray(model: Path, env_kwargs: dict, tasks: list[str], quick: bool) -> dict[str, float]:
    from w2s_agents.agents import Agent, AgentConfig, Sampler, load_model
    from w2s_agents.rollout import EngineOptions, RayOptions, collect
    from w2s_agents.rollout.ray import ray_session
    from w2s_agents.store import TrajectoryStore

    agent = Agent(load_model(model, device="cpu"), AgentConfig(mode="choose", max_context_tokens=512))
    samplers = [Sampler(), Sampler(temperature=1.0), Sampler(temperature=0.7, top_p=0.95)]
    seeds = 4 if quick else 8
    out: dict[str, float] = {}
    with ray_session(RayOptions(workers=2)), tempfile.TemporaryDirectory(prefix="w2s-bench-") as tmp:
        for workers in (1, 2):
            arrivals: list[tuple[float, int]] = []
            with TrajectoryStore(Path(tmp) / f"w{workers}.jsonl") as store:
                s = collect(tasks, agent, samplers, store, env="w2s/TextWorld-v0", env_kwargs=env_kwargs,
                            seeds=seeds, max_steps=10, engine=EngineOptions(batch_size=8, shard_size=8),
                            ray=RayOptions(workers=workers),
                            on_episode=lambda t, _s, a=arrivals: a.append((time.perf_counter(), t.num_steps)))  # fmt: skip
            first, last = arrivals[0][0], arrivals[-1][0]
            steady = sum(n for _, n in arrivals[1:]) / (last - first)
            out[f"w{workers}_steady"] = steady
            out[f"w{workers}_total"] = s.steps_per_s
            out[f"w{workers}_steps"] = s.steps
    return out


def bench_large(
    model: Path, env, tasks: list[str], device: str, hidden: int, layers: int, rounds: int
) -> dict:
    """Actions/s of a large random-init model (bf16 on CUDA), 16 states at once vs one at a time (no envs)."""
    import random

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from w2s_agents.agents import Agent, AgentConfig, Sampler
    from w2s_agents.agents.models import LoadedModel, count_parameters, load_model
    from w2s_agents.envs.demos import expert_trajectory
    from w2s_agents.types import EpisodeState

    tok = load_model(model).tokenizer
    heads = max(1, hidden // 64)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4) if heads % 4 == 0 else heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(dev):
        lm_model = LlamaForCausalLM(config).to(dtype).eval()
    lm = LoadedModel(lm_model, tok, model, dev, dtype)
    e = dataclasses.replace(env, kwargs={**env.kwargs, "expert_plan": True}).make()
    try:
        trajs = [expert_trajectory(e.unwrapped, t) for t in tasks]
    finally:
        e.close()
    # 16 states at different depths of the expert plays, each with its admissible commands
    states = [
        EpisodeState.from_trajectory(t, i % t.num_steps, grammar="look") for i, t in enumerate(trajs * 4)
    ][:16]
    out: dict = {"parameters": count_parameters(lm_model), "device": str(dev), "dtype": str(dtype)}
    for mode in ("choose", "generate"):
        agent = Agent(lm, AgentConfig(mode=mode, max_context_tokens=2048))
        samplers = [Sampler(temperature=1.0)] * 16

        def run(batch: bool, agent=agent, samplers=samplers) -> float:
            rngs = [random.Random(i) for i in range(16)]
            start = time.perf_counter()
            if batch:
                agent.act(states, samplers, rngs)
            else:
                for i in range(16):
                    agent.act(states[i : i + 1], samplers[i : i + 1], rngs[i : i + 1])
            if dev.type == "cuda":
                torch.cuda.synchronize()
            return 16 / (time.perf_counter() - start)

        run(True)  # warm-up (kernels, caches)
        batched, single = [], []
        for _ in range(rounds):
            batched.append(run(True))
            single.append(run(False))
        out[mode] = (statistics.median(batched), statistics.median(single))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds")
    parser.add_argument(
        "--preset",
        default="weak",
        choices=["nano", "weak", "small", "strong", "base"],
        help="tiny model size",
    )
    parser.add_argument("--cache-dir", default=None, help="TextWorld game cache (default: the user cache)")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray part")
    parser.add_argument(
        "--large-model",
        action="store_true",
        help="also measure a ~0.5B-parameter random-init model (bf16 on CUDA), batched vs single actions/s",
    )
    parser.add_argument("--device", default="cuda", help="device of the large model (cuda, or cpu to try it)")
    parser.add_argument("--large-hidden", type=int, default=1024, help="hidden size of the large model")
    parser.add_argument("--large-layers", type=int, default=28, help="layers of the large model (28: ~0.4B)")
    parser.add_argument("--only-large", action="store_true", help="skip the CPU parts")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    import ray
    import transformers

    from w2s_agents.rollout import EnvFactory, build_task_model

    env_kwargs = {"max_steps": 50, "admissible_commands": True, "expert_plan": False}
    if args.cache_dir:
        env_kwargs["cache_dir"] = args.cache_dir
    env = EnvFactory("w2s/TextWorld-v0", env_kwargs)
    tasks = [f"tw-simple/train/{i}" for i in range(4)]
    print(f"machine: {os.cpu_count()} CPUs ({_cpu_model()}), load average {os.getloadavg()[0]:.1f}")
    print(
        f"python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} thread), "
        f"transformers {transformers.__version__}, ray {ray.__version__}"
    )
    with tempfile.TemporaryDirectory(prefix="w2s-bench-model-") as tmp:
        model = build_task_model(Path(tmp) / args.preset, tasks, env, preset=args.preset, vocab_size=2048)
        from w2s_agents.agents.models import load_model

        params = sum(p.numel() for p in load_model(model).model.parameters())
        print(f"model: tiny {args.preset} ({params:,} parameters), tasks {', '.join(tasks)}")
        if args.large_model:
            g = bench_large(model, env, tasks, args.device, args.large_hidden, args.large_layers, 3)
            print(
                f"\nlarge random-init model: {g['parameters']:,} parameters on {g['device']} ({g['dtype']}), 16 states:"
            )
            for mode in ("choose", "generate"):
                b, s1 = g[mode]
                print(
                    f"  {mode:8s} batched {b:7.1f} actions/s   single {s1:7.1f} actions/s   ratio {b / s1:.2f}x"
                )
        if args.only_large:
            return
        r = bench_batching(model, env, tasks, args.quick, rounds=1 if args.quick else 2)
        print("\nbatched agent over 16 envs vs one env at a time (same 16 episodes, same model):")
        for (mode, context), x in r.items():
            ratios = ", ".join(f"{v:.2f}x" for v in x["ratios"])
            print(
                f"  {mode:8s} context {context:4d}  batched {x['batched']:6.1f} steps/s  single {x['single']:6.1f} "
                f"steps/s  ratio {x['batched'] / x['single']:.2f}x (rounds: {ratios}; {x['steps']} steps)"
            )
            print(
                f"  {'':8s} {'':12s}  agent alone: batched {x['agent_batched']:6.1f} decisions/s  single "
                f"{x['agent_single']:6.1f} decisions/s  ratio {x['agent_batched'] / x['agent_single']:.2f}x"
            )
        best = max(x["batched"] / x["single"] for x in r.values())
        print(f"  target batched >= 4x single: {'met' if best >= 4 else 'not met'} (best ratio {best:.2f}x)")
        if not args.no_ray:
            w = bench_ray(model, env_kwargs, tasks, args.quick)
            print(
                "\nRay, 2 workers vs 1 (choose mode, batch 8 per worker, local instance, 1 torch thread each):"
            )
            for k in (1, 2):
                print(
                    f"  {k} worker{'s' if k > 1 else ' '}  steady {w[f'w{k}_steady']:6.1f} steps/s   "
                    f"whole call {w[f'w{k}_total']:6.1f} steps/s ({w[f'w{k}_steps']} steps)"
                )
            print(
                f"  ratio 2 vs 1: steady {w['w2_steady'] / w['w1_steady']:.2f}x, "
                f"whole call {w['w2_total'] / w['w1_total']:.2f}x"
            )
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
