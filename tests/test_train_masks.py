"""Agent-token masks and history truncation: checked against the template's {% generation %} markers, a
ChatML template without markers, pad == eos, and hand-counted cuts."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from w2s_agents.errors import DataFormatError
from w2s_agents.messages import agent_message, episode_messages
from w2s_agents.trainers import (
    ChatEncoder,
    Example,
    PairPlan,
    collate,
    fit_conversation,
    fit_pair,
    load_tokenizer,
    pair_messages,
)
from w2s_agents.trainers.data import load_pairs, load_sft_rows, split_by_task
from w2s_agents.types import Source, Step, Trajectory

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""A Qwen-style template without {% generation %} markers."""


@pytest.fixture(scope="module")
def tokenizer(train_models: dict[str, Path]):
    return load_tokenizer(train_models["policy"])


@pytest.fixture(scope="module")
def chatml_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = CHATML
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tok


def _hf_assistant_mask(tok, messages) -> tuple[list[int], list[int]]:
    out = tok.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return list(out["input_ids"]), list(out["assistant_masks"])


def _decoded_turns(tok, enc) -> list[str]:
    """The text of each scored turn, decoded from the masked tokens."""
    turns: dict[int, list[int]] = {}
    for tid, turn, flag in zip(enc.input_ids, enc.turn_ids, enc.loss_mask, strict=True):
        assert bool(turn) == bool(flag)
        if flag:
            turns.setdefault(turn, []).append(tid)
    return [tok.decode(turns[k]) for k in sorted(turns)]


def test_prefix_masks_equal_the_generation_markers_mask(tokenizer, sft_rows: list[dict]) -> None:
    enc = ChatEncoder(tokenizer)
    assert enc.has_generation_markers
    for row in sft_rows[:4]:
        got = enc.encode(row["messages"])
        ids, mask = _hf_assistant_mask(tokenizer, row["messages"])
        assert got.input_ids == ids
        assert got.loss_mask == mask
        assert got.n_turns == 3  # several agent turns per row, each scored
        contents = [m["content"] + "<|end|>" for m in row["messages"] if m["role"] == "assistant"]
        assert _decoded_turns(tokenizer, got) == contents


def test_masks_without_generation_markers(chatml_tokenizer, sft_rows: list[dict]) -> None:
    enc = ChatEncoder(chatml_tokenizer)
    assert not enc.has_generation_markers
    msgs = sft_rows[0]["messages"]
    got = enc.encode(msgs)
    assert (
        got.input_ids
        == chatml_tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
    )
    contents = [m["content"] + "<|im_end|>" for m in msgs if m["role"] == "assistant"]
    assert _decoded_turns(chatml_tokenizer, got) == contents
    unmasked = chatml_tokenizer.decode(
        [t for t, f in zip(got.input_ids, got.loss_mask, strict=True) if not f]
    )
    for m in msgs:
        if m["role"] != "assistant":
            assert m["content"] in unmasked  # system, task and observations carry no loss
    assert "<|im_start|>assistant\n" in unmasked  # nor does the assistant header


def test_pair_masks_score_only_the_completion_agent_turns(tokenizer, chatml_tokenizer, pair_rows) -> None:
    row = pair_rows[1]  # continuation level: action, observation, action
    assert [m["role"] for m in row["chosen"]] == ["assistant", "user", "assistant"]
    for tok, end in ((tokenizer, "<|end|>"), (chatml_tokenizer, "<|im_end|>")):
        chosen, _, score_from = pair_messages(row)
        got = ChatEncoder(tok).encode(chosen, score_from=score_from)
        assert _decoded_turns(tok, got) == [
            m["content"] + end for m in row["chosen"] if m["role"] == "assistant"
        ]
        observation = row["chosen"][1]["content"]
        unmasked = tok.decode([t for t, f in zip(got.input_ids, got.loss_mask, strict=True) if not f])
        assert observation in unmasked
        assert row["prompt"][2]["content"] in unmasked  # the prompt's own agent turn is context only


def test_a_template_that_is_not_prefix_consistent(tokenizer, sft_rows: list[dict]) -> None:
    msgs = sft_rows[0]["messages"]
    with_markers = copy.deepcopy(tokenizer)
    with_markers.chat_template = tokenizer.chat_template + "{{ '<|pad|>' }}"  # a suffix after the last turn
    got = ChatEncoder(with_markers).encode(msgs)  # falls back to the {% generation %} mask
    ids, mask = _hf_assistant_mask(with_markers, msgs)
    assert (got.input_ids, got.loss_mask) == (ids, mask)
    without = copy.deepcopy(tokenizer)
    without.chat_template = CHATML + "{{ '<|pad|>' }}"
    with pytest.raises(DataFormatError, match=r"^rows\[3\]: the chat template .* prefixes"):
        ChatEncoder(without).encode(msgs, origin="rows[3]")


def test_pad_equal_to_eos_keeps_the_loss_on_end_of_turn_tokens(tokenizer, sft_rows: list[dict]) -> None:
    import torch

    tok = copy.deepcopy(tokenizer)
    tok.pad_token = tok.eos_token
    enc = ChatEncoder(tok)
    short = episode_messages("Escape.", "A door.", [("", "go north", None)])
    examples = [Example((enc.encode(short),), 1.0), Example((enc.encode(sft_rows[2]["messages"]),), 1.0)]
    batch = collate(examples, tok.pad_token_id, device=torch.device("cpu"))
    ids, attn, target = batch.input_ids, batch.attention_mask, batch.target_mask
    eos = tok.eos_token_id
    n = len(examples[0].seqs[0])
    assert n < ids.shape[1]
    assert (ids[0, n:] == eos).all()  # padded with the eos id ...
    assert not attn[0, n:].any() and not target[0, n:].any()  # ... which is neither attended nor scored
    for i, turns in ((0, 1), (1, 3)):
        scored_eos = [t for t in range(ids.shape[1]) if ids[i, t] == eos and target[i, t]]
        assert len(scored_eos) == turns  # the end-of-turn token of each agent turn carries loss
    assert target.sum() == sum(ex.seqs[0].n_loss_tokens for ex in examples)


def test_history_is_cut_from_the_oldest_turns(tokenizer) -> None:
    turns = [(f"step {k}", f"take coin {k}", f"You take coin {k}. The kitchen is quiet.") for k in range(20)]
    msgs = episode_messages(
        "Collect coins.", "-= Kitchen =- You are in a kitchen.", [*turns, ("", "go north", None)]
    )
    enc = ChatEncoder(tokenizer)
    full = enc.length(msgs)
    fitted = fit_conversation(enc, msgs, full // 3)
    assert fitted is not None
    got, dropped = fitted
    assert len(got) <= full // 3 and dropped > 0
    kept = msgs[:2] + msgs[2 + 2 * dropped :]
    assert got.input_ids == enc.encode(kept).input_ids  # whole units dropped, oldest first
    assert kept[:2] == msgs[:2]  # system and task turns kept
    assert kept[-2:] == msgs[-2:]  # the final agent turn and the observation it answered
    assert fit_conversation(enc, msgs, full - 1)[1] == 1  # one unit less is enough
    assert fit_conversation(enc, msgs, full)[1] == 0
    assert fit_conversation(enc, msgs, 30) is None  # system + task alone do not fit


def test_pair_cut_fits_every_tokenizer(tokenizer, chatml_tokenizer) -> None:
    turns = [(f"step {k}", f"take coin {k}", f"You take coin {k}.") for k in range(12)]
    prompt = episode_messages("Collect coins.", "-= Kitchen =- You are in a kitchen.", turns)
    chosen = [agent_message("go north"), {"role": "user", "content": "You are in the garden. " * 3},
              agent_message("take box"), {"role": "user", "content": "You take the box."}, agent_message("win")]  # fmt: skip
    row = {"prompt": prompt, "chosen": chosen, "rejected": [agent_message("go south")]}
    encs = [ChatEncoder(tokenizer), ChatEncoder(chatml_tokenizer)]
    whole = max(e.length(pair_messages(row)[0]) for e in encs)
    assert fit_pair(encs, row, whole) == PairPlan(0, 5, 1)
    limit = whole - 40
    plan = fit_pair(encs, row, limit)
    assert plan is not None and plan.prompt_dropped > 0 and plan.chosen_kept == 5
    for e in encs:
        for msgs in pair_messages(row, plan)[:2]:
            assert e.length(msgs) <= limit
    looser = PairPlan(plan.prompt_dropped - 1, 5, 1)
    assert any(e.length(pair_messages(row, looser)[0]) > limit for e in encs)  # the least cut
    # with the whole prompt history dropped, the continuation loses trailing units
    short_prompt = pair_messages(row, PairPlan(11, 1, 1))[0]
    tight = max(e.length(short_prompt) for e in encs) + 3
    plan = fit_pair(encs, row, tight)
    assert plan == PairPlan(11, 1, 1)
    assert fit_pair(encs, row, 20) is None


def test_rows_are_validated_with_file_and_line(tmp_path: Path, sft_rows, pair_rows) -> None:
    f = tmp_path / "sft.jsonl"
    f.write_text(json.dumps(sft_rows[0]) + "\n\n" + "{oops\n")
    with pytest.raises(DataFormatError, match=r"sft\.jsonl:3: invalid JSON"):
        load_sft_rows(f)
    bad = dict(sft_rows[0], messages=sft_rows[0]["messages"][:-1])
    f.write_text(json.dumps(sft_rows[0]) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataFormatError, match=r"sft\.jsonl:2: 'messages' must end with an assistant"):
        load_sft_rows(f)
    with pytest.raises(DataFormatError, match=r"rows\[0\]: .*'messages\[1\]'"):
        load_sft_rows([{"messages": [{"role": "system", "content": "x"}, {"role": "tool", "content": "y"}]}])
    with pytest.raises(DataFormatError, match=r"rows\[0\]: an SFT row needs 'messages'"):
        load_sft_rows(pair_rows[:1])
    with pytest.raises(DataFormatError, match=r"rows\[1\]: 'prompt' must end with a user turn"):
        load_pairs([pair_rows[0], dict(pair_rows[1], prompt=pair_rows[1]["prompt"][:-1])])
    with pytest.raises(DataFormatError, match=r"pairs file not found: .*missing.jsonl"):
        load_pairs(tmp_path / "missing.jsonl")
    rows = load_pairs(pair_rows)
    assert rows[0].sources == ("weak-a", "weak-b") and rows[0].easy  # both branches from both sources
    assert rows[1].sources == ("weak-a",) and rows[1].easy
    assert rows[2].sources == ("weak-a", "weak-b") and not rows[2].easy  # the branches' sources differ


def test_pairs_with_equal_sides_are_dropped_and_all_equal_is_refused(
    tmp_path: Path, pair_rows, caplog
) -> None:
    same = [dict(r, rejected=r["chosen"]) for r in pair_rows[:3]]
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in [pair_rows[5], same[0], pair_rows[6], same[1]]))
    with caplog.at_level("WARNING", logger="w2s_agents"):
        rows = load_pairs(f)
    assert [r.origin for r in rows] == [f"{f}:1", f"{f}:3"]
    assert f"2 of 4 pairs have 'chosen' equal to 'rejected' (the first at {f}:2)" in caplog.text
    f.write_text("".join(json.dumps(r) + "\n" for r in same))
    with pytest.raises(
        DataFormatError, match=rf"{f}:1: 'chosen' equals 'rejected' in every pair .*\(3 pairs\)"
    ):
        load_pairs(f)


def test_trajectory_files_become_sft_rows(tmp_path: Path) -> None:
    def traj(seed: int, won: bool) -> Trajectory:
        steps = (Step("open door", "The door opens.", thought="it is closed"), Step("go north", "You win."))
        return Trajectory("tw/0", "w2s/Toy-v0", Source("expert", "expert", seed=seed), "Escape.", "A door.",
                          steps, 1.0 if won else 0.0, won, "won" if won else "lost")  # fmt: skip

    f = tmp_path / "demos.jsonl"
    f.write_text("".join(json.dumps(traj(s, s != 2).to_dict()) + "\n" for s in range(3)))
    rows = load_sft_rows(f)
    assert len(rows) == 2  # the lost episode is left out
    msgs = rows[0].data["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert msgs[2]["content"] == "Thought: it is closed\nAction: open door"
    assert msgs[3]["content"] == "The door opens." and msgs[4]["content"] == "go north"
    assert len(load_sft_rows(f, success_only=False)) == 3


def test_split_by_task_holds_out_whole_tasks(sft_rows) -> None:
    rows = load_sft_rows(sft_rows)
    train, valid = split_by_task(rows, 0.34, seed=0)
    tasks_v = {r.data["task_id"] for r in valid}
    assert len(tasks_v) == 2 and not tasks_v & {r.data["task_id"] for r in train}
    assert split_by_task(list(reversed(rows)), 0.34, seed=0)[1][0].data["task_id"] in tasks_v
    assert split_by_task(rows, 0.0, seed=0) == (rows, [])
