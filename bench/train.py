"""Benchmark of the trainers: training tokens/s of ``train_sft`` / ``train_dpo`` / ``train_pg`` against a minimal
hand-written torch loop on the same model and the same micro-batches, side by side in one run.

Data: synthetic agent episodes (system prompt, task, 4 agent turns with observations) rendered by
:mod:`w2s_agents.messages`; SFT rows, step/continuation preference pairs, and policy-gradient rows (each
episode ending on its last action, advantages +1 / -1 in turn). Both sides get the same tokenized rows
(tokenization is outside both timings), the same epoch order and micro-batches:

* ours: the real trainer (``train_sft`` / ``train_dpo`` / ``train_pg``): collation from token lists, agent-token
  log-probs through the selected-position head, normalised loss, clipping, AdamW, schedule, loss bookkeeping.
  Its tokens/s is the trainer's own ``TrainResult.tokens_per_second`` (step time; the reference pass of DPO,
  the loading of pg's frozen model, checkpoint writes and the export are outside it);
* baseline: a plain loop over the same micro-batches: padded tensors, ``model(input_ids, attention_mask,
  labels)`` with the non-agent tokens set to -100 (SFT), or summed log-softmax gathers over all logits and the
  sigmoid loss with the same precomputed reference log-probs (DPO), or (pg) a no-grad forward of a frozen copy
  of the start model, per-token log-probs of both by log-softmax gathers, the clipped-ratio surrogate plus the
  k3 KL to that copy, mean over agent tokens; clip, AdamW step, zero grad.

Tokens are every non-padding token through forward and backward (prompt and completion). Each side runs
``--repeats`` times, alternating, and its best run counts (a shared machine's load only slows runs down).

MFU (``--device cuda``): model FLOPs 6 * N * tokens + attention 12 * layers * hidden * seq_len * tokens (the
PaLM formula; N counts every parameter except the input embedding, output head included), divided by the
GPU's peak dense bf16 FLOP/s (a table of known GPUs, or ``--peak-tflops``). Ours computes the output head only
on agent tokens, so its real FLOPs are lower than the formula's: the MFU of both sides is counted with the
same full-model formula.

    python bench/train.py                                     # CPU, tiny 'weak' preset, SFT, DPO and pg
    python bench/train.py --method pg                          # the policy-gradient trainer only
    python bench/train.py --device cuda --preset 0.5b          # a random-init Qwen2-0.5B-shaped model, bf16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from w2s_agents.agents.models import create_tiny_model, train_tokenizer
from w2s_agents.config import from_dict
from w2s_agents.messages import SYSTEM_PROMPT, agent_message, episode_messages
from w2s_agents.trainers import (
    Example,
    TrainConfig,
    Trainer,
    collate,
    epoch_order,
    train_dpo,
    train_pg,
    train_sft,
)

PEAK_BF16_TFLOPS = {"H100 SXM": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4,
                    "GH200": 989.4, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}  # fmt: skip
"""Dense bf16 peak of known GPUs (vendor datasheets, without sparsity), matched against the device name."""

ROOMS = ["kitchen", "cellar", "garden", "attic", "pantry", "hallway", "library", "garage", "bedroom", "study"]
THINGS = ["apple", "key", "lamp", "coin", "knife", "box", "map", "rope", "book", "candle"]


def episode(i: int, obs_words: int) -> tuple[str, str, list[tuple[str, str, str | None]]]:
    """A synthetic episode of 4 agent turns with observations of about ``obs_words`` words."""
    room, thing = ROOMS[i % len(ROOMS)], THINGS[(i // 3) % len(THINGS)]
    filler = " ".join(
        f"The {ROOMS[(i + k) % 10]} has a {THINGS[(i * 7 + k) % 10]}." for k in range(obs_words // 6)
    )
    turns = [
        (f"I should look for the {thing}", "look", f"You are in the {room}. {filler}"),
        ("", f"take {thing}", f"You take the {thing}. {filler}"),
        (f"the exit is north of the {room}", "go north", f"You are in the hallway. {filler}"),
        ("", f"put {thing} on table", None),
    ]
    return (
        f"Bring the {thing} to the hallway table.",
        f"-= {room.title()} =- You are in a {room}. {filler}",
        turns,
    )


def make_data(n: int, obs_words: int) -> tuple[list[dict], list[dict], list[str]]:
    """SFT rows, preference pairs and the texts of the tokenizer (pg rows: :func:`pg_rows`)."""
    sft, pairs, texts = [], [], [SYSTEM_PROMPT]
    for i in range(n):
        instr, first, turns = episode(i, obs_words)
        msgs = episode_messages(instr, first, turns)
        sft.append({"messages": msgs, "task_id": f"bench/{i}"})
        texts.extend(m["content"] for m in msgs)
        prompt = [*episode_messages(instr, first, turns[:2])[:-1], {"role": "user", "content": turns[1][2]}]
        chosen = [agent_message("go north", turns[2][0])]
        if i % 2:
            chosen += [{"role": "user", "content": turns[2][2]}, agent_message(turns[3][1])]
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": [agent_message("go south")],
                      "task_id": f"bench/{i}"})  # fmt: skip
    return sft, pairs, texts


def pg_rows(sft: list[dict]) -> list[dict]:
    """Policy-gradient rows: each episode ending on its last action, advantages +1 and -1 in turn."""
    return [{**r, "advantage": 1.0 if i % 2 == 0 else -1.0} for i, r in enumerate(sft)]


def make_model(root: Path, preset: str, texts: list[str], vocab: int) -> Path:
    """A tiny preset through ``create_tiny_model``, or a random-init Qwen2-0.5B-shaped model ('0.5b')."""
    if preset != "0.5b":
        return create_tiny_model(root / preset, texts, preset=preset, vocab_size=vocab, seed=0)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = train_tokenizer(texts, vocab)
    config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    out = root / "qwen2-0.5b-random"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def model_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    cfg = model.config
    n = sum(p.numel() for n_, p in model.named_parameters() if "embed_tokens" not in n_)
    if getattr(cfg, "tie_word_embeddings", False):
        n += cfg.vocab_size * cfg.hidden_size  # the tied output head still computes
    return 6.0 * n + 12.0 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


def peak_flops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override * 1e12, f"--peak-tflops {override}"
    if device.type != "cuda":
        return None, "no peak known for a CPU"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12, f"{name}: {tflops} TFLOP/s bf16 dense"
    return None, f"{name}: unknown peak (give --peak-tflops)"


# ----------------------------------------------------------------------------------------------- baseline


def _token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p of each next token (0 where the label is -100): the plain full-logits way."""
    logp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return logp * (labels != -100)


def baseline(
    model_dir: Path, examples: list[Example], cfg: TrainConfig, device: torch.device, method: str
) -> tuple[float, int, float]:
    """The minimal loop: returns (tokens/s, tokens, seconds) over ``cfg.max_steps`` steps of the trainer's
    micro-batches (same order)."""
    from transformers import AutoModelForCausalLM

    bf16 = device.type == "cuda"
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    model.train()
    frozen = None
    if method == "pg":
        frozen = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
        frozen.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, fused=device.type == "cuda" or None)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    order = epoch_order(len(examples), cfg.seed, 0)
    batches = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    tokens, seconds = 0, 0.0
    for step in range(cfg.max_steps):
        t0 = time.perf_counter()
        exs = [examples[i] for i in batches[step % len(batches)]]
        b = collate(exs, pad_id=0, device=device)
        labels = b.input_ids.masked_fill(b.target_mask == 0, -100)
        with amp:
            if method in ("sft", "mcts-sft"):
                loss = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=labels).loss
            elif method == "pg":
                assert frozen is not None and b.advantages is not None
                lab = labels[:, 1:]
                mask = (lab != -100).float()
                logp = _token_logps(
                    model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1], lab
                )
                with torch.no_grad():
                    old = _token_logps(
                        frozen(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1], lab
                    )
                adv = b.advantages[:, None]
                ratio = torch.exp(logp - old)
                eps = cfg.pg.clip_eps
                surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
                delta = old - logp  # the reference is the start model
                kl = torch.exp(delta) - delta - 1
                loss = ((-surrogate + cfg.pg.kl_coef * kl) * mask).sum() / mask.sum()
            else:
                logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1]
                lab = labels[:, 1:]
                sums = _token_logps(logits, lab).sum(-1)
                chosen, rejected = sums.chunk(2)
                margin = (chosen - b.ref_chosen) - (rejected - b.ref_rejected)
                loss = -F.logsigmoid(cfg.beta * margin).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())  # one host sync per step, as the trainer's loss bookkeeping
        seconds += time.perf_counter() - t0
        tokens += sum(ex.tokens for ex in exs)
    return tokens / seconds, tokens, seconds


# ----------------------------------------------------------------------------------------------- ours


def _train(model_dir: Path, data: list[dict], out: Path, cfg: TrainConfig) -> Any:
    if cfg.method == "dpo":
        return train_dpo(model_dir, data, out, cfg, reference_path=model_dir)
    if cfg.method == "pg":
        return train_pg(model_dir, data, out, cfg, reference_path=model_dir)
    return train_sft(model_dir, data, out, cfg)


def ours(model_dir: Path, data: list[dict], cfg: TrainConfig, root: Path, run: int) -> Any:
    return _train(model_dir, data, root / f"{cfg.method}-{run}", cfg)


def captured_examples(model_dir: Path, data: list[dict], cfg: TrainConfig, root: Path) -> list[Example]:
    """The trainer's tokenized examples (the baseline trains on exactly these), from a one-step run."""
    seen: list[list[Example]] = []
    original = Trainer.run

    def capture(self: Trainer) -> Any:
        seen.append(self.examples)
        return original(self)

    Trainer.run = capture  # type: ignore[method-assign]
    try:
        one = from_dict(TrainConfig, {**_cfg_dict(cfg), "max_steps": 1})
        _train(model_dir, data, root / "capture", one)
    finally:
        Trainer.run = original  # type: ignore[method-assign]
    shutil.rmtree(root / "capture", ignore_errors=True)
    return seen[0]


def _cfg_dict(cfg: TrainConfig) -> dict[str, Any]:
    from w2s_agents.config import config_to_dict

    return config_to_dict(cfg)


def machine(device: torch.device) -> str:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (f"{os.cpu_count()} cores (nproc), CPU {cpu}{gpu}, Python {platform.python_version()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} torch threads")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--preset", default="weak", choices=["nano", "weak", "small", "strong", "base", "0.5b"])
    ap.add_argument("--method", default="all", choices=["sft", "dpo", "pg", "both", "all"],
                    help="both: sft and dpo; all: sft, dpo and pg")  # fmt: skip
    ap.add_argument("--rows", type=int, default=64, help="SFT rows and preference pairs")
    ap.add_argument("--obs-words", type=int, default=24, help="words of filler per observation")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps timed per run")
    ap.add_argument("--repeats", type=int, default=2, help="runs per side (alternating); the best counts")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s of the GPU for MFU")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    os.environ.setdefault("W2S_PROGRESS", "0")
    root = Path(tempfile.mkdtemp(prefix="w2s-bench-train-"))
    load0 = os.getloadavg()
    print(f"machine: {machine(device)}; load average {load0[0]:.2f} at start")
    results: dict[str, Any] = {"machine": machine(device), "args": vars(args)}
    try:
        sft_rows, pair_rows, texts = make_data(args.rows, args.obs_words)
        model_dir = make_model(root, args.preset, texts, 2048)
        from transformers import AutoConfig

        mcfg = AutoConfig.from_pretrained(model_dir)
        methods = {"both": ["sft", "dpo"], "all": ["sft", "dpo", "pg"]}.get(args.method, [args.method])
        for method in methods:
            cfg = from_dict(TrainConfig, {
                "method": method, "lr": 1e-4, "batch_size": args.batch_size, "max_steps": args.steps,
                "max_length": args.max_length, "valid_fraction": 0.0, "checkpoint_every": 0, "warmup_ratio": 0.0,
                "device": args.device, "log_every": 10**6, "reference": "strong",
                "pg": {"loss": "clip", "clip_eps": 0.2, "kl_coef": 0.05},
            })  # fmt: skip
            data = {"dpo": pair_rows, "pg": pg_rows(sft_rows)}.get(method, sft_rows)
            examples = captured_examples(model_dir, data, cfg, root)
            seq = sum(ex.tokens for ex in examples) / sum(len(ex.seqs) for ex in examples)
            best_ours, best_base = 0.0, 0.0
            for run in range(args.repeats):
                base_tps, _, _ = baseline(model_dir, examples, cfg, device, method)
                r = ours(model_dir, data, cfg, root, run)
                best_base, best_ours = max(best_base, base_tps), max(best_ours, r.tokens_per_second)
                print(f"  {method} run {run + 1}: ours {r.tokens_per_second:,.0f} tokens/s, "
                      f"baseline {base_tps:,.0f} tokens/s")  # fmt: skip
            ratio = best_ours / best_base
            line = (f"{method}: ours {best_ours:,.0f} tokens/s, minimal loop {best_base:,.0f} tokens/s, "
                    f"ratio {ratio:.2f}x (target >= 0.8); mean sequence {seq:.0f} tokens, "
                    f"{len(examples)} rows, batch {args.batch_size}")  # fmt: skip
            entry: dict[str, Any] = {
                "ours_tps": best_ours,
                "baseline_tps": best_base,
                "ratio": ratio,
                "seq": seq,
            }
            peak, where = peak_flops(device, args.peak_tflops)
            from transformers import AutoModelForCausalLM

            with torch.device("meta"):
                shaped = AutoModelForCausalLM.from_config(mcfg)
            fpt = model_flops_per_token(shaped, int(seq))
            entry["flops_per_token"] = fpt
            if peak:
                entry["mfu_ours"], entry["mfu_baseline"] = best_ours * fpt / peak, best_base * fpt / peak
                line += f"; MFU ours {entry['mfu_ours']:.1%}, baseline {entry['mfu_baseline']:.1%} ({where})"
            print(line)
            results[method] = entry
        load1 = os.getloadavg()
        print(f"load average {load1[0]:.2f} at the end")
        results["load"] = [load0[0], load1[0]]
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
