"""The measurements of ``bench/gpu.py``: synthetic episodes, the models, rollouts, training throughput and the
end-to-end checks. :func:`plan` lays them out as rows of the report's tables; ``gpu.run_plan`` runs them.

Every measurement goes through the project's public APIs (``load_model``, ``Agent``, ``train_sft``,
``train_dpo``) except the training-throughput rows, which time the training loop's own optimizer step
(``Trainer._setup`` and ``Trainer._step``: the loop without its checkpoints and export) and, beside it, a bare
torch loop on the same batches.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpu import SIZES, GiB, Measurement, Table

logger = logging.getLogger("gpu-check")

# ----------------------------------------------------------------------------------- synthetic episodes

ROOMS = ["kitchen", "pantry", "cellar", "garden", "hallway", "bedroom", "study", "attic", "garage", "porch",
         "library", "bathroom", "living room", "workshop"]  # fmt: skip
THINGS = ["red apple", "brass key", "old lamp", "silver coin", "kitchen knife", "wooden box", "paper map",
          "coil of rope", "blue book", "wax candle", "yellow pepper", "carrot", "cookbook", "frying pan",
          "glass jar", "iron hammer", "green bottle", "woolen scarf"]  # fmt: skip
FURNITURE = ["table", "counter", "shelf", "fridge", "chest", "sofa", "bed", "workbench", "stove", "toolbox",
             "cupboard", "desk"]  # fmt: skip
DIRECTIONS = ["north", "south", "east", "west"]
GRAMMAR = (
    "look, inventory, go <north|south|east|west>, examine <thing>, take <thing> [from <container>], "
    "put <thing> on <supporter>, insert <thing> into <container>, open <container>, close <container>, "
    "eat <thing>, drop <thing>"
)


@dataclass(frozen=True)
class Episode:
    """A synthetic text-game episode, shaped like TextWorld's: rooms of ~500 characters, ~30 commands a step."""

    instruction: str
    first: str
    turns: list[tuple[str, str, str]]  # (thought, action, observation after it)
    admissible: list[tuple[str, ...]]  # the commands admissible before each action, and after the last


def _room_text(rng: random.Random, room: str) -> tuple[str, list[tuple[str, str]]]:
    parts = [
        f"-= {room.title()} =-",
        f"You arrive in a {room}. A {rng.choice(['typical', 'dusty', 'bright'])} one.",
    ]
    placed = []
    for f in rng.sample(FURNITURE, 3):
        a, b = rng.sample(THINGS, 2)
        placed += [(a, f), (b, f)]
        parts.append(f"You see a {f}. On the {f} you can make out a {a} and a {b}.")
    for d in rng.sample(DIRECTIONS, 2):
        parts.append(f"There is an open {rng.choice(['wooden', 'screen', 'iron'])} door leading {d}.")
    parts.append(
        rng.choice(["Well, here we are.", "Hm. Oh well.", "You idly wonder how they got all this here."])
    )
    return " ".join(parts), placed


def _commands(placed: list[tuple[str, str]], carried: list[str]) -> tuple[str, ...]:
    cmds = ["look", "inventory", *(f"go {d}" for d in DIRECTIONS)]
    for thing, where in placed:
        cmds += [f"examine {thing}", f"take {thing} from {where}"]
    for where in dict.fromkeys(w for _, w in placed):
        cmds += [f"examine {where}", f"open {where}"]
    for thing in carried:
        cmds += [f"drop {thing}", f"eat {thing}"] + [
            f"put {thing} on {w}" for w in dict.fromkeys(w for _, w in placed)
        ]
    return tuple(dict.fromkeys(cmds))


def episode(i: int, steps: int) -> Episode:
    """Episode ``i`` (deterministic) with ``steps`` actions."""
    rng = random.Random(i)
    goal, target = rng.choice(THINGS), rng.choice(FURNITURE)
    room = rng.choice(ROOMS)
    first, placed = _room_text(rng, room)
    carried: list[str] = []
    turns, admissible = [], []
    for _ in range(steps):
        cmds = _commands(placed, carried)
        admissible.append(cmds)
        action = rng.choice(cmds[2:])
        thought = f"I need the {goal} for the {target}; {action} may help" if rng.random() < 0.5 else ""
        if action.startswith("go "):
            room = rng.choice(ROOMS)
            obs, placed = _room_text(rng, room)
        elif action.startswith("take "):
            thing = action[5:].split(" from ")[0]
            carried.append(thing)
            placed = [p for p in placed if p[0] != thing]
            obs = f"You take the {thing} from the {action.split(' from ')[1]}. Your score has just gone up by one point."
        else:
            obs = (
                f"You {action.split()[0]} the {action.split(' ', 1)[1]}. Nothing much happens. "
                + rng.choice(
                    ["It is a fine specimen.", "You notice nothing unusual.", "That was not very useful."]
                )
            )
        turns.append((thought, action, obs))
    admissible.append(_commands(placed, carried))
    instruction = f"Find the {goal} and put it on the {target} in the {room}. Then look around."
    return Episode(instruction, first, turns, admissible)


def tokenizer_texts(n: int = 120) -> list[str]:
    """The corpus of the check's tokenizer: episodes, system prompts and answers as the agent renders them."""
    from w2s_agents.messages import SYSTEM_PROMPT, agent_message, system_prompt

    texts = [SYSTEM_PROMPT, system_prompt(["look"], GRAMMAR)]
    for i in range(n):
        ep = episode(i, 8)
        texts += [ep.instruction, ep.first, system_prompt(ep.admissible[0], GRAMMAR)]
        for thought, action, obs in ep.turns:
            texts += [agent_message(action, thought)["content"], obs]
    return texts


# ------------------------------------------------------------------------------------------------ context


@dataclass
class Context:
    """What the measurements share: the device, the tokenizer, the built models and their data."""

    device: str
    tmp: Path
    env: dict[str, Any]
    args: Any
    models: dict[str, Path] = field(default_factory=dict)
    _tokenizer: Any = None
    _examples: dict[str, tuple[list, list]] = field(default_factory=dict)
    e2e: dict[str, Any] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def tokenizer(self) -> Any:
        """A byte-level BPE tokenizer trained on synthetic episodes (the project's ``train_tokenizer``)."""
        if self._tokenizer is None:
            from w2s_agents.agents.models import train_tokenizer

            self._tokenizer = train_tokenizer(tokenizer_texts(), vocab_size=4096)
        return self._tokenizer

    def model(self, size: str) -> Path:
        """The saved model of ``size``; raises when its build failed or was skipped."""
        if size not in self.models:
            raise RuntimeError(f"no {SIZES[size].label} model: its build failed or did not run")
        return self.models[size]

    def sync(self) -> None:
        """Wait for the device's queued work (timers read after it)."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        """Start a new peak-memory reading."""
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> str:
        """The peak device memory since :meth:`reset_peak` (``torch.cuda.max_memory_allocated``)."""
        if not self.cuda:
            return "n/a (CPU)"
        import torch

        return f"{torch.cuda.max_memory_allocated() / GiB:.1f} GiB"


def release() -> None:
    """Free what the last measurement left: Python garbage and the CUDA cache."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _fmt(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


# ------------------------------------------------------------------------------------------------ models


def build_model(ctx: Context, size: str) -> dict[str, str]:
    """Build the model of ``size`` with random weights (on the device, bf16) and save it with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config
    from transformers.utils import logging as hf_logging

    from w2s_agents.agents.models import count_parameters

    hf_logging.disable_progress_bar()
    s, tok = SIZES[size], ctx.tokenizer()
    shape = dict(
        vocab_size=max(s.vocab, len(tok)), hidden_size=s.hidden, intermediate_size=s.intermediate,
        num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
        max_position_embeddings=s.max_positions, rms_norm_eps=s.rms_norm_eps,
        tie_word_embeddings=s.tie_word_embeddings, use_sliding_window=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    try:  # transformers 5 keeps rope_theta in rope_parameters
        config = Qwen2Config(**shape, rope_parameters={"rope_type": "default", "rope_theta": s.rope_theta})
    except TypeError:
        config = Qwen2Config(**shape, rope_theta=s.rope_theta)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(ctx.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(tok, key))
    ctx.sync()
    built = time.perf_counter() - t0
    path = ctx.tmp / f"model-{size}"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    total = count_parameters(model)
    embedding = model.get_input_embeddings().weight.numel()
    ctx.models[size] = path
    disk = sum(f.stat().st_size for f in path.iterdir()) / GiB
    return {
        "parameters": f"{total / 1e9:.3f}B" if total > 1e8 else _fmt(total),
        "without embedding": f"{(total - embedding) / 1e9:.3f}B" if total > 1e8 else _fmt(total - embedding),
        "shape": f"{s.layers} layers, hidden {s.hidden}, {s.heads} heads / {s.kv_heads} KV, MLP {s.intermediate}, "
        f"vocab {config.vocab_size}, rope theta {s.rope_theta:g}, tied {s.tie_word_embeddings}",
        "built": f"{built:.1f} s, saved {disk:.2f} GiB bf16 in {time.perf_counter() - t0 - built:.1f} s",
        "note": f"attention {model.config._attn_implementation}; tokenizer {len(tok)} tokens (trained here)",
    }


# ------------------------------------------------------------------------------------------------ rollouts


def rollout_states(n: int) -> list[Any]:
    """``n`` episode states at depths 0-11: instruction, history, current observation, admissible commands."""
    from w2s_agents.types import EpisodeState

    out = []
    for i in range(n):
        depth = i % 12
        ep = episode(1000 + i, depth)
        out.append(EpisodeState(ep.instruction, ep.first, tuple(ep.turns), ep.admissible[depth], GRAMMAR))
    return out


def measure_rollout(ctx: Context, size: str, mode: str) -> dict[str, str]:
    """The agent's decisions/s and tokens/s in one mode: every state in one call, ``small_batch`` states a
    call, and one at a time."""
    from w2s_agents.agents import Agent, AgentConfig, Sampler, load_model

    s = SIZES[size]
    ctx.reset_peak()
    lm = load_model(ctx.model(size), device=ctx.device)
    # prefix cache off: repeating the same prompts would otherwise be served from it
    config = AgentConfig(mode=mode, max_new_tokens=s.new_tokens, prefix_cache=0, max_context_tokens=s.context)
    agent = Agent(lm, config)
    states = rollout_states(s.states)
    sampler = Sampler(temperature=1.0)

    def act(group: list) -> list:
        return agent.act(group, [sampler] * len(group), [random.Random(i) for i in range(len(group))])

    act(states)  # warm-up: kernels, allocator, tokenizer caches
    act(states[:1])
    rates = {}
    decisions = []
    single = max(2, s.states // (8 if mode == "choose" else 16))
    batches = (s.states, s.small_batch, 1)
    for batch in batches:
        group = states[:single] if batch == 1 else states
        ctx.sync()
        t0 = time.perf_counter()
        made = [d for i in range(0, len(group), batch) for d in act(group[i : i + batch])]
        ctx.sync()
        dt = time.perf_counter() - t0
        tokens = sum(d.tokens_out + (d.tokens_in if mode == "choose" else 0) for d in made)
        rates[batch] = (len(made) / dt, tokens / dt)
        decisions += made
    if any(d.mode != mode for d in decisions):
        raise RuntimeError(f"some decisions were made in another mode than {mode}")
    prompt = sum(d.tokens_in for d in decisions) / len(decisions)
    out_tokens = sum(d.tokens_out for d in decisions) / len(decisions)
    return {
        "states per call": " / ".join(str(b) for b in batches) + f" (1: {single} states)",
        "prompt tokens": _fmt(prompt),
        "tokens per decision": _fmt(out_tokens, 1),
        "decisions/s": " / ".join(_fmt(rates[b][0], 1) for b in batches),
        "tokens/s": " / ".join(_fmt(rates[b][1]) for b in batches),
        "batched vs 1": f"{rates[s.states][0] / rates[1][0]:.1f}x, {rates[s.small_batch][0] / rates[1][0]:.1f}x",
        "peak memory": ctx.peak(),
    }


# ------------------------------------------------------------------------------------------------ training


def _tail(enc: Any, n: int) -> Any:
    """The last ``n`` tokens of an encoded conversation (its latest agent turns); position 0 carries no loss."""
    from w2s_agents.trainers import EncodedConversation

    return EncodedConversation(enc.input_ids[-n:], [0, *enc.loss_mask[-n:][1:]], [0, *enc.turn_ids[-n:][1:]])


def train_examples(ctx: Context, size: str) -> tuple[list, list]:
    """SFT rows and DPO pairs of exactly ``seq_len`` tokens: long episodes rendered by the project's encoder
    (history cut to ``seq_len + 512`` tokens as the trainers cut it), of which the last ``seq_len`` tokens are
    kept, so that no batch is padded (as sequence packing would give)."""
    if size in ctx._examples:
        return ctx._examples[size]
    from w2s_agents.messages import episode_messages
    from w2s_agents.trainers import ChatEncoder, Example, TrainConfig, encode_sft_rows
    from w2s_agents.trainers.data import Row

    s = SIZES[size]
    encoder = ChatEncoder(ctx.tokenizer(), name="gpu-check tokenizer")
    rows = []
    for i in range(16):
        ep, steps = episode(2000 + i, 8), 8
        while True:  # long enough to be cut to seq_len tokens
            msgs = episode_messages(ep.instruction, ep.first, [*ep.turns[:-1], (*ep.turns[-1][:2], None)])
            if len(encoder.encode(msgs, origin=f"episode {i}")) > s.seq_len or steps > 400:
                break
            steps *= 2
            ep = episode(2000 + i, steps)
        rows.append(Row({"messages": msgs}, f"episode {i}"))
    encoded, _ = encode_sft_rows(rows, encoder, TrainConfig(max_length=s.seq_len + 512), {})
    seqs = [_tail(ex.seqs[0], s.seq_len) for ex in encoded]
    seqs = [q for q in seqs if len(q) == s.seq_len and q.n_loss_tokens > 0]
    if len(seqs) < 4:
        raise RuntimeError(f"only {len(seqs)} synthetic rows reach {s.seq_len} tokens")
    sft = [Example((q,), float(q.n_loss_tokens)) for q in seqs]
    pairs = [Example((seqs[i], seqs[(i + 1) % len(seqs)]), 1.0, ref=(-40.0, -42.0)) for i in range(len(seqs))]
    ctx._examples[size] = (sft, pairs)
    return sft, pairs


def _flops(model: Any, lora: bool, tokens: int, head_tokens: int) -> tuple[float, float]:
    """``(nominal, run)`` model FLOPs of ``tokens`` through forward and backward (see gpu.py's docstring)."""
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    tied = head is emb or head.data_ptr() == emb.data_ptr()
    n_lora = trainable if lora else 0
    base = total - n_lora
    body = base - emb.numel() - (0 if tied else head.numel())
    vh = head.numel()
    frozen = 4.0 if lora else 6.0
    nominal = frozen * (body + vh) * tokens + 6.0 * n_lora * tokens
    run = frozen * body * tokens + frozen * vh * head_tokens + 6.0 * n_lora * tokens
    return nominal, run


def _mfu(ctx: Context, flops: float, seconds: float) -> str:
    peak = ctx.env.get("peak_tflops")
    return f"{100 * flops / seconds / (peak * 1e12):.1f}%" if peak else ""


def measure_training(ctx: Context, size: str, method: str, lora: bool, loop: str) -> dict[str, str]:
    """Tokens/s, MFU and peak memory of optimizer steps of ``method`` (sft | dpo)."""
    import numpy as np
    import torch

    s, args = SIZES[size], ctx.args
    sft, pairs = train_examples(ctx, size)
    examples = pairs if method == "dpo" else sft
    per = s.dpo_pairs if method == "dpo" else s.sft_rows
    batches = [
        [examples[j % len(examples)] for j in range(i * per, (i + 1) * per)]
        for i in range(args.warmup + args.steps)
    ]
    ctx.reset_peak()
    if loop == "project":
        from w2s_agents.trainers import DPOObjective, LoraOptions, TrainConfig, Trainer, sft_objective

        cfg = TrainConfig(method=method, lr=1e-5, max_steps=args.warmup + args.steps, batch_size=per,
                          max_length=s.seq_len, lora=LoraOptions(enabled=lora), device=ctx.device,
                          warmup_ratio=0.0, valid_fraction=0.0, checkpoint_every=0)  # fmt: skip
        objective = DPOObjective(cfg.beta) if method == "dpo" else sft_objective
        trainer = Trainer(method=method, model_path=ctx.model(size), out_dir=ctx.tmp / f"train-{size}-{method}",
                          config=cfg, objective=objective, examples=examples, fingerprint="gpu-check",
                          resume=False)  # fmt: skip
        trainer._setup()
        state = trainer._fresh_state()
        index = {id(ex): i for i, ex in enumerate(examples)}
        model = trainer.model

        def step(batch: list) -> None:
            trainer._step([np.array([index[id(ex)] for ex in batch])], state)

        dtypes = {p.requires_grad: str(p.dtype).removeprefix("torch.") for p in model.parameters()}
        trained = f"trained weights {dtypes[True]}" + (f", frozen {dtypes[False]}" if False in dtypes else "")
        note = f"{trained}, bf16 autocast" if trainer.autocast_dtype is not None else trained
    else:
        from transformers import AutoModelForCausalLM

        dtype = torch.bfloat16 if ctx.cuda else torch.float32
        model = AutoModelForCausalLM.from_pretrained(ctx.model(size), dtype=dtype, attn_implementation="sdpa")
        model.to(ctx.device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=ctx.cuda or None)

        def step(batch: list) -> None:
            ids = torch.tensor([ex.seqs[0].input_ids for ex in batch], device=ctx.device)
            mask = torch.tensor([ex.seqs[0].loss_mask for ex in batch], device=ctx.device)
            loss = model(input_ids=ids, labels=ids.masked_fill(mask == 0, -100), use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        fused = ", AdamW fused" if ctx.cuda else ""
        note = f"weights {str(dtype).removeprefix('torch.')} (no autocast){fused}, every logit computed"
    for batch in batches[: args.warmup]:
        step(batch)
    ctx.sync()
    t0 = time.perf_counter()
    for batch in batches[args.warmup :]:
        step(batch)
    ctx.sync()
    seconds = time.perf_counter() - t0
    timed = [q for batch in batches[args.warmup :] for ex in batch for q in ex.seqs]
    tokens = sum(len(q) for q in timed)
    head = tokens - len(timed) if loop == "bare" else sum(sum(q.loss_mask[1:]) for q in timed)
    nominal, run = _flops(model, lora, tokens, head)
    attention = 12 * s.layers * s.hidden * s.seq_len * tokens
    return {
        "tokens/step": _fmt(tokens / args.steps),
        "step": f"{1000 * seconds / args.steps:.0f} ms",
        "tokens/s": _fmt(tokens / seconds),
        "MFU (nominal)": _mfu(ctx, nominal, seconds),
        "MFU (run)": _mfu(ctx, run, seconds),
        "peak memory": ctx.peak(),
        "note": "; ".join(x for x in (note, f"head on {100 * head / tokens:.0f}% of tokens",
                                       f"attention scores would add {100 * attention / nominal:.0f}%") if x),
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------ the plan


def plan(args: Any, env: dict[str, Any], tmp: Path) -> tuple[list[Table], list[Measurement]]:
    """The report's tables and the measurements that fill their rows, with their priorities: the models
    first, then the training of the largest size (the MFU target), the end-to-end checks on the smallest, the
    rollouts, and the training of the other sizes."""
    import gpu_e2e

    ctx = Context(device=args.device, tmp=tmp, env=env, args=args)
    sizes = sorted(args.sizes, key=lambda k: SIZES[k].hidden * SIZES[k].layers)
    largest, smallest = sizes[-1], sizes[0]
    models = Table("Models (random weights, built here)",
                   ["model", "parameters", "without embedding", "shape", "built", "note", "time"])  # fmt: skip
    rollouts = Table(
        "Rollouts: the project's agent (transformers backend) on states shaped like text-game episodes",
        ["model", "mode", "states per call", "prompt tokens", "tokens per decision", "decisions/s", "tokens/s",
         "batched vs 1", "peak memory", "time", "note"],
    )  # fmt: skip
    training = Table(
        f"Training throughput ({'bf16' if ctx.cuda else 'float32 on the CPU'})",
        ["model", "method", "weights", "loop", "tokens/step", "step", "tokens/s", "MFU (nominal)", "MFU (run)",
         "peak memory", "time", "note"],
    )  # fmt: skip
    e2e = Table(f"End to end on {args.device} ({SIZES[smallest].label}, the project's public APIs)",
                ["check", "result", "detail", "time"])  # fmt: skip
    out: list[Measurement] = []
    for size in sizes:
        out.append(Measurement(models, {"model": SIZES[size].label}, lambda s=size: build_model(ctx, s), 0))
    for size in sizes:
        for mode in ("choose", "generate"):
            row = {"model": SIZES[size].label, "mode": mode}
            out.append(Measurement(rollouts, row, lambda s=size, m=mode: measure_rollout(ctx, s, m), 30))
    runs = [("sft", False, "project"), ("sft", False, "bare"), ("sft", True, "project"), ("dpo", False, "project"),
            ("dpo", True, "project")]  # fmt: skip
    for size in sorted(sizes, key=lambda k: k != largest):
        for method, lora, loop in runs:
            row = {"model": SIZES[size].label, "method": method.upper(), "weights": "LoRA r64" if lora else "full",
                   "loop": "project (Trainer step)" if loop == "project" else "bare torch"}  # fmt: skip
            run = lambda s=size, m=method, lo=lora, lp=loop: measure_training(ctx, s, m, lo, lp)  # noqa: E731
            out.append(Measurement(training, row, run, 10 if size == largest else 40))
    if not args.no_e2e:
        for label, check in gpu_e2e.CHECKS:
            run = lambda c=check: c(ctx, ctx.model(smallest))  # noqa: E731
            out.append(Measurement(e2e, {"check": label}, run, 20, status_column="result"))
    seq = ", ".join(dict.fromkeys(str(SIZES[k].seq_len) for k in sizes))
    sft_rows = ", ".join(dict.fromkeys(str(SIZES[k].sft_rows) for k in sizes))
    dpo_pairs = ", ".join(dict.fromkeys(str(SIZES[k].dpo_pairs) for k in sizes))
    training.notes = [
        f"Sequences of {seq} tokens, no padding; micro-batches of {sft_rows} rows (SFT) or {dpo_pairs} pairs "
        f"(DPO, twice the sequences); {args.warmup} untimed warm-up steps, then {args.steps} timed steps (device "
        "synchronised around the timer). Tokens: every token through forward and backward. Peak memory: "
        "torch.cuda.max_memory_allocated from loading the model to the last step.",
        "MFU (nominal): 6 * N * tokens/s (full fine-tuning) or (4 * N + 6 * N_lora) * tokens/s (LoRA: frozen "
        "weights run forward and pass gradients back, but get no weight gradient), N = the parameters with the "
        "tied embedding counted once; over the dense bf16 peak. MFU (run): the output head counted only on the "
        "tokens it ran on (the project's loop scores agent tokens only). Attention-score FLOPs are left out.",
        "Project loop: the Trainer's own optimizer step (collate, bf16 autocast with float32 trainable weights, "
        "agent-token log-probs, clipping, fused AdamW, schedule). Bare torch: bf16 weights, "
        "model(input_ids, labels).loss over every logit, clipping, fused AdamW, on the same batches.",
    ]
    rollouts.notes = [
        "decisions/s and tokens/s at each number of states per agent call: all the states in one call, then in "
        "calls of the engine's default batch, then one at a time (on fewer states); after a warm-up call. "
        "tokens/s: choose mode, prompt and candidate tokens scored; generate mode, tokens generated (random weights never end an answer early: "
        "every answer runs to max_new_tokens). Sampling at temperature 1; the prefix cache is off (the same "
        "prompts are decided repeatedly). Peak memory from loading the model to the last call.",
    ]
    return [models, rollouts, training, e2e], out


def resume_child(job_file: Path) -> int:
    """The child process of the kill-and-resume check (see :func:`gpu_e2e.kill_and_resume`)."""
    import gpu_e2e

    return gpu_e2e.resume_child(job_file)
