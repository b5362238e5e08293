"""On-policy RL rounds from the trajectory trees (``rl.rounds``): the W2S-RL models.

After the weak-to-strong stages (and the rounds of ``run.rounds``), each RL round k = 1 .. ``rl.rounds`` adds::

    rl-explore-r<k>  round k's policy on every train task with the explore settings (explore.samplers x seeds,
                     explore.width: the tree width), through the explore stage's rollout engine and backends;
                     round 1's policy is rl.start's model (strong-sft, or w2s-mcts: the last run round's
                     W2S-MCTS), round k > 1's is w2s-rl-r<k-1>; role strong, source the policy's name
    rl-trees-r<k>    one tree per task holding the weak agent's explorations (every exploration the last run
                     round's trees hold) and every RL exploration so far, merged as the trees stage merges
                     (``tree``); the nodes count trajectories per source
    rl-search-r<k>   MCTS over those trees (``search``, seeded as the search stage), then the policy-gradient
                     rows of every tree: A(n) = Q(n) - V(parent(n)) (``rl.advantage: step``) or the episodes'
                     group-normalised returns (``trajectory``; GRPO)
    w2s-rl-r<k>      policy gradient (``train.rl``, method pg) from round k's policy on those rows, KL to
                     rl.start's model

The weak agent's trees seed round one: the strong policy's first update credits its own steps and the weak
agent's against the values of the trees both grew. Every RL stage is made from the explore and trees stages (same
function, config part and version; the explorer and its source changed) or is new, so with ``rl.rounds: 0`` (the
default) the stage table and every key are those of a run without RL, and ``rl.rounds: N+1`` reuses the stages of
``rl.rounds: N``. The models ``w2s-rl-r<k>`` are evaluated with the W2S models (PGR, paired difference to strong
SFT, misfit, correction and expansion) and reported as "W2S-RL (round k)".

This module holds the ``rl`` config section, the RL stage table, the names of the RL models, and the run's ``rl``
metrics and their report section. Apart from the stage table (:class:`~w2s_agents.pipeline.cache.Stage`) it
imports nothing of the pipeline, so that the config, the metrics and the report can import it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from w2s_agents.config import check, option
from w2s_agents.pipeline.cache import Stage
from w2s_agents.pipeline.rounds import round_name, round_source

if TYPE_CHECKING:
    from w2s_agents.pipeline.experiment import ExperimentConfig

__all__ = [
    "RL_LABEL",
    "RLConfig",
    "check_rl",
    "order_rl_rows",
    "rl_label",
    "rl_metrics",
    "rl_models",
    "rl_policy",
    "rl_round_stages",
    "rl_section",
    "rl_source",
    "rl_start_model",
]

RL_LABEL = "W2S-RL"
"""Display name of the RL models: ``"W2S-RL (round 1)"``."""

_RL_MODEL = re.compile(r"w2s-rl-r([1-9][0-9]*)")

TrainingStage = Callable[..., Stage]
"""``training(name, run, train_config, deps, **kw)``: the pipeline's training stage with its config part."""


@dataclass(frozen=True)
class RLConfig:
    """On-policy RL rounds (the ``rl`` section): the strong model explores the train tasks, its episodes join the
    weak agent's trees, and policy gradient (``train.rl``) trains it on advantages from the grown trees."""

    rounds: int = option(
        0,
        "RL rounds after the W2S stages: round k's policy explores the train tasks, its episodes join the trees, "
        "policy gradient trains it on their advantages (model w2s-rl-r<k>); 0: none",
    )
    start: Literal["strong-sft", "w2s-mcts"] = option(
        "w2s-mcts",
        "the model RL round 1 starts from and explores with, and the KL reference of every round: w2s-mcts "
        "(W2S-MCTS of the last run round) or strong-sft (the strong SFT agent)",
    )
    advantage: Literal["step", "trajectory"] = option(
        "step",
        "step: A(n) = Q(n) - V(parent) from the searched trees, Q by search.value; trajectory: each task's "
        "episode returns normalised in the group (GRPO)",
    )
    min_abs_advantage: float = option(
        0.01, "steps whose |advantage| is below this make no row (a node without siblings has A = 0)"
    )

    def __post_init__(self) -> None:
        check(self.rounds >= 0, "rounds", f"must be >= 0, got {self.rounds}")
        check(
            math.isfinite(self.min_abs_advantage) and self.min_abs_advantage >= 0,
            "min_abs_advantage",
            f"must be a number >= 0, got {self.min_abs_advantage}",
        )


def check_rl(cfg: ExperimentConfig) -> None:
    """Check the ``rl`` section against the rest of ``cfg`` (for the experiment's ``__post_init__``).

    Raises:
        ConfigError: with ``rl.rounds`` > 0, ``rl.start`` is w2s-mcts and the run does not train W2S-MCTS, or
            ``train.rl.method`` is not pg.
    """
    if cfg.rl.rounds == 0:
        return
    check(
        cfg.train.rl.method == "pg",
        "train.rl.method",
        f"is {cfg.train.rl.method!r}: the RL rounds train by policy gradient (pg)",
    )
    variants = list(cfg.train.variants)
    trained = "w2s-mcts" in variants or "w2s-mcts-treedpo" in variants
    check(
        cfg.rl.start != "w2s-mcts" or trained,
        "rl.start",
        f"is 'w2s-mcts', which this run does not train (train.variants: [{', '.join(variants)}]): add w2s-mcts "
        "to train.variants or start from strong-sft",
    )


# ------------------------------------------------------------------------------------------- names


def rl_start_model(cfg: ExperimentConfig) -> str:
    """The stage whose model RL round 1 starts from and every round's KL reference: ``strong-sft``, or the
    last run round's W2S-MCTS (``w2s-mcts``, ``w2s-mcts-r<run.rounds>``)."""
    return "strong-sft" if cfg.rl.start == "strong-sft" else round_name("w2s-mcts", cfg.run.rounds)


def rl_policy(cfg: ExperimentConfig, k: int) -> str:
    """The stage whose model explores in RL round ``k`` and that round's training starts from."""
    return rl_start_model(cfg) if k == 1 else f"w2s-rl-r{k - 1}"


def rl_source(cfg: ExperimentConfig, k: int) -> str:
    """The source (``Trajectory.source.model``) of RL round ``k``'s episodes: the exploring model's name, with
    its round for a W2S model (``w2s-mcts-r1``, as :func:`~w2s_agents.pipeline.rounds.round_source` names it;
    ``w2s-rl-r1``), ``strong-sft`` for the strong SFT agent."""
    if k > 1:
        return rl_policy(cfg, k)
    return "strong-sft" if cfg.rl.start == "strong-sft" else round_source("w2s-mcts", cfg.run.rounds)


def rl_models(rounds: int) -> list[str]:
    """The RL models of ``rounds`` RL rounds: ``w2s-rl-r1`` .. ``w2s-rl-r<rounds>``."""
    return [f"w2s-rl-r{k}" for k in range(1, rounds + 1)]


def rl_label(name: str) -> str | None:
    """Display name of an RL model (``w2s-rl-r2`` -> ``"W2S-RL (round 2)"``); None for any other name."""
    m = _RL_MODEL.fullmatch(name)
    return f"{RL_LABEL} (round {m.group(1)})" if m else None


def order_rl_rows(known: list[str], models: Sequence[str]) -> list[str]:
    """The results table's rows ``known`` with the RL models of ``models`` put in, round by round, after the
    W2S rows (before the ceiling's); returns the rows inserted."""
    rl = sorted((m for m in models if rl_label(m) is not None), key=lambda m: int(m.rsplit("-r", 1)[1]))
    at = next((i for i, m in enumerate(known) if m.startswith("ceiling")), len(known))
    known[at:at] = rl
    return rl


# ------------------------------------------------------------------------------------------- stages


def rl_round_stages(
    cfg: ExperimentConfig,
    seed: int,
    stages: Sequence[Stage],
    training: TrainingStage,
    *,
    search_run: Callable[..., Any],
    pg_run: Callable[..., Any],
) -> list[Stage]:
    """The stages of RL rounds 1 .. ``rl.rounds`` (see the module docstring), made from the run's ``stages``
    (those of every run round); empty with ``rl.rounds`` 0.

    Args:
        cfg: the experiment.
        seed: the run seed.
        stages: the run's stages so far (explore and the last run round's trees among them).
        training: the pipeline's training-stage factory (its config part and validation dependencies).
        search_run: the stage function of ``rl-search-r<k>`` (``run_rl_search``).
        pg_run: the stage function of ``w2s-rl-r<k>`` (``run_pg``).
    """
    if cfg.rl.rounds == 0:
        return []
    by = {s.name: s for s in stages}
    explore, trees = by["explore"], by[round_name("trees", cfg.run.rounds)]
    explores: tuple[str, ...] = trees.run.keywords.get("explores", ("explore",))  # type: ignore[attr-defined]
    start = rl_start_model(cfg)
    previous = trees.name
    out: list[Stage] = []
    for k in range(1, cfg.rl.rounds + 1):
        policy, source = rl_policy(cfg, k), rl_source(cfg, k)
        ex = replace(
            explore,
            name=f"rl-explore-r{k}",
            run=partial(explore.run, model=policy, source=source, role="strong"),
            config={**explore.config, "explorer": source},
            deps=(policy,),
        )
        explores = (*explores, ex.name)
        tr = replace(
            trees, name=f"rl-trees-r{k}", run=partial(trees.run, explores=explores), deps=(previous, ex.name)
        )
        se = Stage(
            f"rl-search-r{k}",
            partial(search_run, cfg=cfg, seed=seed, trees_stage=tr.name),
            config={
                "search": cfg.search,
                "advantage": cfg.rl.advantage,
                "min_abs_advantage": cfg.rl.min_abs_advantage,
                "seed": seed,
            },
            deps=(tr.name,),
        )
        deps = (se.name, *dict.fromkeys((policy, start)))
        model = training(
            f"w2s-rl-r{k}", pg_run, cfg.train.rl, deps, start=policy, reference=start, search=se.name
        )
        out += [ex, tr, se, model]
        previous = tr.name
    return out


# ------------------------------------------------------------------------------------------- metrics


def _json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def rl_metrics(run_dir: Path, seeds: Sequence[int], cfg: ExperimentConfig) -> dict[str, Any]:
    """The ``rl`` entry of a run's metrics, summed over ``seeds``: per RL round, who explored, its episodes,
    successes and tasks solved, its trees (trajectories so far, nodes, trees with a successful leaf, the
    trajectories per source), its policy-gradient rows (positive and negative advantages, mean advantage), the
    env steps and tokens of its exploration, and whether its model trained."""
    per: list[dict[str, Any]] = []
    for k in range(1, cfg.rl.rounds + 1):
        row: dict[str, Any] = {
            "round": k,
            "explored_by": rl_source(cfg, k),
            "episodes": 0,
            "successes": 0,
            "tasks_solved": 0,
            "env_steps": 0,
            "tokens": 0,
            "trajectories": 0,
            "nodes": 0,
            "trees_with_success": 0,
            "sources": {},
            "rows": 0,
            "positive": 0,
            "negative": 0,
            "advantage_sum": 0.0,
            "models": [],
            "skipped": [],
        }
        for s in seeds:
            seed_dir = run_dir / f"seed-{s}"
            ex = _json(seed_dir / f"rl-explore-r{k}" / "explore.json") or {}
            for key in ("episodes", "successes", "tasks_solved", "env_steps", "tokens"):
                row[key] += ex.get(key, 0)
            if ex.get("skipped"):
                row["skipped"].append(f"seed {s}: exploration skipped, {ex['skipped']}")
            for t in _json(seed_dir / f"rl-trees-r{k}" / "trees.json") or []:
                row["trajectories"] += t["trajectories"]
                row["nodes"] += t["nodes"]
                row["trees_with_success"] += t["success_leaves"] > 0
            adv = _json(seed_dir / f"rl-search-r{k}" / "advantages.json") or {}
            for key in ("rows", "positive", "negative"):
                row[key] += adv.get(key, 0)
            row["advantage_sum"] += adv.get("advantage_sum", 0.0)
            for src, n in adv.get("sources", {}).items():
                row["sources"][src] = row["sources"].get(src, 0) + n
            info = _json(seed_dir / f"w2s-rl-r{k}" / "model.json") or {}
            if info.get("model_dir") and f"w2s-rl-r{k}" not in row["models"]:
                row["models"].append(f"w2s-rl-r{k}")
            if info.get("skipped"):
                row["skipped"].append(f"seed {s}: training skipped, {info['skipped']}")
        row["mean_advantage"] = row.pop("advantage_sum") / row["rows"] if row["rows"] else None
        if not row["skipped"]:
            del row["skipped"]
        per.append(row)
    return {
        "rounds": cfg.rl.rounds,
        "start": rl_start_model(cfg),
        "advantage": cfg.rl.advantage,
        "per_round": per,
    }


def rl_section(metrics: Mapping[str, Any], labels: Mapping[str, str]) -> list[str]:
    """The report's "RL rounds" section (markdown lines) from ``metrics["rl"]``; empty without RL rounds.
    ``labels`` are the display names of the stages."""
    data = metrics.get("rl")
    if not data or not data.get("rounds"):
        return []
    models = metrics.get("models", {})
    start = labels.get(data["start"], data["start"])
    how = (
        "A(n) = Q(n) - V(parent), Q the node's search value"
        if data.get("advantage") == "step"
        else "each task's episode returns normalised in the group (GRPO)"
    )
    lines = [
        "## RL rounds",
        "",
        f"Round 1 starts from {start}; round k+1 from round k's W2S-RL model. Each round's policy explores the "
        "train tasks, its episodes join the weak agent's trees (with every earlier round's), MCTS searches the "
        f"grown trees, and policy gradient trains the policy on the steps' advantages ({how}), KL to {start}. "
        "Counts are summed over run seeds; return x100 is the held-out estimate.",
        "",
        "| round | explored by | episodes (successes) | tasks solved | trajectories in the trees | nodes | "
        "PG rows (A > 0 / A < 0) | mean advantage | model: return x100 |",
        "|" + "|".join(" --- " for _ in range(9)) + "|",
    ]
    notes = []
    for r in data.get("per_round", []):
        scores = []
        for name in r.get("models", []):
            est = models.get(name, {}).get("return", {}).get("estimate")
            label = models.get(name, {}).get("label") or rl_label(name) or name
            scores.append(f"{label} {'n/a' if est is None else f'{100 * est:.1f}'}")
        mean = r.get("mean_advantage")
        cells = [
            str(r["round"]),
            f"`{r['explored_by']}`",
            f"{r['episodes']} ({r['successes']})",
            str(r["tasks_solved"]),
            str(r["trajectories"]),
            str(r["nodes"]),
            f"{r['rows']} ({r['positive']} / {r['negative']})",
            "n/a" if mean is None else f"{mean:+.3f}",
            "; ".join(scores) or "none trained",
        ]
        lines.append("| " + " | ".join(cells) + " |")
        notes += [f"- Round {r['round']}: {why}." for why in r.get("skipped", [])]
    if notes:
        lines += ["", *notes]
    return [*lines, ""]
