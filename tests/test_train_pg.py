"""The policy-gradient trainer (method pg): its objective on hand-made batches, a two-action bandit where the
better action's probability rises (and falls with the advantage's sign flipped), the KL term's pull towards the
reference, ``w2s train pg``, and a killed-and-resumed run that equals an uninterrupted one."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from w2s_agents.agents.models import load_model
from w2s_agents.errors import ConfigError, DataFormatError
from w2s_agents.messages import SYSTEM_PROMPT, agent_message, task_messages
from w2s_agents.search.advantages import group_normalise
from w2s_agents.trainers import Batch, PGOptions, TrainConfig, train_pg
from w2s_agents.trainers.masks import ChatEncoder
from w2s_agents.trainers.pg import PGObjective

REPO = Path(__file__).resolve().parents[1]
PROMPT = task_messages(
    "Bring the key north.", "-= Kitchen =- You are in a kitchen. You see a key.", system=SYSTEM_PROMPT
)
GOOD, BAD = "take key", "take lamp"  # the bandit's actions: reward 1 and 0


pytestmark = pytest.mark.usefixtures("one_torch_thread_module")


# ------------------------------------------------------------------ the objective on hand-made batches


class _FixedLogps(PGObjective):
    """The objective with the frozen models' log-probs given (no model is loaded)."""

    def __init__(self, options: PGOptions, frozen: dict[str, torch.Tensor]) -> None:
        super().__init__(options, start_path="start", reference_path="ref" if options.kl_coef else None)
        self.given = {self.start_path: frozen.get("start"), self.reference_path: frozen.get("ref")}

    def _logps(self, path, batch):  # the test's stand-in for the frozen models
        return self.given[path]


def _batch(advantages: list[float]) -> Batch:
    # two rows of 4 positions; row 0 scores positions 1-2, row 1 position 3
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 1]])
    return Batch(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long), mask,
                 advantages=torch.tensor(advantages))  # fmt: skip


def _scorer(values: list[list[float]]):
    logp = torch.tensor(values, requires_grad=True)
    return logp, (lambda ids, attn, target: logp * target)


def test_reinforce_loss_and_aggregation_by_hand() -> None:
    logp, scorer = _scorer([[0.0, -1.0, -2.0, 0.0], [0.0, 0.0, 0.0, -0.5]])
    out = _FixedLogps(PGOptions(loss="reinforce"), {})(scorer, _batch([2.0, -1.0]))
    # row 0: -A * (l1 + l2) = -2 * (-3) = 6; row 1: -(-1) * (-0.5) = -0.5
    assert out.losses.tolist() == pytest.approx([6.0, -0.5])
    out.losses.sum().backward()
    assert logp.grad.tolist() == [[0.0, -2.0, -2.0, 0.0], [0.0, 0.0, 0.0, 1.0]]  # -A on the agent tokens
    assert out.metrics["pg/entropy"].tolist() == pytest.approx([1.5, 0.5])  # mean -l over the agent tokens
    assert out.metrics["pg/advantage"].tolist() == [2.0, -1.0]
    seq = _FixedLogps(PGOptions(loss="reinforce", aggregation="sequence"), {})(scorer, _batch([2.0, -1.0]))
    assert seq.losses.tolist() == pytest.approx([3.0, -0.5])  # each row's token mean


def test_clipped_ratio_loss_kl_and_metrics_by_hand() -> None:
    logp, scorer = _scorer([[0.0, -1.0, -2.0, 0.0], [0.0, 0.0, 0.0, -0.5]])
    start = torch.tensor([[0.0, -1.5, -2.0, 0.0], [0.0, 0.0, 0.0, -0.25]])
    ref = torch.tensor([[0.0, -1.0, -1.0, 0.0], [0.0, 0.0, 0.0, -0.5]])
    opt = PGOptions(loss="clip", clip_eps=0.2, kl_coef=0.5)
    out = _FixedLogps(opt, {"start": start, "ref": ref})(scorer, _batch([2.0, -1.0]))
    # row 0, A = 2: r = (e^0.5, e^0) = (1.6487, 1); min(rA, clip(r)A) = (1.2 * 2, 2) -> surrogate -(2.4 + 2)
    #   k3: d = ref - l = (0, 1): e^0 - 0 - 1 = 0, e^1 - 1 - 1 = 0.71828 -> + 0.5 * 0.71828
    # row 1, A = -1: r = e^-0.25 = 0.7788 < 0.8; min(-0.7788, -0.8) = -0.8 -> surrogate +0.8 (clipped); k3 = 0
    assert out.losses.tolist() == pytest.approx([-4.4 + 0.5 * (np.e - 2), 0.8], rel=1e-5)
    assert out.metrics["pg/clip_fraction"].tolist() == pytest.approx([0.5, 1.0])
    assert out.metrics["pg/kl"].tolist() == pytest.approx([(np.e - 2) / 2, 0.0], rel=1e-5)
    assert out.metrics["pg/ratio"].tolist() == pytest.approx([(np.exp(0.5) + 1) / 2, np.exp(-0.25)], rel=1e-5)
    out.losses.sum().backward()
    # clipped tokens give no surrogate gradient: token (0, 1) only its KL gradient 0.5 * (1 - e^0) = 0,
    # token (0, 2): -A r = -2 plus KL 0.5 * (1 - e^1); token (1, 3): clipped, KL gradient 0
    assert logp.grad[0, 1].item() == pytest.approx(0.0, abs=1e-6)
    assert logp.grad[0, 2].item() == pytest.approx(-2.0 + 0.5 * (1 - np.e), rel=1e-5)
    assert logp.grad[1, 3].item() == pytest.approx(0.0, abs=1e-6)


def test_pg_config_and_rows_are_checked(train_models, tmp_path) -> None:
    with pytest.raises(ConfigError, match="clip_eps"):
        PGOptions(clip_eps=1.5)
    with pytest.raises(ConfigError, match="kl_coef"):
        PGOptions(kl_coef=-1.0)
    with pytest.raises(ConfigError, match="train_pg trains method pg"):
        train_pg(train_models["policy"], [], tmp_path / "x", TrainConfig(method="sft"))
    with pytest.raises(DataFormatError, match=r"rows\[0\]: a policy-gradient row needs a finite number"):
        train_pg(train_models["policy"], [{"messages": [*PROMPT, agent_message(GOOD)]}], tmp_path / "y",
                 TrainConfig(method="pg"))  # fmt: skip
    rows = [{"messages": [*PROMPT, agent_message(GOOD)], "advantage": 1.0}]
    cfg = TrainConfig(method="pg", pg=PGOptions(kl_coef=0.1), valid_fraction=0.0)
    with pytest.raises(ConfigError, match="another vocabulary than the policy"):
        train_pg(train_models["policy"], rows, tmp_path / "z", cfg, reference_path=train_models["weak"])


# ------------------------------------------------------------------ the two-action bandit


def _action_logps(model_dir: Path) -> np.ndarray:
    """``log pi(a | prompt)`` of the good and the bad action (summed over the action's agent tokens)."""
    lm = load_model(model_dir, device="cpu", dtype="float32")
    enc = ChatEncoder(lm.tokenizer)
    from w2s_agents.trainers.logps import token_logps

    out = []
    with torch.no_grad():
        for action in (GOOD, BAD):
            e = enc.encode([*PROMPT, agent_message(action)], score_from=len(PROMPT))
            ids = torch.tensor([e.input_ids])
            out.append(
                float(token_logps(lm.model, ids, torch.ones_like(ids), torch.tensor([e.loss_mask])).sum())
            )
    return np.array(out)


def _p_good(logps: np.ndarray) -> float:
    """The policy's probability of the good action when it chooses between the two."""
    return float(np.exp(logps[0]) / np.exp(logps).sum())


def _bandit_rows(model_dir: Path, n: int, sign: float = 1.0) -> list[dict]:
    """``n`` actions sampled (seeded) from the policy's choice between the two actions, rewarded 1 (good) or 0,
    advantages group-normalised over the sample (GRPO), times ``sign``."""
    rng = np.random.default_rng(0)
    p = _p_good(_action_logps(model_dir))
    good = rng.random(n) < np.clip(p, 0.2, 0.8)  # both actions appear in the sample
    good[:2] = [True, False]
    adv = group_normalise(good.astype(float)) * sign
    return [
        {"messages": [*PROMPT, agent_message(GOOD if g else BAD)], "advantage": float(a), "task_id": "bandit"}
        for g, a in zip(good, adv, strict=True)
    ]


def _train(model: Path, rows: list[dict], out: Path, **pg) -> Path:
    cfg = TrainConfig(method="pg", lr=3e-3, max_steps=6, batch_size=4, valid_fraction=0.0, warmup_ratio=0.0,
                      lr_scheduler="constant", checkpoint_every=0, max_length=256, pg=PGOptions(**pg))  # fmt: skip
    result = train_pg(model, rows, out, cfg)
    assert result.steps == 6 and "pg/advantage" in result.metrics_curve[0]
    return result.model_dir


@pytest.mark.parametrize("loss", ["clip", "reinforce"])
def test_bandit_better_action_rises_and_falls_with_the_sign_flipped(train_models, tmp_path, loss) -> None:
    model = train_models["policy"]
    before = _p_good(_action_logps(model))
    rows = _bandit_rows(model, 8)
    up = _p_good(_action_logps(_train(model, rows, tmp_path / "up", loss=loss)))
    flipped = [{**r, "advantage": -r["advantage"]} for r in rows]
    down = _p_good(_action_logps(_train(model, flipped, tmp_path / "down", loss=loss)))
    assert up > before + 0.05, (before, up)
    assert down < before - 0.05, (before, down)


def test_kl_term_keeps_the_policy_near_the_reference(train_models, tmp_path) -> None:
    model = train_models["policy"]
    start = _action_logps(model)
    rows = _bandit_rows(model, 8)
    free = _action_logps(_train(model, rows, tmp_path / "free", loss="reinforce", kl_coef=0.0))
    held = _action_logps(_train(model, rows, tmp_path / "held", loss="reinforce", kl_coef=10.0))
    moved_free, moved_held = np.abs(free - start).sum(), np.abs(held - start).sum()
    # measured: the log-probs of the two actions moved 3.2 nats in all without KL, 0.2 with kl_coef 10
    assert moved_held < 0.5 * moved_free, (moved_free, moved_held)
    assert moved_held > 0  # the policy still learns


# ------------------------------------------------------------------ the CLI and resume


def test_w2s_train_pg_command(train_models, tmp_path, capsys) -> None:
    from w2s_agents.cli import main

    rows = tmp_path / "pg.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in _bandit_rows(train_models["policy"], 6)))
    cfg = tmp_path / "pg.yaml"
    cfg.write_text(f"model: {train_models['policy']}\ndata: [{rows}]\nout_dir: {tmp_path / 'run'}\n"
                   "train:\n  max_steps: 2\n  valid_fraction: 0.0\n  pg:\n    kl_coef: 0.1\n")  # fmt: skip
    assert main(["train", "pg", str(cfg), "train.pg.loss=reinforce", "train.reference=strong"]) == 0
    printed = capsys.readouterr().out
    assert f"{tmp_path / 'run'}: pg, 6 rows (0 too long), 2 steps" in printed
    curve = json.loads((tmp_path / "run" / "result.json").read_text())["metrics_curve"]
    assert curve[0]["pg/kl"] == pytest.approx(0.0, abs=1e-6) and "pg/clip_fraction" in curve[0]


@pytest.mark.slow
def test_killed_and_resumed_pg_run_equals_an_uninterrupted_run(
    train_models, kill_and_resume, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    model = train_models["policy"]
    train = {"method": "pg", "lr": 3e-3, "batch_size": 2, "grad_accum": 2, "epochs": 2, "max_length": 256,
             "checkpoint_every": 2, "valid_fraction": 0.0, "pg": {"loss": "clip", "kl_coef": 0.1}}  # fmt: skip
    run = kill_and_resume(tmp_path, "train_pg", model, _bandit_rows(model, 12), train, "step-00000002",
                          ", reference_path=model")  # fmt: skip
    assert run.uninterrupted.returncode == 0 and "steps 6" in run.uninterrupted.stdout, (
        run.uninterrupted.stderr[-3000:]
    )
    assert run.killed_returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not run.result_at_kill
    assert run.resumed.returncode == 0, run.resumed.stderr[-3000:]
    assert "resuming pg from" in run.resumed.stderr and "steps 6" in run.resumed.stdout
    reference, killed = run.reference, run.killed
    a = load_file(str(reference / "model" / "model.safetensors"))
    b = load_file(str(killed / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical weights
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (reference, killed))
    assert ra["metrics_curve"] == rb["metrics_curve"] and len(ra["metrics_curve"]) == 6


def test_pg_section_leaves_other_methods_identity_unchanged(train_models) -> None:
    from w2s_agents.pipeline.tracking import train_key_part
    from w2s_agents.trainers.fingerprint import run_fingerprint

    for method in ("sft", "mcts-sft", "dpo"):
        plain, tuned = TrainConfig(method=method), TrainConfig(method=method, pg=PGOptions(kl_coef=0.5))
        assert "pg" not in train_key_part(plain) and train_key_part(plain) == train_key_part(tuned)
        assert run_fingerprint(plain, train_models["policy"]) == run_fingerprint(
            tuned, train_models["policy"]
        )
    pg_a, pg_b = TrainConfig(method="pg"), TrainConfig(method="pg", pg=PGOptions(kl_coef=0.5))
    assert train_key_part(pg_a)["pg"]["kl_coef"] == 0.0 and train_key_part(pg_a) != train_key_part(pg_b)
    assert run_fingerprint(pg_a, train_models["policy"]) != run_fingerprint(pg_b, train_models["policy"])


def test_rows_of_a_searched_tree_train_end_to_end(train_models, golden_trajectories, tmp_path) -> None:
    from w2s_agents.search.advantages import pg_rows
    from w2s_agents.search.mcts import search_tree
    from w2s_agents.search.rows import write_rows
    from w2s_agents.tree import build_trees

    tree = build_trees(golden_trajectories)["house/0"]
    search_tree(tree)
    rows = pg_rows(tree, level="step", value="mcts")
    path = tmp_path / "pg.jsonl"
    assert write_rows((r.to_dict() for r in rows), path) == len(rows) == 6
    cfg = TrainConfig(method="pg", lr=1e-3, max_steps=2, batch_size=3, valid_fraction=0.0, max_length=256)
    result = train_pg(train_models["policy"], str(path), tmp_path / "run", cfg)
    assert result.rows == 6 and result.steps == 2
    mean_adv = float(np.mean([r.advantage for r in rows]))
    logged = np.mean([m["pg/advantage"] for m in result.metrics_curve])  # the two steps cover the 6 rows
    assert logged == pytest.approx(mean_adv, abs=1e-6)


def test_long_rows_lose_their_oldest_turns_and_keep_the_loss_on_the_step(train_models) -> None:
    from w2s_agents.trainers.model import load_tokenizer
    from w2s_agents.trainers.pg import encode_pg_rows, load_pg_rows

    history = [
        m for k in range(12) for m in (agent_message(f"take key {k}"), {"role": "user", "content": "ok."})
    ]
    rows = load_pg_rows([{"messages": [*PROMPT, *history, agent_message(GOOD)], "advantage": -0.5}])
    enc = ChatEncoder(load_tokenizer(train_models["policy"]))
    step = enc.encode([*PROMPT, history[-1], agent_message(GOOD)], score_from=3)
    full = enc.encode(rows[0].data["messages"], score_from=len(rows[0].data["messages"]) - 1)
    cfg = TrainConfig(method="pg", max_length=len(full) - 20)
    (ex,), skipped = encode_pg_rows(rows, enc, cfg, {})
    assert skipped == 0 and len(ex.seqs[0]) <= cfg.max_length < len(full)
    assert ex.seqs[0].n_loss_tokens == step.n_loss_tokens == ex.units and ex.advantage == -0.5
    _, skipped = encode_pg_rows(rows, enc, TrainConfig(method="pg", max_length=8), {})
    assert skipped == 1
