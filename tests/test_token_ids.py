"""Tokens in, tokens out: agents record the token ids of their answers, the store keeps them (schema 2), trees
and the rows made of them (SFT rows, pairs, policy-gradient rows) carry them, and the SFT, DPO and PG trainers
train on them instead of re-tokenising the text where the tokenizer matches."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from w2s_agents.agents import Agent, AgentConfig, Sampler
from w2s_agents.agents.models import load_model
from w2s_agents.agents.prompts import answer_affixes
from w2s_agents.config import config_to_dict, from_dict
from w2s_agents.errors import DataFormatError
from w2s_agents.messages import episode_messages
from w2s_agents.search.rows import SftRow
from w2s_agents.store import TrajectoryStore, read_trajectories
from w2s_agents.tokens import tokenizer_fingerprint
from w2s_agents.trainers import ChatEncoder, TrainConfig, load_tokenizer, train_sft
from w2s_agents.trainers.data import load_sft_rows
from w2s_agents.trainers.sft import encode_sft_rows
from w2s_agents.trainers.token_ids import TokenIdsUse, recorded_for_messages
from w2s_agents.types import TOKENS_SCHEMA, TRAJECTORY_SCHEMA, EpisodeState, Source, Step, Trajectory

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EPISODE = (
    "Bring the apple north.",
    "-= Kitchen =- You are in a kitchen.",
    [
        ("I should look around first", "look", "You are in the kitchen. You see a apple."),
        ("", "take apple", "You take the apple."),
        ("the apple goes north", "go north", None),
    ],
)


@pytest.fixture(scope="module")
def tok(train_models: dict[str, Path]):
    return load_tokenizer(train_models["policy"])


def _answer_ids(tok, content: str) -> list[int]:
    """The answer as choose mode scores it: the tokenizer's ids of the turn through its end-of-turn token."""
    before, after = answer_affixes(tok)
    ids = list(tok(before + content + after, add_special_tokens=False)["input_ids"])
    return ids[: ids.index(tok.convert_tokens_to_ids("<|end|>")) + 1]


def _split_a_word(tok, ids: list[int]) -> list[int]:
    """``ids`` with its first multi-character word token written as one token per character: the same text, not
    the tokenizer's own tokenization of it (what a sampled answer can be)."""
    for k, t in enumerate(ids):
        piece = tok.convert_ids_to_tokens(t)
        if len(piece) > 2 and piece.isalpha():
            chars = tok.convert_tokens_to_ids(list(piece))
            assert tok.unk_token_id not in chars
            return ids[:k] + chars + ids[k + 1 :]
    raise AssertionError("no word token to split")


def _recorded(tok, messages, *, fingerprint: str, drift: bool = False) -> list[dict | None]:
    out = []
    for m in messages:
        if m["role"] == "assistant":
            ids = _answer_ids(tok, m["content"])
            out.append({"ids": _split_a_word(tok, ids) if drift else ids, "tokenizer": fingerprint})
    return out


def _labels(enc) -> list[int]:
    return [t if m else -100 for t, m in zip(enc.input_ids, enc.loss_mask, strict=True)]


# ------------------------------------------------------------------------------------------- trainer rows


def test_recorded_ids_equal_to_the_tokenizers_give_identical_rows(tok) -> None:
    messages = episode_messages(*EPISODE)
    encoder = ChatEncoder(tok)
    plain = encoder.encode(messages)
    fp = tokenizer_fingerprint(tok)
    recorded = recorded_for_messages(messages, _recorded(tok, messages, fingerprint=fp), fp)
    assert recorded is not None and sum(r is not None for r in recorded) == 3
    spliced = encoder.encode(messages, recorded=recorded)
    assert spliced.input_ids == plain.input_ids
    assert _labels(spliced) == _labels(plain) and spliced.turn_ids == plain.turn_ids
    assert (spliced.recorded_turns, spliced.refused_turns, plain.recorded_turns) == (3, 0, 0)


def test_a_drifting_answer_trains_on_the_recorded_ids(tok) -> None:
    messages = episode_messages(*EPISODE)
    encoder = ChatEncoder(tok)
    fp = tokenizer_fingerprint(tok)
    rows = _recorded(tok, messages, fingerprint=fp, drift=True)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    # the drift: re-tokenising the decoded answer does not give back the ids the model produced
    for entry, content in zip(rows, answers, strict=True):
        assert tok.decode(entry["ids"], skip_special_tokens=True) == content
        assert _answer_ids(tok, content) != entry["ids"]
    plain = encoder.encode(messages)
    spliced = encoder.encode(messages, recorded=recorded_for_messages(messages, rows, fp))
    assert (spliced.recorded_turns, spliced.refused_turns) == (3, 0)
    assert spliced.input_ids != plain.input_ids
    assert len(spliced.input_ids) == len(plain.input_ids) + sum(
        len(e["ids"]) - len(_answer_ids(tok, c)) for e, c in zip(rows, answers, strict=True)
    )
    # the loss falls on exactly the recorded ids of each turn (end-of-turn token included)
    for turn, entry in enumerate(rows, 1):
        scored = [t for t, k in zip(spliced.input_ids, spliced.turn_ids, strict=True) if k == turn]
        assert scored == entry["ids"]
    # and everything outside the agent turns is tokenized as before
    outside = [t for t, m in zip(spliced.input_ids, spliced.loss_mask, strict=True) if not m]
    assert outside == [t for t, m in zip(plain.input_ids, plain.loss_mask, strict=True) if not m]


def test_another_tokenizers_ids_are_not_used(tok, train_models: dict[str, Path]) -> None:
    messages = episode_messages(*EPISODE)
    weak_fp = tokenizer_fingerprint(load_tokenizer(train_models["weak"]))
    assert weak_fp != tokenizer_fingerprint(tok)
    use = TokenIdsUse()
    rows = _recorded(tok, messages, fingerprint=weak_fp, drift=True)
    assert recorded_for_messages(messages, rows, tokenizer_fingerprint(tok), use) is None
    assert use.turns == {"tokenizer": 3}
    # through the trainer's row encoding: the row is re-tokenised and counted so
    row = {"messages": messages, "task_id": "t", "agent_tokens": rows}
    encoder = ChatEncoder(tok)
    examples, _ = encode_sft_rows(load_sft_rows([row]), encoder, from_dict(TrainConfig, {}), {}, use)
    assert examples[0].seqs[0].input_ids == encoder.encode(messages).input_ids
    assert (use.recorded_rows, use.retokenised_rows) == (0, 1)


def test_the_fingerprint_survives_a_save_and_tells_tokenizers_apart(tok, tmp_path: Path) -> None:
    tok.save_pretrained(tmp_path / "copy")  # as an exported model's folder holds it
    assert tokenizer_fingerprint(load_tokenizer(tmp_path / "copy")) == tokenizer_fingerprint(tok)
    other = load_tokenizer(tmp_path / "copy")
    other.chat_template = tok.chat_template.replace("<|assistant|>", "<|agent|>")
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tok)


def test_an_answer_whose_text_differs_keeps_what_matches(tok) -> None:
    messages = episode_messages(*EPISODE)
    encoder = ChatEncoder(tok)
    fp = tokenizer_fingerprint(tok)
    content = messages[2]["content"]
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    # generated up to the end of its Action line (no end-of-turn token): the ids cover the message content
    cut = list(tok(content, add_special_tokens=False)["input_ids"]) + newline
    cut = _split_a_word(tok, cut)
    # an answer the parser rewrote: its text is not the message's
    other = list(tok("Thought: something else\nAction: look", add_special_tokens=False)["input_ids"])
    rows = [{"ids": cut, "tokenizer": fp}, {"ids": other, "tokenizer": fp}, None]
    spliced = encoder.encode(messages, recorded=recorded_for_messages(messages, rows, fp))
    assert (spliced.recorded_turns, spliced.refused_turns) == (1, 1)
    first = [t for t, k in zip(spliced.input_ids, spliced.turn_ids, strict=True) if k == 1]
    assert first == cut[:-1] + _answer_ids(tok, "")  # the recorded content, then the end-of-turn token
    plain = encoder.encode(messages)
    assert [t for t, k in zip(spliced.input_ids, spliced.turn_ids, strict=True) if k == 2] == [
        t for t, k in zip(plain.input_ids, plain.turn_ids, strict=True) if k == 2
    ]


def test_sft_rows_of_trajectories_carry_their_ids_and_training_reports_the_path(
    tok, train_models: dict[str, Path], tmp_path: Path
) -> None:
    fp = tokenizer_fingerprint(tok)
    trajs = []
    for i in range(4):
        messages = episode_messages(*EPISODE)
        recorded = _recorded(tok, messages, fingerprint=fp, drift=True)
        steps = [
            Step(action=a, observation=o or "You win.", thought=t, token_ids=r["ids"], tokenizer=fp)
            if i % 2 == 0
            else Step(action=a, observation=o or "You win.", thought=t)
            for (t, a, o), r in zip(EPISODE[2], recorded, strict=True)
        ]
        trajs.append(_traj(f"t{i}", steps, success=True))
    path = tmp_path / "demos.jsonl"
    with TrajectoryStore(path) as store:
        for t in trajs:
            store.append(t)
    rows = load_sft_rows(path)
    assert [r.data.get("agent_tokens") is not None for r in rows] == [True, False, True, False]
    assert SftRow.from_dict(rows[0].data).to_dict() == rows[0].data  # the field survives a row file
    cfg = from_dict(TrainConfig, {"lr": 1e-3, "batch_size": 2, "max_length": 256, "max_steps": 1,
                                  "valid_fraction": 0.0, "checkpoint_every": 0, "warmup_ratio": 0.0})  # fmt: skip
    result = train_sft(train_models["policy"], path, tmp_path / "run", cfg)
    expected = {"recorded_rows": 2, "retokenised_rows": 2, "turns": {"recorded": 6}}
    assert result.extra["token_ids"] == expected
    assert json.loads((tmp_path / "run" / "result.json").read_text())["extra"]["token_ids"] == expected


def test_bad_agent_tokens_in_a_row_name_the_row() -> None:
    messages = episode_messages(*EPISODE)
    with pytest.raises(DataFormatError, match=r"rows\[0\]: 'agent_tokens' must be a list with one entry"):
        load_sft_rows([{"messages": messages, "agent_tokens": [None]}])
    with pytest.raises(DataFormatError, match=r"rows\[0\]: 'agent_tokens\[1\]' must be null or"):
        load_sft_rows([{"messages": messages, "agent_tokens": [None, {"ids": [-1], "tokenizer": "x"}, None]}])


# ------------------------------------------------------------------------------------------- store


def _traj(task: str, steps: list[Step], *, success: bool = False) -> Trajectory:
    return Trajectory(
        task_id=task,
        env_id="w2s/Toy-v0",
        source=Source("weak", "weak", seed=0),
        instruction=EPISODE[0],
        initial_observation=EPISODE[1],
        steps=tuple(steps),
        return_=1.0 if success else 0.0,
        success=success,
        end="won" if success else "truncated",
    )


def test_token_ids_round_trip_through_the_store(tmp_path: Path) -> None:
    with_ids = _traj("a", [Step("look", "ok", token_ids=[5, 6, 2], logprobs=[-0.5, -1.25, -0.1], tokenizer="f1"),
                           Step("go", "ok")])  # fmt: skip
    without = _traj("b", [Step("look", "ok")])
    path = tmp_path / "t.jsonl"
    with TrajectoryStore(path) as store:
        store.append(with_ids)
        store.append(without)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["schema"] for r in lines] == [TOKENS_SCHEMA, TRAJECTORY_SCHEMA]
    assert "token_ids" not in lines[0]["steps"][1] and "token_ids" not in json.dumps(lines[1])
    back = list(read_trajectories(path))
    assert back[0].steps == with_ids.steps and back[1] == without
    assert back[0].steps[0].token_ids == (5, 6, 2) and back[0].steps[0].logprobs == (-0.5, -1.25, -0.1)
    assert back[0].to_dict() == lines[0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.update(schema=TRAJECTORY_SCHEMA), r"t.jsonl:1: .*'steps\[0\].token_ids' needs schema"),
        (lambda r: r["steps"][0].update(logprobs=[-1.0]), r"t.jsonl:1: .*steps\[0\]: logprobs has 1 numbers"),
        (lambda r: r["steps"][0].pop("tokenizer"), r"t.jsonl:1: .*steps\[0\]: tokenizer must name"),
        (lambda r: r["steps"][0].update(token_ids=[1, "x"]), r"t.jsonl:1: .*token_ids must hold"),
        (lambda r: r.update(schema="w2s.trajectory/3"), r"t.jsonl:1: .*unsupported trajectory schema"),
    ],
)
def test_bad_token_fields_are_refused_with_file_and_line(tmp_path: Path, change, message: str) -> None:
    record = _traj(
        "a", [Step("look", "ok", token_ids=[5, 6], logprobs=[-0.5, -1.0], tokenizer="f")]
    ).to_dict()
    change(record)
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(DataFormatError, match=message):
        list(read_trajectories(path))


# ------------------------------------------------------------------------------------------- agent


@pytest.fixture(scope="module")
def nano(nano_model_dir: Path):
    return load_model(nano_model_dir)


def _state() -> EpisodeState:
    return EpisodeState(
        "Take the apple.",
        "-= Kitchen =- You are in a kitchen. You see an apple on the table.",
        (("", "go north", "You are in room 0."),),
        ("take apple", "go north", "look"),
    )


def test_the_switch_is_off_by_default_and_out_of_the_config_keys() -> None:
    assert "record_tokens" not in config_to_dict(AgentConfig())
    assert config_to_dict(AgentConfig(record_tokens=True))["record_tokens"] is True


def test_the_agent_records_its_answers_tokens_in_both_modes(nano) -> None:
    off = Agent(nano, AgentConfig(mode="choose")).act([_state()], [Sampler()], [random.Random(0)])[0]
    assert off.token_ids is None and off.logprobs is None and off.tokenizer is None
    fp = tokenizer_fingerprint(nano.tokenizer)

    chooser = Agent(nano, AgentConfig(mode="choose", record_tokens=True))
    d = chooser.act([_state()], [Sampler(temperature=1.0)], [random.Random(1)])[0]
    assert d.token_ids == tuple(chooser.completion_ids(d.action)) and d.tokenizer == fp
    scores = dict(zip(_state().admissible, chooser.score_actions([_state()])[0], strict=True))
    assert sum(d.logprobs) == pytest.approx(scores[d.action], abs=1e-4)

    writer = Agent(nano, AgentConfig(mode="generate", record_tokens=True, max_new_tokens=6))
    g = writer.act([_state(), _state()], [Sampler(temperature=1.0)] * 2, [random.Random(2), random.Random(3)])
    for d in g:
        assert d.tokenizer == fp and len(d.token_ids) == d.tokens_out == len(d.logprobs)
        text_ids = [t for t in d.token_ids if t not in writer.stop_ids]
        assert nano.tokenizer.decode(text_ids, skip_special_tokens=True) == d.raw_output
        assert all(lp <= 0 for lp in d.logprobs)
    # the log-probs are the model's own, as one forward pass over prompt + answer gives them
    prompt = writer.prompts.build(_state(), writer.max_context - writer.config.max_new_tokens).ids
    ids = list(g[0].token_ids)
    with torch.no_grad():
        logp = nano.model(torch.tensor([prompt + ids])).logits[0].float().log_softmax(-1)
    expect = [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(ids)]
    assert list(g[0].logprobs) == pytest.approx(expect, abs=1e-4)


class _Hall:
    """A two-move game: any two commands win it."""

    env_id = "test/Hall-v0"
    command_grammar = "go east, look"

    @property
    def unwrapped(self) -> _Hall:
        return self

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[str, dict]:
        self.moves = 0
        info = {"admissible_commands": ["go east", "look"], "instruction": "Leave the hall.", "score": 0.0}
        return "You are in a hall.", info

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        self.moves += 1
        won = self.moves >= 2
        info = {
            "admissible_commands": ["go east", "look"],
            "won": won,
            "lost": False,
            "score": self.moves / 2,
        }
        return f"Move {self.moves}.", 0.5, won, False, info


def test_a_rollout_stores_the_ids_and_the_trainer_uses_them(nano, tmp_path: Path) -> None:
    from w2s_agents.rollout import collect

    agent = Agent(nano, AgentConfig(mode="choose", record_tokens=True, max_context_tokens=512))
    with TrajectoryStore(tmp_path / "t.jsonl") as store:
        collect(["hall/0"], agent, [Sampler(temperature=1.0)], store, env=_Hall, seeds=2, max_steps=3)
    records = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert [r["schema"] for r in records] == [TOKENS_SCHEMA] * 2
    trajs = list(read_trajectories(tmp_path / "t.jsonl"))
    fp = tokenizer_fingerprint(nano.tokenizer)
    for step in (s for t in trajs for s in t.steps):
        assert step.token_ids == tuple(agent.completion_ids(step.action)) and step.tokenizer == fp
        assert len(step.logprobs) == len(step.token_ids)
    use = TokenIdsUse()
    encoder = ChatEncoder(nano.tokenizer)
    examples, _ = encode_sft_rows(load_sft_rows(tmp_path / "t.jsonl"), encoder, TrainConfig(), {}, use)
    # choose mode records the tokenizer's own ids of each command: both paths give the same rows
    assert (use.recorded_rows, use.retokenised_rows, use.turns) == (2, 0, {"recorded": 4})
    for ex, traj in zip(examples, trajs, strict=True):
        assert ex.seqs[0].input_ids == encoder.encode(SftRow.from_trajectory(traj).messages).input_ids


# ------------------------------------------------------------------------------------------- trees


def test_tree_nodes_keep_the_ids_of_their_kept_thought_and_best_paths_carry_them(tmp_path: Path) -> None:
    from w2s_agents.search import node_values
    from w2s_agents.search.extract import best_path_row
    from w2s_agents.tree import TrajectoryTree

    def steps(thought: str, ids: list[int] | None) -> list[Step]:
        first = Step(
            "look", "You see a door.", thought=thought, token_ids=ids, tokenizer="fp" if ids else None
        )
        end = Step(
            "open door", "You win.", token_ids=[9, 2] if ids else None, tokenizer="fp" if ids else None
        )
        return [first, end]

    low = _traj("t", steps("a", [1, 2]), success=False)
    high = Trajectory(**{**low.__dict__, "steps": tuple(steps("b", [3, 4, 2])), "return_": 1.0,
                         "success": True, "end": "won", "source": Source("weak", "weak", seed=1)})  # fmt: skip
    plain = Trajectory(
        **{**low.__dict__, "steps": tuple(steps("c", None)), "source": Source("weak", "weak", seed=2)}
    )
    tree = TrajectoryTree("t", env_id="w2s/Toy-v0", instruction=EPISODE[0])
    tree.extend([low, high, plain])
    (look,) = [n for n in range(1, len(tree._key)) if tree.action(n) == "look"]
    # the node keeps the thought of the highest-return trajectory, and the ids of that same answer
    assert tree.thought(look) == "b" and tree.agent_tokens(look) == {"ids": [3, 4, 2], "tokenizer": "fp"}
    tree.save(tmp_path / "t.json")
    back = TrajectoryTree.load(tmp_path / "t.json")
    assert [back.node(n) for n in range(len(back._key))] == [tree.node(n) for n in range(len(tree._key))]
    row = best_path_row(back, node_values(back, "mean"))
    assert row is not None and row.agent_tokens == ({"ids": [3, 4, 2], "tokenizer": "fp"},
                                                    {"ids": [9, 2], "tokenizer": "fp"})  # fmt: skip
    # a tree without recorded ids saves as before: no such attribute
    bare = TrajectoryTree("t", env_id="w2s/Toy-v0", instruction=EPISODE[0])
    bare.add(plain)
    assert all("agent_tokens" not in bare.node(n) for n in range(len(bare._key)))
    record = json.loads((tmp_path / "t.json").read_text())
    record["nodes"][1]["agent_tokens"] = {"ids": [], "tokenizer": "fp"}
    (tmp_path / "bad.json").write_text(json.dumps(record))
    with pytest.raises(DataFormatError, match=r"bad.json.*attribute 'agent_tokens' must be"):
        TrajectoryTree.load(tmp_path / "bad.json")


# ------------------------------------------------------------------------------------------- DPO and PG


def _pair_row(tok, fingerprint: str, *, drift: bool = True) -> dict:
    """A step pair of the episode: the prompt holds the first agent turn, chosen and rejected one answer each;
    every agent turn recorded (with drift: not as the tokenizer spells it)."""
    messages = episode_messages(*EPISODE)
    prompt, chosen, rejected = messages[:4], [messages[4]], [messages[6]]
    tokens = {
        key: _recorded(tok, part, fingerprint=fingerprint, drift=drift)
        for key, part in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected))
    }
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "task_id": "t", "agent_tokens": tokens}


@pytest.fixture(scope="module")
def policy_lm(train_models: dict[str, Path]):
    return load_model(train_models["policy"])


def _logp_of(lm, context: list[int], ids: list[int]) -> float:
    """The model's log-probability of ``ids`` after ``context``, from one forward pass."""
    with torch.no_grad():
        logp = lm.model(torch.tensor([context + ids])).logits[0].float().log_softmax(-1)
    return sum(float(logp[len(context) - 1 + i, t]) for i, t in enumerate(ids))


def _scored(enc, turn: int = 1) -> list[int]:
    return [t for t, k in zip(enc.input_ids, enc.turn_ids, strict=True) if k == turn]


def test_dpo_pairs_and_the_reference_score_the_recorded_ids(tok, policy_lm, train_models) -> None:
    from w2s_agents.trainers import DPOObjective
    from w2s_agents.trainers.batch import Example, collate
    from w2s_agents.trainers.data import load_pairs
    from w2s_agents.trainers.dpo import encode_pairs, prompt_tokens
    from w2s_agents.trainers.logps import token_logps
    from w2s_agents.trainers.reference import RefPair, reference_logps

    fp = tokenizer_fingerprint(tok)
    row = _pair_row(tok, fp)
    (pair,) = load_pairs([row])
    assert pair.data["agent_tokens"] == row["agent_tokens"]  # the field survives a row file
    encoder = ChatEncoder(tok)
    cfg = TrainConfig(method="dpo", max_length=256)
    use = TokenIdsUse()
    (ex,), _ = encode_pairs([RefPair(pair, None, 0.0, 0.0)], encoder, cfg, {}, use)
    enc_c, enc_r = ex.seqs
    # the prompt's agent turn counts once, though both sequences hold it
    assert (use.recorded_rows, use.retokenised_rows, use.turns) == (1, 0, {"recorded": 3})
    # both sides share one prompt tokenization: the recorded ids of its agent turn, not the tokenizer's
    context = prompt_tokens(enc_c)
    assert context == prompt_tokens(enc_r)
    plain_c = encoder.encode(row["prompt"] + row["chosen"], score_from=4)
    assert context != prompt_tokens(plain_c)
    prompt_ids = row["agent_tokens"]["prompt"][0]["ids"]
    assert any(context[i : i + len(prompt_ids)] == prompt_ids for i in range(len(context)))
    # each side scores exactly its recorded ids, right after the shared prompt
    ids_c, ids_r = row["agent_tokens"]["chosen"][0]["ids"], row["agent_tokens"]["rejected"][0]["ids"]
    assert _scored(enc_c) == ids_c and _scored(enc_r) == ids_r
    assert enc_c.input_ids[len(context) : len(context) + len(ids_c)] == ids_c
    expect_c, expect_r = _logp_of(policy_lm, context, ids_c), _logp_of(policy_lm, context, ids_r)
    # the DPO objective's log-probs are the model's of the recorded sequences
    batch = collate([Example(ex.seqs, 1.0, ref=(0.0, 0.0))], tok.pad_token_id or 0, torch.device("cpu"))
    out = DPOObjective(beta=0.1)(lambda *a: token_logps(policy_lm.model, *a), batch)
    assert float(out.metrics["logps/chosen"][0]) == pytest.approx(expect_c, abs=1e-4)
    assert float(out.metrics["logps/rejected"][0]) == pytest.approx(expect_r, abs=1e-4)
    # and so are the reference's, when the reference shares the tokenizer (here: the same model)
    (ref,), _ = reference_logps(
        [pair], reference_path=train_models["policy"], policy_tokenizer=tok, config=cfg, cache_file=None
    )
    assert (ref.ref_chosen, ref.ref_rejected) == pytest.approx((expect_c, expect_r), abs=1e-4)


def test_pairs_of_another_tokenizer_are_re_tokenised_and_counted_so(tok, train_models) -> None:
    from w2s_agents.trainers.data import load_pairs
    from w2s_agents.trainers.dpo import encode_pairs
    from w2s_agents.trainers.reference import RefPair

    weak_fp = tokenizer_fingerprint(load_tokenizer(train_models["weak"]))
    row = _pair_row(tok, weak_fp)
    encoder = ChatEncoder(tok)
    use = TokenIdsUse()
    (ex,), _ = encode_pairs(
        [RefPair(load_pairs([row])[0], None, 0.0, 0.0)], encoder, TrainConfig(method="dpo"), {}, use
    )
    for enc, side in zip(ex.seqs, ("chosen", "rejected"), strict=True):
        assert enc.input_ids == encoder.encode(row["prompt"] + row[side], score_from=4).input_ids
    assert (use.recorded_rows, use.retokenised_rows, use.turns) == (0, 1, {"tokenizer": 3})


def test_pg_rows_train_on_the_recorded_ids_or_fall_back(tok, policy_lm, train_models) -> None:
    from w2s_agents.trainers import PGObjective
    from w2s_agents.trainers.batch import collate
    from w2s_agents.trainers.config import PGOptions
    from w2s_agents.trainers.logps import token_logps
    from w2s_agents.trainers.pg import encode_pg_rows, load_pg_rows

    messages = episode_messages(*EPISODE)[:5]  # the step: the second agent turn
    fp = tokenizer_fingerprint(tok)
    weak_fp = tokenizer_fingerprint(load_tokenizer(train_models["weak"]))
    rows = [
        {
            "messages": messages,
            "advantage": 1.0,
            "agent_tokens": _recorded(tok, messages, fingerprint=f, drift=True),
        }
        for f in (fp, weak_fp)
    ]
    encoder = ChatEncoder(tok)
    use = TokenIdsUse()
    (ex, fallback), _ = encode_pg_rows(load_pg_rows(rows), encoder, TrainConfig(method="pg"), {}, use)
    assert (use.recorded_rows, use.retokenised_rows, use.turns) == (1, 1, {"recorded": 2, "tokenizer": 2})
    assert fallback.seqs[0].input_ids == encoder.encode(messages, score_from=4).input_ids
    enc = ex.seqs[0]
    step_ids = rows[0]["agent_tokens"][1]["ids"]
    assert _scored(enc) == step_ids
    context = enc.input_ids[: enc.loss_mask.index(1)]
    first_ids = rows[0]["agent_tokens"][0]["ids"]
    assert any(context[i : i + len(first_ids)] == first_ids for i in range(len(context)))
    # REINFORCE with A = 1: the row's loss is minus the model's log-probability of the recorded step
    objective = PGObjective(PGOptions(loss="reinforce"), start_path=train_models["policy"])
    out = objective(lambda *a: token_logps(policy_lm.model, *a), collate([ex], 0, torch.device("cpu")))
    assert float(out.losses[0].detach()) == pytest.approx(-_logp_of(policy_lm, context, step_ids), abs=1e-4)


def test_dpo_and_pg_training_report_the_path(tok, train_models, tmp_path: Path) -> None:
    from w2s_agents.trainers import train_dpo, train_pg

    fp = tokenizer_fingerprint(tok)
    settings = {"lr": 1e-3, "batch_size": 2, "max_length": 256, "max_steps": 1, "valid_fraction": 0.0,
                "checkpoint_every": 0, "warmup_ratio": 0.0}  # fmt: skip
    plain = {k: v for k, v in _pair_row(tok, fp).items() if k != "agent_tokens"}
    pairs = [{**_pair_row(tok, fp), "ref_chosen_logp": -5.0, "ref_rejected_logp": -6.0},
             {**plain, "ref_chosen_logp": -5.0, "ref_rejected_logp": -6.0}]  # fmt: skip
    result = train_dpo(train_models["policy"], pairs, tmp_path / "dpo", from_dict(TrainConfig, {**settings, "method": "dpo"}),
                       reference_path=None)  # fmt: skip
    assert result.steps == 1
    assert result.extra["token_ids"] == {"recorded_rows": 1, "retokenised_rows": 1, "turns": {"recorded": 3}}
    messages = episode_messages(*EPISODE)[:5]
    rows = [{"messages": messages, "advantage": 0.5, "agent_tokens": _recorded(tok, messages, fingerprint=fp, drift=True)},
            {"messages": messages, "advantage": -0.5}]  # fmt: skip
    cfg = from_dict(TrainConfig, {**settings, "method": "pg", "pg": {"loss": "reinforce"}})
    result = train_pg(train_models["policy"], rows, tmp_path / "pg", cfg)
    expected = {"recorded_rows": 1, "retokenised_rows": 1, "turns": {"recorded": 2}}
    assert result.steps == 1 and result.extra["token_ids"] == expected
    assert json.loads((tmp_path / "pg" / "result.json").read_text())["extra"]["token_ids"] == expected


def _branching_tree(*, with_ids: bool):
    """A tree whose "look" node has a winning and a losing child; every step recorded when ``with_ids``."""
    from w2s_agents.tree import TrajectoryTree

    def step(action: str, obs: str, ids: list[int]) -> Step:
        return Step(action, obs, token_ids=ids if with_ids else None, tokenizer="fp" if with_ids else None)

    won = _traj("t", [step("look", "You see a door.", [1, 2]), step("open door", "You win.", [3, 2])],
                success=True)  # fmt: skip
    lost = Trajectory(**{**won.__dict__, "steps": (step("look", "You see a door.", [4, 2]), step("go west", "No.", [5, 2])),
                         "return_": 0.0, "success": False, "end": "truncated", "source": Source("weak", "weak", seed=1)})  # fmt: skip
    tree = TrajectoryTree("t", env_id="w2s/Toy-v0", instruction=EPISODE[0])
    tree.extend([won, lost])
    return tree, won, lost


def test_pairs_and_pg_rows_of_trees_and_trajectories_carry_the_ids(tmp_path: Path) -> None:
    from w2s_agents.search import (
        expert_failure_pairs,
        node_values,
        read_pairs,
        tree_pairs,
        write_rows,
    )
    from w2s_agents.search.advantages import pg_rows, read_pg_rows

    def ids(*xs: list[int]) -> tuple[dict, ...]:
        return tuple({"ids": x, "tokenizer": "fp"} for x in xs)

    tree, won, lost = _branching_tree(with_ids=True)
    values = node_values(tree, "mean")
    (pair,) = tree_pairs(tree, values, margin=0.1)
    # the prompt's agent turn is the look node's, whose ids are the winner's (the answer whose thought it keeps)
    assert pair.agent_tokens == {"prompt": ids([1, 2]), "chosen": ids([3, 2]), "rejected": ids([5, 2])}
    write_rows([pair], tmp_path / "pairs.jsonl")
    assert read_pairs(tmp_path / "pairs.jsonl") == [pair]
    by_action = {tree.action(r.node): r for r in pg_rows(tree, value="mean")}
    assert by_action["open door"].agent_tokens == ids([1, 2], [3, 2])
    assert by_action["go west"].agent_tokens == ids([1, 2], [5, 2])
    write_rows([r.to_dict() for r in by_action.values()], tmp_path / "pg.jsonl")
    assert read_pg_rows(tmp_path / "pg.jsonl") == list(by_action.values())
    expert = Trajectory(**{**won.__dict__, "steps": tuple(Step(s.action, s.observation) for s in won.steps),
                           "source": Source("expert", "expert")})  # fmt: skip
    (eto,) = expert_failure_pairs([expert, lost])
    assert eto.agent_tokens == {"rejected": ids([4, 2], [5, 2])}
    # rows made without recorded ids are as before: no such field
    bare, won, lost = _branching_tree(with_ids=False)
    rows = [*tree_pairs(bare, node_values(bare, "mean")), *pg_rows(bare, value="mean"),
            *expert_failure_pairs([expert, lost])]  # fmt: skip
    assert rows and all("agent_tokens" not in r.to_dict() for r in rows)


def test_bad_agent_tokens_of_pairs_and_pg_rows_name_the_line(tmp_path: Path) -> None:
    from w2s_agents.search import read_pairs
    from w2s_agents.search.advantages import read_pg_rows

    messages = episode_messages(*EPISODE)
    pair = {"prompt": messages[:4], "chosen": [messages[4]], "rejected": [messages[6]]}
    cases = [
        ({**pair, "agent_tokens": {"chosen": [None, None]}}, read_pairs,
         r"p.jsonl:1: 'agent_tokens.chosen' must be a list with one entry per assistant message \(1\), got 2"),
        ({**pair, "agent_tokens": {"answer": [None]}}, read_pairs, r"p.jsonl:1: a pair's 'agent_tokens' must map"),
        ({**pair, "agent_tokens": {"prompt": [{"ids": [], "tokenizer": "f"}]}}, read_pairs,
         r"p.jsonl:1: 'agent_tokens.prompt\[0\]' must be null or"),
        ({"messages": messages[:5], "advantage": 1.0, "agent_tokens": [None]}, read_pg_rows,
         r"p.jsonl:1: 'agent_tokens' must be a list with one entry per assistant message \(2\)"),
    ]  # fmt: skip
    for row, read, message in cases:
        (tmp_path / "p.jsonl").write_text(json.dumps(row) + "\n")
        with pytest.raises(DataFormatError, match=message):
            read(tmp_path / "p.jsonl")


def test_cut_pairs_and_pg_rows_drop_the_ids_with_their_turns(tok) -> None:
    from w2s_agents.trainers import fit_pair
    from w2s_agents.trainers.data import load_pairs
    from w2s_agents.trainers.dpo import encode_pairs
    from w2s_agents.trainers.pg import encode_pg_rows, load_pg_rows
    from w2s_agents.trainers.reference import RefPair
    from w2s_agents.trainers.token_ids import recorded_for_pair

    fp = tokenizer_fingerprint(tok)
    messages = episode_messages(*EPISODE)
    prompt, chosen = messages[:6], [messages[6]]
    rejected = [{"role": "assistant", "content": "Thought: the apple stays\nAction: look"}]
    parts = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    row = {
        **parts,
        "agent_tokens": {k: _recorded(tok, v, fingerprint=fp, drift=True) for k, v in parts.items()},
    }
    encoder = ChatEncoder(tok)
    recorded = recorded_for_pair(row, fp)
    whole = fit_pair([encoder], row, 10_000, recorded=[recorded])
    (ex,), _ = encode_pairs(
        [RefPair(load_pairs([row])[0], whole, 0.0, 0.0)], encoder, TrainConfig(method="dpo"), {}
    )
    # one token shorter than the pair as tokenized with its ids: the prompt's oldest unit goes, with its ids
    limit = max(len(s) for s in ex.seqs) - 1
    plan = fit_pair([encoder], row, limit, recorded=[recorded])
    assert plan is not None and plan.prompt_dropped == 1
    assert fit_pair([encoder], row, limit).prompt_dropped == 0  # re-tokenised, the drifting pair would fit
    use = TokenIdsUse()
    cfg = TrainConfig(method="dpo", max_length=limit)
    (cut,), _ = encode_pairs([RefPair(load_pairs([row])[0], plan, 0.0, 0.0)], encoder, cfg, {}, use)
    assert use.turns == {"recorded": 3} and max(len(s) for s in cut.seqs) <= limit
    assert _scored(cut.seqs[0]) == row["agent_tokens"]["chosen"][0]["ids"]
    kept = row["agent_tokens"]["prompt"][1]["ids"]
    assert any(cut.seqs[0].input_ids[i : i + len(kept)] == kept for i in range(len(cut.seqs[0])))
    # a policy-gradient row cut to fit keeps the ids of the turns it keeps
    pg = {"messages": prompt + chosen, "advantage": 1.0,
          "agent_tokens": _recorded(tok, prompt + chosen, fingerprint=fp, drift=True)}  # fmt: skip
    (full,), _ = encode_pg_rows(load_pg_rows([pg]), encoder, TrainConfig(method="pg"), {})
    use = TokenIdsUse()
    cfg = TrainConfig(method="pg", max_length=len(full.seqs[0]) - 1)
    (ex,), _ = encode_pg_rows(load_pg_rows([pg]), encoder, cfg, {}, use)
    assert use.turns == {"recorded": 2} and len(ex.seqs[0]) <= cfg.max_length
    assert _scored(ex.seqs[0]) == pg["agent_tokens"][2]["ids"]
