"""Tokens in, tokens out: agents record the token ids of their answers, the store keeps them (schema 2), and
the SFT trainer trains on them instead of re-tokenising the text where the tokenizer matches."""

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
