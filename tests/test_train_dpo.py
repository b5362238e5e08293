"""TreeDPO: weak and strong models with different tokenizers, cached reference log-probs checked against a
naive loop, the policy-as-reference start at log 2, cuts to max_length, and several weak supervisors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from w2s_agents.agents.models import load_model
from w2s_agents.config import from_dict
from w2s_agents.errors import DataFormatError
from w2s_agents.search import SearchConfig, node_values, search_tree, tree_pairs
from w2s_agents.trainers import (
    ChatEncoder,
    PairPlan,
    TrainConfig,
    Trainer,
    TrainResult,
    epoch_order,
    load_pairs,
    load_tokenizer,
    pair_messages,
    train_dpo,
)
from w2s_agents.trainers import reference as reference_module
from w2s_agents.tree import build_trees

pytestmark = pytest.mark.usefixtures("one_torch_thread_module")


def cfg(**kw) -> TrainConfig:
    base = dict(method="dpo", lr=1e-2, beta=0.5, batch_size=4, max_length=512, epochs=3, valid_fraction=0.0,
                checkpoint_every=0, warmup_ratio=0.0, log_every=100)  # fmt: skip
    base.update(kw)
    return from_dict(TrainConfig, base)


@pytest.fixture
def tree_pair_rows(golden_trajectories) -> list[dict]:
    """Step and continuation pairs extracted from a searched tree (sources 'weak' and 'strong')."""
    tree = next(iter(build_trees(golden_trajectories).values()))
    search_tree(tree, SearchConfig(iterations=50))
    return [row.to_dict() for row in tree_pairs(tree, node_values(tree, "mean"))]  # typed rows as JSON dicts


def _naive_completion_logp(lm, row: dict, side: str) -> float:
    """log p(agent tokens of row[side] | the rest) with the model's own tokenizer: positions from the
    template's {% generation %} mask after the prompt, one forward per scored token."""
    tok = lm.tokenizer
    conversation = row["prompt"] + row[side]
    out = tok.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids = list(out["input_ids"])
    n_prompt = len(tok.apply_chat_template(row["prompt"], tokenize=True, return_dict=True)["input_ids"])
    total = 0.0
    with torch.no_grad():
        for t, flag in enumerate(out["assistant_masks"]):
            if flag and t >= n_prompt:
                logits = lm.model(input_ids=torch.tensor([ids[:t]])).logits[0, -1].double()
                total += float(torch.log_softmax(logits, -1)[ids[t]])
    return total


@pytest.mark.slow
def test_tree_dpo_with_weak_and_strong_of_different_tokenizers(
    train_models, pair_rows, tree_pair_rows, tmp_path
) -> None:
    policy_tok, weak_tok = load_tokenizer(train_models["policy"]), load_tokenizer(train_models["weak"])
    sample = pair_rows[1]["prompt"][1]["content"]
    assert (
        len(policy_tok) != len(weak_tok) and policy_tok(sample)["input_ids"] != weak_tok(sample)["input_ids"]
    )
    rows = pair_rows + tree_pair_rows
    assert {r["level"] for r in tree_pair_rows} == {"step", "continuation"}
    out = tmp_path / "dpo"
    result = train_dpo(train_models["policy"], rows, out, cfg(), reference_path=train_models["weak"])
    assert result.method == "dpo" and result.rows == len(rows) and result.skipped_rows == 0
    # the cached dataset holds the reference log-probs computed with the weak model's own tokenizer
    cached = [json.loads(line) for line in (out / "reference.jsonl").read_text().splitlines()]
    assert len(cached) == len(rows)
    weak, strong = load_model(train_models["weak"]), load_model(train_models["policy"])
    for row in (cached[0], cached[1], cached[-1]):
        for side in ("chosen", "rejected"):
            expected = _naive_completion_logp(weak, row, side)
            assert row[f"ref_{side}_logp"] == pytest.approx(expected, abs=1e-4)
            assert abs(row[f"ref_{side}_logp"] - _naive_completion_logp(strong, row, side)) > 1e-3
    assert cached[0]["truncation"] == {"prompt_dropped": 0, "chosen_kept": 1, "rejected_kept": 1}
    trained = load_model(result.model_dir)
    assert len(trained.tokenizer) == len(policy_tok)  # the policy keeps its own tokenizer
    # the DPO loss over the training pairs fell, recomputed independently with the cached reference values

    def dpo_loss(lm) -> float:
        total = 0.0
        for r in cached:
            c, j = _naive_completion_logp(lm, r, "chosen"), _naive_completion_logp(lm, r, "rejected")
            margin = (c - r["ref_chosen_logp"]) - (j - r["ref_rejected_logp"])
            total += math.log1p(math.exp(-0.5 * margin))
        return total / len(cached)

    before, after = dpo_loss(strong), dpo_loss(trained)
    assert before > 0.3 and after < 0.5 * before, (before, after)
    assert result.loss_curve[-1][1] < result.loss_curve[0][1]


def test_policy_as_reference_starts_at_log_2_and_reuses_the_cache(
    train_models, pair_rows, tmp_path, monkeypatch
) -> None:
    out = tmp_path / "self"
    config = cfg(max_steps=1, batch_size=12, reference="strong")
    result = train_dpo(train_models["policy"], pair_rows, out, config, reference_path=train_models["policy"])
    assert result.loss_curve[0][1] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 0
    meta = json.loads((out / "reference.json").read_text())
    assert meta["rows"] == len(pair_rows)

    def no_model(*args, **kwargs):
        raise AssertionError("the cached reference log-probs should have been used")

    monkeypatch.setattr("w2s_agents.agents.models.load_model", no_model)
    pairs, skipped = reference_module.reference_logps(
        load_pairs(pair_rows),
        reference_path=train_models["policy"],
        policy_tokenizer=load_tokenizer(train_models["policy"]),
        config=config,
        cache_file=out / "reference.jsonl",
    )
    assert len(pairs) == len(pair_rows) and skipped == 0
    assert (
        pairs[3].ref_chosen
        == json.loads((out / "reference.jsonl").read_text().splitlines()[3])["ref_chosen_logp"]
    )


def test_long_pairs_are_cut_the_same_way_for_both_tokenizers(train_models, tree_pair_rows, tmp_path) -> None:
    encs = [ChatEncoder(load_tokenizer(train_models[k])) for k in ("policy", "weak")]
    longest = max(tree_pair_rows, key=lambda r: len(r["prompt"]) + len(r["chosen"]))
    limit = max(e.length(pair_messages(longest)[0]) for e in encs) - 5
    out = tmp_path / "cut"
    result = train_dpo(
        train_models["policy"], tree_pair_rows, out, cfg(max_length=limit, max_steps=2),
        reference_path=train_models["weak"],
    )  # fmt: skip
    cached = [json.loads(line) for line in (out / "reference.jsonl").read_text().splitlines()]
    plans = [PairPlan.from_dict(r["truncation"]) for r in cached]
    assert any(
        p.prompt_dropped > 0 or p.chosen_kept < len(r["chosen"]) for p, r in zip(plans, cached, strict=True)
    )
    for row, plan in zip(cached, plans, strict=True):
        for msgs in pair_messages(row, plan)[:2]:
            assert all(e.length(msgs) <= limit for e in encs)
    assert result.rows + result.skipped_rows == len(tree_pair_rows)


def test_pairs_may_carry_their_own_reference_logps(train_models, pair_rows, tmp_path) -> None:
    rows = [dict(r, ref_chosen_logp=-20.0, ref_rejected_logp=-10.0) for r in pair_rows]
    result = train_dpo(train_models["policy"], rows, tmp_path / "own", cfg(max_steps=2), reference_path=None)
    assert result.steps == 2
    with pytest.raises(DataFormatError, match=r"rows\[0\]: the pair has no reference log-probs"):
        train_dpo(train_models["policy"], pair_rows, tmp_path / "none", cfg(max_steps=2), reference_path=None)


def test_source_weights_are_learned_with_easy_pairs_first(
    train_models, pair_rows, tmp_path, monkeypatch
) -> None:
    epochs: dict[int, list[bool]] = {}
    original = Trainer._step

    def spy(self, micro_batches, state):
        epochs.setdefault(state["epoch"], []).extend(
            self.examples[i].easy for mb in micro_batches for i in mb
        )
        return original(self, micro_batches, state)

    monkeypatch.setattr(Trainer, "_step", spy)
    sources = {"weights": True, "weight_lr": 0.5, "easy_first": True}
    out = tmp_path / "raven"
    result = train_dpo(
        train_models["policy"], pair_rows, out, cfg(sources=sources, reference="strong"),
        reference_path=train_models["policy"], valid_pairs_or_path=pair_rows[:3],
    )  # fmt: skip
    assert len(epochs) == 3
    for flags in epochs.values():  # each epoch takes the easy pairs (same sources on both sides) first
        assert True in flags and False in flags and flags == sorted(flags, reverse=True)
    weights = result.source_weights
    assert set(weights) == {"weak-a", "weak-b"} and sum(weights.values()) == pytest.approx(1.0)
    assert weights["weak-a"] < 0.45  # weak-a alone labels some pairs: its weight took larger gradient steps
    saved = json.loads((out / "source_weights.json").read_text())
    assert saved["weights"] == weights and len(saved["history"]) == 3
    assert result.valid_metric == "valid_loss" and len(result.valid_curve) == 3


DPO_METRICS = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected"]  # fmt: skip


def test_step_metrics_equal_a_hand_computation_and_are_saved(
    train_models, pair_rows, tmp_path, caplog
) -> None:
    """One step over micro-batches of 5, 5 and 2 pairs: each metric is the mean over the step's 12 pairs of
    values recomputed by hand (policy log-probs from a naive per-prefix loop, the rows' reference log-probs),
    not the mean of the micro-batches' means. The per-step curve lands in result.json and curves.json."""
    beta = 0.5
    policy = load_model(train_models["policy"])
    logps = [
        (_naive_completion_logp(policy, r, "chosen"), _naive_completion_logp(policy, r, "rejected"))
        for r in pair_rows
    ]
    # references that put the reward of the chosen side above that of the rejected one for 8 pairs of 12
    rows = [
        dict(r, ref_chosen_logp=c - (i % 3 - 0.5), ref_rejected_logp=j - 0.25 * (i % 2))
        for i, (r, (c, j)) in enumerate(zip(pair_rows, logps, strict=True))
    ]
    r_plus = [beta * (c - r["ref_chosen_logp"]) for r, (c, _) in zip(rows, logps, strict=True)]
    r_minus = [beta * (j - r["ref_rejected_logp"]) for r, (_, j) in zip(rows, logps, strict=True)]
    per_pair = {
        "rewards/chosen": r_plus,
        "rewards/rejected": r_minus,
        "rewards/margins": [a - b for a, b in zip(r_plus, r_minus, strict=True)],
        "rewards/accuracies": [float(a > b) for a, b in zip(r_plus, r_minus, strict=True)],
        "logps/chosen": [c for c, _ in logps],
        "logps/rejected": [j for _, j in logps],
    }
    expected = {k: sum(v) / len(v) for k, v in per_pair.items()}
    assert expected["rewards/accuracies"] == pytest.approx(8 / 12)
    out = tmp_path / "metrics"
    config = cfg(beta=beta, batch_size=5, grad_accum=3, epochs=2)
    with caplog.at_level("INFO", logger="w2s_agents.trainers.loop"):
        result = train_dpo(train_models["policy"], rows, out, config, reference_path=None)
    assert result.steps == 2
    first = result.metrics_curve[0]
    assert list(first) == ["step", "loss", "grad_norm", "learning_rate", *DPO_METRICS]
    for name, value in expected.items():
        assert first[name] == pytest.approx(value, abs=1e-4), name
    # the micro-batches' means, averaged without their sizes, would be another number
    order = epoch_order(len(rows), config.seed, 0)
    means = [
        sum(per_pair["logps/chosen"][i] for i in mb) / len(mb) for mb in (order[:5], order[5:10], order[10:])
    ]
    assert abs(sum(means) / 3 - expected["logps/chosen"]) > 1e-2
    losses = [math.log1p(math.exp(-m)) for m in per_pair["rewards/margins"]]
    assert first["loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-4)
    assert [[e["step"], e["loss"]] for e in result.metrics_curve] == [list(p) for p in result.loss_curve]
    # saved per step in result.json and curves.json; the final metrics average the last log_every steps
    saved = json.loads((out / "result.json").read_text())
    curves = json.loads((out / "curves.json").read_text())
    assert saved["metrics_curve"] == curves["metrics"] == result.metrics_curve
    assert [e["step"] for e in curves["metrics"]] == [1, 2]
    assert all(set(DPO_METRICS) <= set(e) for e in curves["metrics"])
    names = ["loss", "grad_norm", "learning_rate", *DPO_METRICS]
    assert result.final_metrics == pytest.approx(
        {k: sum(e[k] for e in result.metrics_curve) / 2 for k in names}
    )
    assert saved["final_metrics"] == result.final_metrics
    assert TrainResult.load(out) == result
    logged = [r.getMessage() for r in caplog.records if " step 1/2 " in r.getMessage()]
    assert len(logged) == 1 and "rewards/margins" in logged[0] and "logps/rejected" in logged[0]
    # a result.json written before the metrics curve existed still loads
    old = tmp_path / "old"
    old.mkdir()
    for key in ("metrics_curve", "final_metrics"):
        saved.pop(key)
    (old / "result.json").write_text(json.dumps(saved))
    loaded = TrainResult.load(old)
    assert (
        loaded.metrics_curve == [] and loaded.final_metrics == {} and loaded.loss_curve == result.loss_curve
    )
