"""Log-prob gathering and losses against independent computations: a naive per-prefix loop, Python floats,
and TRL's own DPO loss on the same batch; the DPO metrics, source weights and the epoch order by hand."""

from __future__ import annotations

import doctest
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from w2s_agents.agents.models import load_model
from w2s_agents.trainers import (
    Batch,
    ChatEncoder,
    DPOObjective,
    Example,
    SourceWeights,
    collate,
    epoch_order,
    pair_messages,
    sft_objective,
    token_logps,
)
from w2s_agents.trainers import batch as batch_module
from w2s_agents.trainers import logps as logps_module

BETA = 0.3


pytestmark = pytest.mark.usefixtures("one_torch_thread_module")


@pytest.fixture(scope="module")
def policy(train_models: dict[str, Path]):
    return load_model(train_models["policy"])


def _naive_logps(model, ids: list[int], scored: list[int]) -> float:
    """Sum of log p(ids[t] | ids[:t]) over the scored positions, one forward per prefix."""
    total = 0.0
    with torch.no_grad():
        for t in scored:
            logits = model(input_ids=torch.tensor([ids[:t]])).logits[0, -1].double()
            total += float(torch.log_softmax(logits, -1)[ids[t]])
    return total


def _independent_scored_positions(tok, prompt, conversation) -> list[int]:
    """Agent tokens after the prompt, found with the template's {% generation %} mask and the prompt's own
    token count (independently of the prefix-rendering code under test)."""
    out = tok.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    n_prompt = len(tok.apply_chat_template(prompt, tokenize=True, return_dict=True)["input_ids"])
    return [t for t, flag in enumerate(out["assistant_masks"]) if flag and t >= n_prompt]


def test_token_logps_match_a_naive_per_prefix_loop(policy, sft_rows) -> None:
    tok = policy.tokenizer
    enc = ChatEncoder(tok)
    msgs = [sft_rows[0]["messages"], sft_rows[1]["messages"][:3]]  # different lengths: right padding
    seqs = [enc.encode(m) for m in msgs]
    batch = collate([Example((s,), 1.0) for s in seqs], pad_id=tok.eos_token_id, device=torch.device("cpu"))
    with torch.no_grad():
        fast = token_logps(policy.model, batch.input_ids, batch.attention_mask, batch.target_mask)
    for i, s in enumerate(seqs):
        scored = [t for t, f in enumerate(s.loss_mask) if f]
        assert (fast[i] != 0).sum() == len(scored)
        naive = _naive_logps(policy.model, s.input_ids, scored)
        assert float(fast[i].sum()) == pytest.approx(naive, abs=1e-4)
        t = scored[-1]
        one = _naive_logps(policy.model, s.input_ids, [t])
        assert float(fast[i, t]) == pytest.approx(one, abs=1e-5)


def test_full_logits_fallback_and_chunked_head_agree(policy, sft_rows, monkeypatch) -> None:
    tok, model = policy.tokenizer, policy.model
    enc = ChatEncoder(tok)
    seqs = [enc.encode(r["messages"]) for r in sft_rows[:3]]
    batch = collate([Example((s,), 1.0) for s in seqs], pad_id=tok.pad_token_id, device=torch.device("cpu"))
    args = (batch.input_ids, batch.attention_mask, batch.target_mask)

    def loss_and_grads():
        model.zero_grad()
        out = token_logps(model, *args)
        (-out.sum()).backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    model.train()
    base, base_grads = loss_and_grads()
    monkeypatch.setattr(logps_module, "_CHUNK_ELEMENTS", 7 * model.config.vocab_size)  # 7 tokens per chunk
    chunked, chunked_grads = loss_and_grads()
    monkeypatch.setattr(logps_module, "_supports_selected_head", lambda hf: False)
    full, full_grads = loss_and_grads()
    model.zero_grad()
    model.eval()
    torch.testing.assert_close(chunked, base, atol=1e-5, rtol=0)
    torch.testing.assert_close(full, base, atol=1e-5, rtol=0)
    for a, b, c in zip(base_grads, chunked_grads, full_grads, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(c, a, atol=1e-5, rtol=1e-4)


def _pair_batch(tok, pair_rows, refs):
    enc = ChatEncoder(tok)
    examples = []
    for row, ref in zip(pair_rows, refs, strict=True):
        chosen, rejected, k = pair_messages(row)
        examples.append(
            Example((enc.encode(chosen, score_from=k), enc.encode(rejected, score_from=k)), 1.0, ref=ref)
        )
    return examples, collate(examples, tok.pad_token_id, torch.device("cpu"))


def test_dpo_loss_equals_an_independent_computation(policy, pair_rows) -> None:
    tok, model = policy.tokenizer, policy.model
    rows = pair_rows[:4]  # two step-level and two continuation-level pairs
    refs = [(-20.0 - i, -15.0 + 0.5 * i) for i in range(len(rows))]
    examples, batch = _pair_batch(tok, rows, refs)
    with torch.no_grad():
        ours = DPOObjective(BETA)(lambda *a: token_logps(model, *a), batch).losses
    for i, (row, ex) in enumerate(zip(rows, examples, strict=True)):
        sums = []
        for side, seq in zip(("chosen", "rejected"), ex.seqs, strict=True):
            conversation = row["prompt"] + row[side]
            positions = _independent_scored_positions(tok, row["prompt"], conversation)
            assert positions == [t for t, f in enumerate(seq.loss_mask) if f]
            scored_text = tok.decode([seq.input_ids[t] for t in positions])
            for m in row[side]:  # observation tokens inside a continuation carry no loss
                assert (m["content"] in scored_text) == (m["role"] == "assistant")
            sums.append(_naive_logps(model, seq.input_ids, positions))
        margin = (sums[0] - refs[i][0]) - (sums[1] - refs[i][1])
        expected = math.log1p(math.exp(-BETA * margin))  # -log sigmoid(beta * margin)
        assert float(ours[i]) == pytest.approx(expected, abs=1e-5)


def test_dpo_sft_weight_adds_the_chosen_mean_token_nll(policy, pair_rows) -> None:
    tok, model = policy.tokenizer, policy.model
    rows = pair_rows[:4]
    refs = [(-20.0 - i, -15.0 + 0.5 * i) for i in range(len(rows))]
    examples, batch = _pair_batch(tok, rows, refs)
    with torch.no_grad():
        plain = DPOObjective(BETA)(lambda *a: token_logps(model, *a), batch).losses
        rpo = DPOObjective(BETA, sft_weight=0.5)(lambda *a: token_logps(model, *a), batch).losses
    for i, ex in enumerate(examples):
        chosen = ex.seqs[0]
        positions = [t for t, f in enumerate(chosen.loss_mask) if f]
        nll = -_naive_logps(model, chosen.input_ids, positions) / len(positions)
        assert float(rpo[i] - plain[i]) == pytest.approx(0.5 * nll, abs=1e-4)


def test_dpo_loss_equals_trl_on_the_same_batch(train_models, pair_rows, tmp_path: Path) -> None:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    ours_model = load_model(train_models["policy"])
    trl_model = load_model(train_models["policy"]).model
    tok = ours_model.tokenizer
    rows = pair_rows[:6]
    refs = [(-18.0 + i, -16.0 - 0.25 * i) for i in range(len(rows))]
    _, batch = _pair_batch(tok, rows, refs)
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"), beta=BETA, report_to=[], use_cpu=True, max_length=None,
        per_device_train_batch_size=2, save_strategy="no", logging_strategy="no", precompute_ref_log_probs=False,
    )  # fmt: skip
    trainer = DPOTrainer(
        model=trl_model,
        ref_model=load_model(train_models["policy"]).model,
        args=args,
        train_dataset=Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]),
        processing_class=tok,
    )
    trainer.precompute_ref_logps = True  # take the reference log-probs from the batch, as ours does
    inputs = {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "completion_mask": batch.target_mask,  # observation tokens inside continuations masked
        "ref_chosen_logps": batch.ref_chosen,
        "ref_rejected_logps": batch.ref_rejected,
    }
    trl_loss = trainer.compute_loss(trainer.model, inputs)
    model = ours_model.model.train()
    ours = DPOObjective(BETA)(lambda *a: token_logps(model, *a), batch).losses.mean()
    assert abs(float(ours.detach()) - float(trl_loss.detach())) < 1e-5
    assert float(ours) != pytest.approx(math.log(2), abs=1e-3)  # a real margin, not the trivial value


def test_sft_objective_is_the_summed_agent_token_nll(policy, sft_rows) -> None:
    tok, model = policy.tokenizer, policy.model
    enc = ChatEncoder(tok)
    seq = enc.encode(sft_rows[3]["messages"])
    batch = collate([Example((seq,), 1.0)], tok.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        loss, metrics = sft_objective(lambda *a: token_logps(model, *a), batch)
    assert metrics == {}
    scored = [t for t, f in enumerate(seq.loss_mask) if f]
    assert float(loss[0]) == pytest.approx(-_naive_logps(model, seq.input_ids, scored), abs=1e-4)


def test_dpo_metrics_of_a_batch_by_hand() -> None:
    """Two pairs whose summed agent-token log-probs are set by a stand-in scorer (beta 0.3):

    pair  log pi(y+)   log pi(y-)   ref(y+)  ref(y-)  r+ = 0.3 (pi - ref)  r- = 0.3 (pi - ref)  r+ > r-
    1     -3 - 1 = -4  -6           -5       -5        0.3                 -0.3                 yes
    2     -2           -1 - 1 = -2  -1       -4       -0.3                  0.6                 no
    """
    ids = torch.zeros((4, 3), dtype=torch.int64)
    mask = torch.tensor([[0, 1, 1], [0, 1, 0], [0, 1, 0], [0, 1, 1]])
    batch = Batch(ids, torch.ones_like(ids), mask, torch.tensor([-5.0, -1.0]), torch.tensor([-5.0, -4.0]))
    token = torch.tensor([[0.0, -3.0, -1.0], [0.0, -2.0, 0.0], [0.0, -6.0, 0.0], [0.0, -1.0, -1.0]])
    losses, metrics = DPOObjective(BETA)(lambda *a: token, batch)
    expected = {
        "rewards/chosen": [0.3, -0.3],
        "rewards/rejected": [-0.3, 0.6],
        "rewards/margins": [0.6, -0.9],
        "rewards/accuracies": [1.0, 0.0],
        "logps/chosen": [-4.0, -2.0],
        "logps/rejected": [-6.0, -2.0],
    }
    assert list(metrics) == list(expected)  # TRL's names
    for name, values in expected.items():
        assert metrics[name].tolist() == pytest.approx(values, abs=1e-6), name
    sigmoid = [1 / (1 + math.exp(-m)) for m in expected["rewards/margins"]]
    assert losses.tolist() == pytest.approx([-math.log(p) for p in sigmoid], abs=1e-6)
    # RPO adds w * (-log pi(y+)) / |y+| to the loss and leaves the metrics as they are
    rpo_losses, rpo_metrics = DPOObjective(BETA, sft_weight=0.5)(lambda *a: token, batch)
    assert (rpo_losses - losses).tolist() == pytest.approx([0.5 * 4 / 2, 0.5 * 2 / 1], abs=1e-6)
    assert all(torch.equal(rpo_metrics[k], metrics[k]) for k in metrics)
    assert not any(t.requires_grad for t in metrics.values())


def test_collate_pads_as_its_docstring_shows() -> None:
    result = doctest.testmod(batch_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 5 and result.failed == 0


def test_source_weights_take_a_clipped_renormalised_gradient_step() -> None:
    w = SourceWeights(["a", "b", "c"], lr=0.1, min_weight=1e-6)
    assert w.row_weight([0]) == pytest.approx(1.0) and w.row_weight([0, 2]) == pytest.approx(1.0)
    assert w.row_weight([]) == 1.0
    grad = np.zeros(3)
    w.accumulate(grad, [0], 2.0)  # K / |S| = 3
    w.accumulate(grad, [0, 1], 1.0)  # 1.5 each
    w.accumulate(grad, [], 5.0)  # no source: no gradient
    np.testing.assert_allclose(grad, [7.5, 1.5, 0.0])
    w.step(grad / 3)
    raw = np.array([1 / 3 - 0.1 * 2.5, 1 / 3 - 0.1 * 0.5, 1 / 3])
    np.testing.assert_allclose(w.alpha, raw / raw.sum())
    assert w.alpha.sum() == pytest.approx(1.0) and w.alpha[0] < w.alpha[1] < w.alpha[2]
    prev = w.alpha.copy()
    w.step(np.array([100.0, 0.0, 0.0]))  # a huge step clips at min_weight, then renormalises
    expected = np.array([1e-6, prev[1], prev[2]])
    np.testing.assert_allclose(w.alpha, expected / expected.sum())
    assert w.alpha.sum() == pytest.approx(1.0)
    state = w.state_dict()
    w2 = SourceWeights(["a", "b", "c"], lr=0.1)
    w2.load_state_dict(state)
    np.testing.assert_array_equal(w2.alpha, w.alpha)


def test_epoch_order_is_seeded_per_epoch_with_easy_rows_first() -> None:
    a, b = epoch_order(10, seed=3, epoch=0), epoch_order(10, seed=3, epoch=0)
    np.testing.assert_array_equal(a, b)
    assert sorted(a.tolist()) == list(range(10))
    assert not np.array_equal(a, epoch_order(10, seed=3, epoch=1))
    easy = np.array([i % 3 == 0 for i in range(10)])
    order = epoch_order(10, seed=3, epoch=0, easy=easy)
    assert set(order[:4].tolist()) == {0, 3, 6, 9} and sorted(order.tolist()) == list(range(10))
