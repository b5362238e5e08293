"""The LLM agent: ReAct parsing, prompts fitted to the context, choose-mode scores checked against an independent
per-candidate loop, contrastive scores against the formula, samplers, batched generation."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from w2s_agents.agents import (
    Agent,
    AgentConfig,
    Sampler,
    action_distribution,
    load_agent,
    parse_react,
    score_actions,
)
from w2s_agents.agents.decoding import (
    PrefixCache,
    candidate_logprobs,
    contrastive_token_scores,
    generate,
    pick_tokens,
)
from w2s_agents.agents.models import build_tiny_model, load_model
from w2s_agents.errors import ConfigError, W2SError
from w2s_agents.messages import SYSTEM_PROMPT, agent_message, episode_messages, system_prompt, task_messages
from w2s_agents.types import EpisodeState

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "thought", "action"),
    [
        ("Thought: the door is east\nAction: go east", "the door is east", "go east"),
        ("thought:  x \n ACTION :   take key ", "x", "take key"),
        ("**Thought:** hmm\n**Action:** open door", "hmm", "open door"),
        ("Thought: I see. Action: look", "I see.", "look"),
        (
            "Action: go north\nObservation: You go north.\nThought: now south\nAction: go south",
            "",
            "go north",
        ),
        ("Thought: the action: take it\nAction: take apple", "the action: take it", "take apple"),
        ("Thought: ok\nAction: `take key`.", "ok", "take key"),
        ("Action: [open box]", "", "open box"),
        ('Action: "eat apple"!', "", "eat apple"),
        ("Thought: west\nAction:\n  go west\n", "west", "go west"),
        ("Some preamble\nAction: look", "Some preamble", "look"),
        ("Thought: x\nAction： inventory", "x", "inventory"),
        ("  go east  \nmore text", "", "go east"),
    ],
)
def test_parse_react_accepts_variants(text: str, thought: str, action: str) -> None:
    parsed = parse_react(text)
    assert parsed.ok, parsed.error
    assert (parsed.thought, parsed.action) == (thought, action)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", "empty output"),
        ("  \n\t ", "empty output"),
        ("Thought: only thinking, no command", "no 'Action:' in the output"),
        ("Thought: x\nAction:   ", "empty action"),
        ("Action: ``", "empty action"),
    ],
)
def test_parse_react_rejects_outputs_without_an_action(text: str, error: str) -> None:
    parsed = parse_react(text)
    assert not parsed.ok and parsed.action == "" and parsed.error == error


def test_parse_react_bare_action_switch() -> None:
    assert parse_react("open door").action == "open door"
    strict = parse_react("open door", bare_action=False)
    assert not strict.ok and strict.error == "no 'Action:' in the output"
    assert parse_react("Thought: only", bare_action=True).thought == "only"


# ------------------------------------------------------------------------------------------- prompts


def test_system_prompt_is_the_default_without_extras() -> None:
    assert system_prompt() == SYSTEM_PROMPT
    text = system_prompt(["look", "go east", "take key"], "look, go X", max_admissible=2)
    assert text.startswith(SYSTEM_PROMPT)
    assert "Commands: look, go X" in text
    assert text.endswith("Admissible commands now:\nlook\ngo east\n(1 more)")


@pytest.fixture(scope="module")
def nano(nano_model_dir: Path):
    return load_model(nano_model_dir)


def _state(
    turns: int = 3, admissible: tuple[str, ...] | None = ("take apple", "go north", "look")
) -> EpisodeState:
    return EpisodeState(
        "Take the apple.",
        "-= Kitchen =- You are in a kitchen. You see an apple on the table.",
        tuple(
            (f"step {i}" if i % 2 else "", f"go {['north', 'south'][i % 2]}", f"You are in room {i}.")
            for i in range(turns)
        ),
        admissible,
        "look, take X, go north|south",
    )


@pytest.mark.slow
def test_prompt_is_the_messages_format(nano) -> None:
    agent = Agent(nano, AgentConfig())
    state = _state()
    prompt = agent.prompts.build(state, 10_000)
    messages = episode_messages(
        state.instruction,
        state.initial_observation,
        state.turns,
        system=system_prompt(state.admissible, state.grammar, max_admissible=100),
    )
    assert prompt.messages == messages and prompt.turns_dropped == 0
    assert agent.prompts.incremental  # assembled from cached per-message ids, equal to rendering it whole
    text = nano.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.ids == nano.tokenizer(text, add_special_tokens=False)["input_ids"]
    plain = Agent(nano, AgentConfig(prompt_grammar=False, prompt_admissible=False)).prompts.build(
        state, 10_000
    )
    assert plain.messages[0]["content"] == SYSTEM_PROMPT


def test_history_is_fitted_by_dropping_the_oldest_turns(nano) -> None:
    agent = Agent(nano, AgentConfig())
    state = _state(turns=12)
    full = len(agent.prompts.build(state, 100_000).ids)
    budget = full - 60
    prompt = agent.prompts.build(state, budget)
    assert len(prompt.ids) <= budget and 1 <= prompt.turns_dropped < 12
    msgs = prompt.messages
    assert msgs[1]["content"].startswith(f"Task: {state.instruction}\n\n{state.initial_observation}")
    assert msgs[-1] == {"role": "user", "content": state.observation}
    kept = state.turns[prompt.turns_dropped :]
    assert msgs[2] == agent_message(kept[0][1], kept[0][0])
    # the fewest turns are dropped: keeping one more would not fit
    longer = agent.prompts.messages(state, drop=prompt.turns_dropped - 1)
    assert len(agent.prompts.encode_messages(longer)) > budget


# system instruction folded into the first user turn (as Llama-2 style templates do): not message by message
FOLDED_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '<|user|>\n' }}"
    "{% if loop.index0 == 1 and messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
    "{{ m['content'] + '<|end|>\n' }}{% elif m['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' + m['content'] + '<|end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def test_templates_that_are_not_message_by_message_render_whole_prompts(nano) -> None:
    import copy
    import dataclasses

    tok = copy.deepcopy(nano.tokenizer)
    tok.chat_template = FOLDED_TEMPLATE
    lm = dataclasses.replace(nano, tokenizer=tok)
    agent = Agent(lm, AgentConfig())
    assert not agent.prompts.incremental
    state = _state(turns=10)
    for budget in (100_000, 330, 300):
        prompt = agent.prompts.build(state, budget)
        text = tok.apply_chat_template(prompt.messages, add_generation_prompt=True, tokenize=False)
        assert prompt.ids == tok(text, add_special_tokens=False)["input_ids"] and len(prompt.ids) <= budget
        if budget < 100_000:
            assert prompt.turns_dropped > 0
            longer = agent.prompts.messages(state, drop=prompt.turns_dropped - 1)
            assert len(agent.prompts.encode_messages(longer)) > budget


def test_long_texts_are_cut_but_instruction_and_current_observation_stay(nano) -> None:
    agent = Agent(nano, AgentConfig())
    long_obs = "You are in a cellar. " * 60 + "The key is here."
    state = EpisodeState("Find the key.", "start " * 80, (("", "go down", long_obs),), ("take key",), None)
    full = len(agent.prompts.build(state, 100_000).ids)
    prompt = agent.prompts.build(state, full - 150)
    assert len(prompt.ids) <= full - 150
    assert "admissible" in prompt.shortened and "initial_observation" in prompt.shortened
    assert prompt.messages[1]["content"].startswith("Task: Find the key.")
    assert prompt.messages[-1]["content"] == long_obs
    tight = agent.prompts.build(state, full - 450)
    assert "observation" in tight.shortened
    assert tight.messages[-1]["content"].endswith("The key is here.")  # the tail of the observation is kept
    with pytest.raises(W2SError, match="does not fit"):
        agent.prompts.build(state, 20)


# ------------------------------------------------------------------------------------------- choose mode


def _naive_candidate_logprobs(lm, state: EpisodeState, action: str) -> tuple[list[float], list[float]]:
    """Per-token log-probs (and per-position max log-prob) of one answer, one forward pass of prompt + answer."""
    tok = lm.tokenizer
    messages = episode_messages(
        state.instruction,
        state.initial_observation,
        state.turns,
        system=system_prompt(state.admissible, state.grammar),
    )
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template([*messages, {"role": "assistant", "content": action}], tokenize=False)
    answer = tok(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    answer = answer[: answer.index(tok.eos_token_id) + 1]  # through the end of the turn
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([prompt_ids + answer])).logits[0].double()
    lsm = torch.log_softmax(logits, dim=-1)
    at = [len(prompt_ids) - 1 + t for t in range(len(answer))]
    return [float(lsm[p, y]) for p, y in zip(at, answer, strict=True)], [float(lsm[p].max()) for p in at]


@pytest.mark.parametrize("share_prompt", [True, False])
def test_choose_scores_equal_a_naive_per_candidate_loop(nano, share_prompt: bool) -> None:
    agent = Agent(nano, AgentConfig(share_prompt=share_prompt, score_batch_size=2, score_block_tokens=7))
    states = [_state(2), _state(0, ("look", "open box with key", "x")), _state(5, ("go south",))]
    scores = score_actions(agent, states)
    for state, got in zip(states, scores, strict=True):
        want = [sum(_naive_candidate_logprobs(nano, state, a)[0]) for a in state.admissible]
        assert got.shape == (len(want),)
        assert got == pytest.approx(want, abs=2e-4)


def test_length_normalised_scores_are_means(nano) -> None:
    state = _state(1)
    agent = Agent(nano, AgentConfig(length_normalize=True))
    got = agent.score_actions([state])[0]
    for a, g in zip(state.admissible, got, strict=True):
        lp = _naive_candidate_logprobs(nano, state, a)[0]
        assert g == pytest.approx(sum(lp) / len(lp), abs=2e-4)


def test_contrastive_scores_on_a_hand_built_example() -> None:
    # one position, vocabulary of 4: p_A = (0.5, 0.3, 0.15, 0.05), p_B uniform
    l_a = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    l_b = torch.log(torch.full((4,), 0.25))
    best = l_a.max().expand(4)
    s = contrastive_token_scores(l_a, best, l_b, lam=1.0, alpha=0.2)
    # (1 + 1) l_A - l_B = log(p_A^2 / p_B); p_A >= 0.2 * 0.5 = 0.1 keeps the first three tokens
    assert torch.exp(s[:3]).tolist() == pytest.approx([1.0, 0.36, 0.09], abs=1e-6)
    assert s[3] == -math.inf
    s = contrastive_token_scores(l_a, best, l_b, lam=0.5, alpha=0.0)  # alpha 0 keeps every token
    assert s.tolist() == pytest.approx((1.5 * l_a - 0.5 * l_b).tolist())
    assert torch.isfinite(s).all()
    # lambda 0: the expert's own log-probabilities, masked
    assert contrastive_token_scores(l_a, best, l_b, lam=0.0, alpha=0.2)[:3].tolist() == pytest.approx(
        l_a[:3].tolist()
    )


@pytest.fixture(scope="module")
def amateur_dir(nano, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("amateur") / "nano-amateur"
    build_tiny_model("nano", nano.tokenizer, seed=7).save_pretrained(out)
    nano.tokenizer.save_pretrained(out)
    return out


def test_contrastive_choose_scores_follow_the_formula(nano, amateur_dir: Path) -> None:
    amateur = load_model(amateur_dir)
    state = _state(2, ("take apple", "go north", "look", "open box with key"))
    per_token = {
        a: (_naive_candidate_logprobs(nano, state, a), _naive_candidate_logprobs(amateur, state, a)[0])
        for a in state.admissible
    }
    ratios = sorted(
        math.exp(lp - best)
        for (lps, bests), _ in per_token.values()
        for lp, best in zip(lps, bests, strict=True)
    )
    lam = 0.7

    def formula(alpha: float) -> list[float]:
        out = []
        for (lps, bests), lbs in per_token.values():
            out.append(
                sum(
                    (1 + lam) * la - lam * lb if la >= best + math.log(alpha) else -math.inf
                    for la, best, lb in zip(lps, bests, lbs, strict=True)
                )
            )
        return out

    # alpha between the two least plausible tokens: exactly one token, so one candidate, is masked
    alpha = (ratios[0] + ratios[1]) / 2
    agent = Agent(
        nano, AgentConfig(amateur_path=str(amateur_dir), contrastive_lambda=lam, contrastive_alpha=alpha)
    )
    got, want = agent.score_actions([state])[0], formula(alpha)
    assert sum(math.isinf(w) for w in want) == 1
    assert [math.isinf(g) for g in got] == [math.isinf(w) for w in want]
    assert [g for g in got if math.isfinite(g)] == pytest.approx(
        [w for w in want if math.isfinite(w)], abs=5e-4
    )
    # a token is plausible only as the expert's argmax: every candidate is masked, the expert's scores decide
    agent = Agent(
        nano, AgentConfig(amateur_path=str(amateur_dir), contrastive_lambda=lam, contrastive_alpha=1.0)
    )
    assert all(math.isinf(w) for w in formula(1.0))
    plain = [sum(lps) for (lps, _), _ in per_token.values()]
    assert agent.score_actions([state])[0] == pytest.approx(plain, abs=2e-4)


def test_amateur_with_another_tokenizer_is_refused(nano, tmp_path: Path, game_texts: list[str]) -> None:
    from w2s_agents.agents.models import create_tiny_model

    other = create_tiny_model(
        tmp_path / "other", [*game_texts[:40], "other words"], preset="nano", vocab_size=300
    )
    with pytest.raises(ConfigError, match="does not share the tokenizer"):
        Agent(nano, AgentConfig(amateur_path=str(other)))


def test_action_distribution_is_the_softmax_of_the_scores(nano) -> None:
    agent = Agent(nano, AgentConfig())
    state = _state(1)
    dist = action_distribution(agent, state)
    scores = agent.score_actions([state])[0]
    want = torch.softmax(torch.tensor(scores), 0).tolist()
    assert list(dist) == list(state.admissible)
    assert list(dist.values()) == pytest.approx(want, abs=1e-9)
    hot = action_distribution(agent, state, temperature=0)
    assert (
        sorted(hot.values()) == [0.0, 0.0, 1.0]
        and max(hot, key=hot.get) == state.admissible[int(scores.argmax())]
    )
    sub = action_distribution(agent, state, candidates=["look", "go north"])
    assert set(sub) == {"look", "go north"} and sum(sub.values()) == pytest.approx(1.0)
    with pytest.raises(W2SError, match="no admissible commands"):
        action_distribution(agent, _state(1, admissible=None))


# ------------------------------------------------------------------------------------------- sampling


def test_sampler_names_and_checks() -> None:
    assert Sampler().name == "greedy" and Sampler().greedy
    assert Sampler(temperature=0.7, top_p=0.95).name == "t0.7-p0.95"
    assert Sampler(name="wide", temperature=1.2).name == "wide"
    for bad in ({"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"name": "a b"}):
        with pytest.raises(ConfigError):
            Sampler(**bad)


def test_pick_tokens_greedy_ties_nucleus_and_inverse_cdf() -> None:
    scores = torch.log(torch.tensor([[0.2, 0.5, 0.3], [0.4, 0.4, 0.2]]))
    assert pick_tokens(scores, [0.0, 0.0], [1.0, 1.0], [None, None]).tolist() == [
        1,
        0,
    ]  # a tie goes to index 0
    # nucleus 0.6 of (0.5, 0.3, 0.2) keeps indices 1 and 2 (0.5 + 0.3 >= 0.6), renormalised to 5/8 and 3/8
    row = scores[:1]
    picks = [int(pick_tokens(row, [1.0], [0.6], [u])[0]) for u in (0.0, 0.62, 0.63, 0.99)]
    assert picks == [1, 1, 2, 2]
    # no nucleus: cumulative (0.5, 0.8, 1.0) in probability order 1, 2, 0
    assert [int(pick_tokens(row, [1.0], [1.0], [u])[0]) for u in (0.49, 0.51, 0.79, 0.81)] == [1, 2, 2, 0]
    # temperature sharpens: at T = 0.01 the argmax takes (almost) all mass
    assert int(pick_tokens(row, [0.01], [1.0], [0.999])[0]) == 1
    excluded = torch.tensor([[-math.inf, 0.0, -math.inf]])
    assert int(pick_tokens(excluded, [1.0], [1.0], [0.999])[0]) == 1
    with pytest.raises(ValueError, match="uniform draw"):
        pick_tokens(row, [1.0], [1.0], [None])


def test_decisions_do_not_depend_on_the_rest_of_the_batch(nano) -> None:
    states = [_state(1), _state(3, ("look", "go south", "eat apple")), _state(0)]
    samplers = [Sampler(temperature=1.0), Sampler(temperature=2.0, top_p=0.9), Sampler()]
    for mode in ("choose", "generate"):
        agent = Agent(nano, AgentConfig(mode=mode, max_new_tokens=8))
        together = agent.act(states, samplers, [random.Random(i) for i in range(3)])
        alone = [agent.act([s], [samplers[i]], [random.Random(i)])[0] for i, s in enumerate(states)]
        assert [d.action for d in together] == [d.action for d in alone]
        assert [d.raw_output for d in together] == [d.raw_output for d in alone]
        assert all(
            d.mode == mode and d.tokens_in > 0 and d.tokens_out > 0 and d.latency_s > 0 for d in together
        )


def test_choose_mode_generates_where_no_commands_are_known(nano) -> None:
    agent = Agent(nano, AgentConfig(mode="choose", max_new_tokens=6))
    d = agent.act([_state(1), _state(1, admissible=None)], [Sampler(), Sampler()], [random.Random(0)] * 2)
    assert d[0].mode == "choose" and d[0].action in _state(1).admissible and d[0].probability == 1.0
    assert d[1].mode == "generate" and d[1].tokens_out <= 6


def test_generate_mode_records_unparseable_answers(nano) -> None:
    agent = Agent(nano, AgentConfig(mode="generate", max_new_tokens=5, bare_action=False))
    d = agent.act([_state(1)], [Sampler(temperature=1.0)], [random.Random(3)])[0]
    # five random tokens hold no "Action:" marker
    assert not d.parse_ok and d.action == "" and d.parse_error and d.raw_output
    assert d.tokens_out == 5


# ------------------------------------------------------------------------------------------- decoding


def test_batched_generation_equals_one_prompt_at_a_time(nano) -> None:
    model = nano.model
    rng = random.Random(0)
    vocab = model.config.vocab_size
    prompts = [[1] + [rng.randrange(10, vocab) for _ in range(rng.randrange(3, 30))] for _ in range(4)]

    def greedy(rows, logp, logp_b):
        return pick_tokens(logp, [0.0] * len(rows), [1.0] * len(rows), [None] * len(rows))

    # rows stop early at different lengths, so finished rows leave the batch while others go on
    stop_after = {0: 3, 1: 9, 2: 1, 3: 6}
    batched = generate(
        model,
        prompts,
        greedy,
        pad_id=0,
        stop_ids=[2],
        max_new_tokens=9,
        stop=lambda r, ids: len(ids) >= stop_after[r],
    )
    for i, p in enumerate(prompts):
        ref = model.generate(
            torch.tensor([p]), max_new_tokens=9, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        assert batched[i] == ref[0, len(p) :].tolist()[: stop_after[i]]


def test_candidate_logprobs_checks_its_input(nano) -> None:
    with pytest.raises(ValueError, match="empty candidate"):
        candidate_logprobs(nano.model, [[1, 2]], [[[]]], pad_id=0)
    with pytest.raises(ValueError, match="2 prompts but 1"):
        candidate_logprobs(nano.model, [[1], [2]], [[[3]]], pad_id=0)
    assert candidate_logprobs(nano.model, [], [], pad_id=0) == []


def test_agent_config_checks_and_loading(nano_model_dir: Path) -> None:
    from w2s_agents.config import from_dict

    for bad in ({"max_new_tokens": 0}, {"max_context_tokens": 8}, {"contrastive_alpha": 2.0}, {"mode": "x"}):
        with pytest.raises(ConfigError):
            from_dict(AgentConfig, bad)
    agent = load_agent(str(nano_model_dir), AgentConfig(name="nano-weak", role="strong"))
    assert agent.name == "nano-weak" and repr(agent) == "Agent('nano-weak', mode='choose')"
    assert load_agent(str(nano_model_dir)).name == "nano"


def test_state_from_trajectory(make_traj) -> None:
    traj = make_traj([("take key", "got key", "grab it"), ("open door", "door open")], 0.0, "lost")
    s0 = EpisodeState.from_trajectory(traj, 0)
    assert s0.turns == () and s0.observation == "start"
    s1 = EpisodeState.from_trajectory(traj, 1, grammar="g")
    assert (
        s1.turns == (("grab it", "take key", "got key"),)
        and s1.observation == "got key"
        and s1.grammar == "g"
    )
    with pytest.raises(IndexError):
        EpisodeState.from_trajectory(traj, 2)


def test_the_task_turn_states_the_instruction_once() -> None:
    intro = "Find the coin. Go north first."
    first = f"{intro}\n\n-= Cellar =-\nYou are in a cellar."
    msgs = task_messages(intro, first)
    assert msgs[1]["content"] == f"Task: {intro}\n\n-= Cellar =-\nYou are in a cellar."
    # an observation that does not open with the instruction is kept whole
    other = task_messages("Leave.", "-= Hall =-\nLeave. now")
    assert other[1]["content"] == "Task: Leave.\n\n-= Hall =-\nLeave. now"


# ------------------------------------------------------------------------------------------- prefix cache


def test_prefix_cache_scores_equal_uncached_scores_as_prompts_grow(nano) -> None:
    rng = random.Random(0)
    vocab = len(nano.tokenizer)
    shared = [rng.randrange(vocab) for _ in range(30)]
    prompts = [shared + [rng.randrange(vocab) for _ in range(rng.randrange(1, 9))] for _ in range(3)]
    cands = [[[rng.randrange(vocab) for _ in range(rng.randrange(1, 4))] for _ in range(3)] for _ in prompts]
    cache = PrefixCache(nano.model, capacity=8, min_reuse=4)
    previous: list[list[int]] = []
    for _ in range(4):
        want = candidate_logprobs(nano.model, prompts, cands, pad_id=0, batch_rows=2, block_tokens=5)
        got = candidate_logprobs(
            nano.model, prompts, cands, pad_id=0, batch_rows=2, block_tokens=5, prefix=cache
        )
        for w_row, g_row in zip(want, got, strict=True):
            for w, g in zip(w_row, g_row, strict=True):
                assert torch.allclose(w.token, g.token, atol=1e-5)
                assert torch.allclose(w.best, g.best, atol=1e-5)
        assert len(cache) == 3  # each prompt replaced the one it extended
        # from the second step on, every prompt ran only what followed the prompt it extends
        assert cache.reused_tokens == sum(len(p) for p in previous)
        cache.reused_tokens = 0
        previous = prompts
        prompts = [p + [rng.randrange(vocab) for _ in range(rng.randrange(1, 8))] for p in prompts]
    # a prompt sharing only part of an entry reuses that part; the entry stays for its own episode
    branch = [*prompts[0][:20], 1, 2, 3]
    assert cache.lookup(branch)[0] == 20


def test_prefix_cache_entries_dropped_while_scoring_are_still_used(nano) -> None:
    # two prompts continue the same stored prompt in different forward passes, and the cache holds only one
    # entry: storing the first replaces the entry the second continues
    base = list(range(5, 40))
    cache = PrefixCache(nano.model, capacity=1, min_reuse=4)
    candidate_logprobs(nano.model, [base], [[[3]]], pad_id=0, prefix=cache)
    prompts = [[*base, 7, 8], [*base, 9]]
    cands = [[[3], [4, 5]], [[6]]]
    want = candidate_logprobs(nano.model, prompts, cands, pad_id=0, batch_rows=1)
    got = candidate_logprobs(nano.model, prompts, cands, pad_id=0, batch_rows=1, prefix=cache)
    for w_row, g_row in zip(want, got, strict=True):
        for w, g in zip(w_row, g_row, strict=True):
            assert torch.allclose(w.token, g.token, atol=1e-5)
    assert cache.reused_tokens == 2 * len(base) and len(cache) == 1


def test_prefix_cache_empties_when_the_weights_change(nano) -> None:
    prompt = list(range(5, 40))
    cache = PrefixCache(nano.model, capacity=4, min_reuse=4)
    candidate_logprobs(nano.model, [prompt], [[[3], [4, 5]]], pad_id=0, prefix=cache)
    assert cache.lookup([*prompt, 7])[0] == len(prompt)
    with torch.no_grad():
        next(nano.model.parameters()).add_(0.0)  # an in-place update (values unchanged), as optimizers make
    assert cache.lookup([*prompt, 7]) == (0, None) and len(cache) == 0
