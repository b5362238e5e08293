"""The end-to-end checks of ``bench/gpu.py``: the trainers' and the agent's code paths on the device, through the
project's public APIs, each check raising when what it checks does not hold.

* SFT with LoRA and MCTS-SFT with full fine-tuning, a few steps each (checkpoint, export);
* TreeDPO with LoRA, its reference the SFT run's export (reference log-probs computed on the device);
* a run killed with SIGKILL after its checkpoint at step 2 and resumed: the resumed run starts at step 2 and
  ends at step 4;
* the SFT export reloaded with ``load_model``: its weights differ from the base model's and an agent acts with it
  in both modes;
* the choose mode's prefix cache: consecutive steps of episodes reuse their earlier prompts' keys and values.
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gpu import REPO
from gpu_checks import Context, episode, rollout_states

STEPS_BEFORE_KILL = 2


def _rows(n: int = 8) -> tuple[list[dict], list[dict]]:
    """SFT rows and step-level preference pairs of synthetic episodes (a few hundred tokens each)."""
    from w2s_agents.messages import agent_message, episode_messages

    sft, pairs = [], []
    for i in range(n):
        ep = episode(3000 + i, 5)
        turns = [*ep.turns[:-1], (*ep.turns[-1][:2], None)]
        sft.append({"messages": episode_messages(ep.instruction, ep.first, turns), "task_id": f"e2e/{i}"})
        # the prompt ends with the observation the pair's actions answer
        prompt = episode_messages(ep.instruction, ep.first, ep.turns[:2])
        good, bad = ep.turns[2][1], ep.admissible[2][-1 - i % 3]
        if good == bad:
            bad = "inventory"
        pairs.append({"prompt": prompt, "chosen": [agent_message(good, ep.turns[2][0])],
                      "rejected": [agent_message(bad)], "task_id": f"e2e/{i}"})  # fmt: skip
    return sft, pairs


def _config(ctx: Context, method: str, *, lora: bool, steps: int, **more: Any) -> Any:
    from w2s_agents.trainers import LoraOptions, TrainConfig

    return TrainConfig(method=method, max_steps=steps, batch_size=2, max_length=1024, device=ctx.device,
                       lora=LoraOptions(enabled=lora, r=16, alpha=32.0), valid_fraction=0.0, warmup_ratio=0.0,
                       **more)  # fmt: skip


def _check_run(result: Any, steps: int, what: str) -> str:
    if result.steps != steps:
        raise RuntimeError(f"{what} ran {result.steps} steps, not {steps}")
    losses = [v for _, v in result.loss_curve]
    if len(losses) != steps or not all(math.isfinite(v) for v in losses):
        raise RuntimeError(f"{what}: loss curve {losses}")
    if not (result.model_dir / "config.json").is_file():
        raise RuntimeError(f"{what}: no exported model in {result.model_dir}")
    return f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, {result.tokens_per_second:,.0f} tokens/s, exported"


def sft_lora(ctx: Context, model: Path) -> dict[str, str]:
    """SFT with LoRA adapters, 3 steps."""
    from w2s_agents.trainers import train_sft

    rows, _ = _rows()
    result = train_sft(model, rows, ctx.tmp / "e2e-sft", _config(ctx, "sft", lora=True, steps=3, lr=1e-3))
    ctx.e2e["sft"] = result
    if result.adapter_dir is None or not result.adapter_dir.is_dir():
        raise RuntimeError("a LoRA run saved no adapter folder")
    return {"result": "ok", "detail": _check_run(result, 3, "SFT") + " (adapters merged)"}


def mcts_sft_full(ctx: Context, model: Path) -> dict[str, str]:
    """MCTS-SFT with every parameter trained, 2 steps."""
    from w2s_agents.trainers import train_sft

    rows, _ = _rows()
    result = train_sft(model, rows, ctx.tmp / "e2e-mcts-sft", _config(ctx, "mcts-sft", lora=False, steps=2))
    if result.last_checkpoint is None or not result.last_checkpoint.is_dir():
        raise RuntimeError("no checkpoint of the last step")
    return {
        "result": "ok",
        "detail": _check_run(result, 2, "MCTS-SFT") + f", checkpoint {result.last_checkpoint.name}",
    }


def tree_dpo(ctx: Context, model: Path) -> dict[str, str]:
    """TreeDPO with LoRA, 3 steps; the reference is the SFT run's export (or the base when that run failed)."""
    from w2s_agents.trainers import train_dpo

    _, pairs = _rows()
    sft = ctx.e2e.get("sft")
    reference = sft.model_dir if sft is not None else model
    result = train_dpo(model, pairs, ctx.tmp / "e2e-dpo", _config(ctx, "dpo", lora=True, steps=3, lr=1e-4),
                       reference_path=reference)  # fmt: skip
    metrics = result.final_metrics
    if "rewards/margins" not in metrics:
        raise RuntimeError(f"no DPO metrics in the result: {sorted(metrics)}")
    which = "the SFT export" if sft is not None else "the base model"
    return {"result": "ok", "detail": _check_run(result, 3, "TreeDPO")
            + f"; reference {which}, margin {metrics['rewards/margins']:.3g}"}  # fmt: skip


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def kill_and_resume(ctx: Context, model: Path) -> dict[str, str]:
    """A child process trains (SFT, LoRA, 4 steps, a checkpoint every 2), is killed with SIGKILL once the step-2
    checkpoint exists, and the run is resumed here: it must start at step 2 and end at step 4."""
    from w2s_agents.config import config_to_dict
    from w2s_agents.trainers import train_sft

    rows, _ = _rows()
    out = ctx.tmp / "e2e-resume"
    cfg = _config(ctx, "sft", lora=True, steps=4, checkpoint_every=STEPS_BEFORE_KILL, lr=1e-3)
    job = ctx.tmp / "resume-job.json"
    delay = 2.0 if ctx.cuda else 1.0  # seconds per micro-batch of the child: time to see its checkpoint
    job.write_text(json.dumps({"model": str(model), "rows": rows, "out": str(out), "config": config_to_dict(cfg),
                               "delay": delay}))  # fmt: skip
    log = ctx.tmp / "resume-child.log"
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        child = subprocess.Popen([sys.executable, str(REPO / "bench" / "gpu.py"), "--resume-child", str(job)],
                                 stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)  # fmt: skip
        target = out / "checkpoints" / f"step-{STEPS_BEFORE_KILL:08d}" / "state.json"
        deadline = time.monotonic() + 240
        while not target.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    if not target.exists():
        tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
        raise RuntimeError(
            f"the child wrote no step-{STEPS_BEFORE_KILL} checkpoint (exit {child.returncode}): {tail}"
        )
    if child.returncode != -signal.SIGKILL:
        raise RuntimeError(f"the child ended (exit {child.returncode}) before it could be killed")
    killed_after = time.perf_counter() - t0
    records = _Records()
    loop_log = logging.getLogger("w2s_agents.trainers.loop")
    level = loop_log.level
    loop_log.addHandler(records)
    loop_log.setLevel(logging.INFO)
    try:
        result = train_sft(model, rows, out, cfg)
    finally:
        loop_log.removeHandler(records)
        loop_log.setLevel(level)
    resumed = [m for m in records.messages if m.startswith("resuming")]
    if not resumed or f"(step {STEPS_BEFORE_KILL}," not in resumed[0]:
        raise RuntimeError(
            f"the run did not resume from step {STEPS_BEFORE_KILL}: {resumed or 'no resume logged'}"
        )
    detail = _check_run(result, 4, "the resumed run")
    return {"result": "ok", "detail": f"killed {killed_after:.0f} s after start, at step {STEPS_BEFORE_KILL}'s "
            f"checkpoint; resumed from step {STEPS_BEFORE_KILL}, finished at step {result.steps}; {detail}"}  # fmt: skip


def resume_child(job_file: Path) -> int:
    """The child process of :func:`kill_and_resume`: train slowly (the job's delay per micro-batch) until
    killed."""
    import w2s_agents.trainers.logps as logps
    from w2s_agents.config import from_dict
    from w2s_agents.trainers import TrainConfig, train_sft

    job = json.loads(job_file.read_text())
    original = logps.token_logps

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(job["delay"])  # time for the parent to see the checkpoint and kill this process mid-run
        return original(*args, **kwargs)

    logps.token_logps = slow
    train_sft(job["model"], job["rows"], job["out"], from_dict(TrainConfig, job["config"]))
    return 0


def export_reload(ctx: Context, model: Path) -> dict[str, str]:
    """The SFT export loaded back with ``load_model``: changed weights, and an agent acting with it."""
    import torch

    from w2s_agents.agents import Agent, AgentConfig, Sampler, load_model

    sft = ctx.e2e.get("sft")
    if sft is None:
        raise RuntimeError("the SFT run failed or did not run; nothing to reload")
    trained = load_model(sft.model_dir, device=ctx.device)
    base = load_model(model, device=ctx.device)
    base_sd = base.model.state_dict()
    changed = sum(
        1 for k, v in trained.model.state_dict().items() if not torch.equal(v, base_sd[k].to(v.dtype))
    )
    del base, base_sd
    if changed == 0:
        raise RuntimeError("the exported weights equal the base model's")
    states = rollout_states(4)
    made = {}
    for mode in ("choose", "generate"):
        agent = Agent(trained, AgentConfig(mode=mode, max_new_tokens=16))
        decisions = agent.act(states, [Sampler()] * 4, [random.Random(i) for i in range(4)])
        made[mode] = sum(d.mode == mode for d in decisions)
    if made != {"choose": 4, "generate": 4}:
        raise RuntimeError(f"decisions by mode: {made}")
    n = len(trained.model.state_dict())
    return {"result": "ok", "detail": f"{changed} of {n} weight tensors changed by training; loaded on "
            f"{trained.device} as {str(trained.dtype).removeprefix('torch.')}; 4 decisions in each mode"}  # fmt: skip


def prefix_cache(ctx: Context, model: Path) -> dict[str, str]:
    """Choose mode over two consecutive steps of 8 episodes: the second step's prompts reuse the first's keys
    and values, and score as without the cache."""
    import numpy as np

    from w2s_agents.agents import Agent, AgentConfig, load_model
    from w2s_agents.types import EpisodeState

    lm = load_model(model, device=ctx.device)
    # the admissible list stays out of the system prompt, so that consecutive prompts share their prefix
    cached = Agent(lm, AgentConfig(mode="choose", prompt_admissible=False))
    plain = Agent(lm, AgentConfig(mode="choose", prompt_admissible=False, prefix_cache=0))
    eps = [episode(4000 + i, 4) for i in range(8)]

    def states(depth: int) -> list:
        return [
            EpisodeState(e.instruction, e.first, tuple(e.turns[:depth]), e.admissible[depth]) for e in eps
        ]

    cached.score_actions(states(2))
    with_cache = cached.score_actions(states(3))
    without = plain.score_actions(states(3))
    reused = cached.prefix_cache.reused_tokens
    if reused <= 0:
        raise RuntimeError("no prompt tokens were taken from the prefix cache")
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(with_cache, without, strict=True))
    scale = max(float(np.max(np.abs(b))) for b in without)
    same = np.mean([int(np.argmax(a) == np.argmax(b)) for a, b in zip(with_cache, without, strict=True)])
    return {"result": "ok", "detail": f"{reused:,} prompt tokens reused; scores with and without the cache differ "
            f"by at most {diff:.3g} (scores up to {scale:.3g}); same best command in {100 * same:.0f}% of states"}  # fmt: skip


CHECKS = [
    ("SFT, LoRA, 3 steps (train_sft)", sft_lora),
    ("MCTS-SFT, full fine-tuning, 2 steps (train_sft)", mcts_sft_full),
    ("TreeDPO, LoRA, 3 steps, reference = the SFT export (train_dpo)", tree_dpo),
    ("kill (SIGKILL) after the step-2 checkpoint and resume (train_sft)", kill_and_resume),
    ("export reloaded (load_model) and acting (Agent, both modes)", export_reload),
    ("choose-mode prefix cache over consecutive steps", prefix_cache),
]
"""The checks in the order they run (later ones use the SFT run's export)."""
