"""Rounds of exploration and training (``run.rounds``), as in Ye et al. 2025 (2 iterations for WebShop and
SciWorld, 1 for ALFWorld).

Round 1 is the pipeline without rounds. Round k+1 (k >= 1) adds, per run seed::

    explore-r<k+1>  round k's W2S model (``run.round_model``; round 1's is the stage w2s-mcts, round k's
                    w2s-mcts-r<k>) on every train task with the explore settings; its episodes carry the source
                    ``<round_model>-r<k>`` (role strong), e.g. ``w2s-mcts-r1``
    trees-r<k+1>    one tree per task holding every exploration so far (round 1's explore and explore-<name>,
                    then explore-r2 .. explore-r<k+1>), merged as the trees stage merges (``tree``)
    expand-r<k+1>   with expand.iterations > 0: those trees grown online as the expand stage grows round 1's
    search-r<k+1>   MCTS over them, best-path rows and TreeDPO pairs as in search
    w2s-mcts-r<k+1>, w2s-treedpo-r<k+1>, w2s-mcts-treedpo-r<k+1>
                    the W2S stages of round 1, from the same starting points (the strong base model or strong
                    SFT, train.mcts_start; strong SFT with weak SFT as the reference), on search-r<k+1>'s data

Every round stage is made from its round-1 stage (same function, config part and training settings), with the
name, the data it reads and its dependencies changed, so the baselines, the ceiling and the SFT stages are not
repeated, and with ``run.rounds: 1`` (the default) the stage table and every key are those of round 1 alone.

This module also names the rounds' models (``w2s-mcts-r2``, label "W2S-MCTS (round 2)") for evaluation, metrics
and the report, and holds the run's ``rounds`` metrics and their report section. Apart from the stage table
(:class:`~w2s_agents.pipeline.cache.Stage`) it imports nothing of the pipeline, so that the config, the metrics
and the report can import it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from w2s_agents.config import RunConfig, check, option
from w2s_agents.pipeline.cache import Stage
from w2s_agents.trainers.config import ReportTo

if TYPE_CHECKING:
    from w2s_agents.pipeline.experiment import ExperimentConfig

__all__ = [
    "PipelineRunConfig",
    "check_rounds",
    "later_round_models",
    "later_round_stages",
    "order_round_rows",
    "parse_round",
    "round_label",
    "round_metrics",
    "round_name",
    "round_source",
    "rounds_section",
]

_W2S = ("w2s-mcts", "w2s-treedpo", "w2s-mcts-treedpo")  # the W2S stages of a round (experiment.W2S_VARIANTS)
_DATA = ("explore", "trees", "expand", "search")  # the stages that make a round's training data
_ROUND = re.compile(r"(w2s-[a-z-]+?)-r([1-9][0-9]*)")
_WEAK_CLASH = re.compile(r"r[1-9][0-9]*")


@dataclass(frozen=True)
class PipelineRunConfig(RunConfig):
    """The ``run`` section of ``w2s run``: where it writes and how it is seeded, its rounds and its trackers."""

    rounds: int = option(
        1,
        "rounds of exploration and training: round k+1 explores the train tasks with round k's W2S model "
        "(run.round_model), joins those trajectories to the trees and trains the W2S models again "
        "(1: one round)",
    )
    round_model: Literal["w2s-mcts", "w2s-treedpo", "w2s-mcts-treedpo"] = option(
        "w2s-mcts",
        "with rounds > 1: the W2S model of round k that explores in round k+1 (trained in the run)",
    )
    jobs: int = option(
        0,
        "stages run side by side, each in a process of its own: every stage whose dependencies have finished, "
        "of every run seed, up to this many at once, with the CPU cores divided among them (run.threads per "
        "stage when set); 1: one after the other in this process; 0: 1 when a CUDA device is visible (the "
        "stages would share it), else 2 (1 on one core). Results do not change",
    )
    reuse: list[Path] = option(
        default_factory=list,
        help="run folders whose finished stages this run reuses: before a seed runs, each of its stage folders "
        "that does not exist yet becomes a link to the same seed's folder of the first of these runs that "
        "finished the stage with the same key (e.g. [runs/quickstart]: a config that adds stages to the default "
        "computes only those)",
    )
    report_to: list[ReportTo] = option(
        default_factory=list,
        help="experiment trackers of every stage: tensorboard (<run dir>/tb/), wandb (<run dir>/wandb/, offline "
        "without an API key); a training stage's own train.<stage>.report_to replaces it; []: none",
    )

    @property
    def stage_jobs(self) -> int:
        """``jobs``, with 0 resolved for this machine: 1 when a CUDA device is visible, else 2 (1 on one core)."""
        if self.jobs:
            return self.jobs
        import torch

        from w2s_agents.pipeline.jobs import cpu_count

        return 1 if torch.cuda.is_available() else min(2, cpu_count())

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.rounds >= 1, "rounds", f"must be >= 1, got {self.rounds}")
        check(self.jobs >= 0, "jobs", f"must be >= 0, got {self.jobs}")
        check(
            len(set(self.report_to)) == len(self.report_to),
            "report_to",
            f"must not repeat a tracker, got {self.report_to}",
        )


def check_rounds(cfg: ExperimentConfig) -> None:
    """Check ``run.rounds`` against the rest of ``cfg`` (for the experiment's ``__post_init__``).

    Raises:
        ConfigError: with ``run.rounds`` > 1, ``run.round_model`` is not trained in the run, or an extra weak
            model's name would give one of its stages the name of a round stage (``explore-r2``).
    """
    if cfg.run.rounds <= 1:
        return
    variants = list(cfg.train.variants)
    trained = [*variants, *(["w2s-mcts"] if "w2s-mcts-treedpo" in variants else [])]
    check(
        cfg.run.round_model in trained,
        "run.round_model",
        f"is {cfg.run.round_model!r}, which this run does not train (train.variants: "
        f"[{', '.join(variants)}]): add it to train.variants or choose one of them",
    )
    for w in cfg.weak_extra:
        clash = _WEAK_CLASH.fullmatch(w.name) is not None and 2 <= int(w.name[1:]) <= cfg.run.rounds
        check(
            not clash,
            "weak_extra",
            f"name {w.name!r} names the stage explore-{w.name}, which is round {w.name[1:]}'s exploration with "
            f"run.rounds {cfg.run.rounds}: rename it",
        )


# ------------------------------------------------------------------------------------------- names


def round_name(stage: str, k: int) -> str:
    """The name of round ``k``'s ``stage``: the stage itself in round 1, ``<stage>-r<k>`` after."""
    return stage if k == 1 else f"{stage}-r{k}"


def round_source(model: str, k: int) -> str:
    """The source (``Trajectory.source.model``) of the episodes that round ``k``'s W2S model ``model`` plays
    in round k+1: ``<model>-r<k>``, round 1 included (``w2s-mcts-r1``)."""
    return f"{model}-r{k}"


def parse_round(name: str) -> tuple[str, int] | None:
    """``(W2S stage, round)`` of a later round's W2S model (``w2s-mcts-r2`` -> ``("w2s-mcts", 2)``); None for
    any other name, round 1's W2S models included."""
    m = _ROUND.fullmatch(name)
    if m is None or m.group(1) not in _W2S or int(m.group(2)) < 2:
        return None
    return m.group(1), int(m.group(2))


def later_round_models(variants: Sequence[str], rounds: int) -> list[str]:
    """The W2S models of rounds 2 .. ``rounds`` for the stages ``variants``, round by round."""
    return [round_name(v, k) for k in range(2, rounds + 1) for v in variants]


def round_label(name: str, labels: Mapping[str, str], rounds: int) -> str | None:
    """Display name of a W2S model in a run of ``rounds`` rounds: ``"W2S-MCTS (round 2)"`` for a later round's,
    ``"W2S-MCTS (round 1)"`` for round 1's when there are several; None otherwise (``labels``: the display
    names of the stages)."""
    parsed = parse_round(name)
    if parsed is not None:
        return f"{labels.get(parsed[0], parsed[0])} (round {parsed[1]})"
    if rounds > 1 and name in _W2S:
        return f"{labels.get(name, name)} (round 1)"
    return None


def order_round_rows(known: list[str], models: Sequence[str], order: Sequence[str]) -> list[str]:
    """The results table's rows ``known`` with the later rounds' W2S models of ``models`` put in after round 1's
    W2S rows (before the ceiling's), round by round, each round in ``order``; returns the rows inserted."""
    parsed = {m: p for m in models if (p := parse_round(m)) is not None}
    later = sorted(parsed, key=lambda m: (parsed[m][1], order.index(parsed[m][0])))
    at = next((i for i, m in enumerate(known) if m.startswith("ceiling")), len(known))
    known[at:at] = later
    return later


# ------------------------------------------------------------------------------------------- stages


def later_round_stages(cfg: ExperimentConfig, stages: Sequence[Stage]) -> list[Stage]:
    """The stages of rounds 2 .. ``run.rounds``, made from round 1's ``stages`` (see the module docstring);
    empty with one round."""
    if cfg.run.rounds <= 1:
        return []
    by = {s.name: s for s in stages}
    explore, trees, search, expand = by["explore"], by["trees"], by["search"], by.get("expand")
    variants = [v for v in _W2S if v in by]
    explores: tuple[str, ...] = trees.run.keywords.get("explores", ("explore",))  # type: ignore[attr-defined]
    model = cfg.run.round_model
    out: list[Stage] = []
    for k in range(2, cfg.run.rounds + 1):
        explorer, source = round_name(model, k - 1), round_source(model, k - 1)
        ex = replace(
            explore,
            name=round_name("explore", k),
            run=partial(explore.run, model=explorer, source=source, role="strong"),
            config={**explore.config, "explorer": source},
            deps=(explorer,),
        )
        explores = (*explores, ex.name)
        tr = replace(
            trees,
            name=round_name("trees", k),
            run=partial(trees.run, explores=explores),
            deps=(round_name("trees", k - 1), ex.name),
        )
        out += [ex, tr]
        searched = tr.name
        if expand is not None:
            xp = replace(
                expand,
                name=round_name("expand", k),
                run=partial(expand.run, trees_stage=tr.name),
                deps=(tr.name, *expand.deps[1:]),
            )
            out.append(xp)
            searched = xp.name
        se = replace(
            search,
            name=round_name("search", k),
            run=partial(search.run, trees_stage=searched),
            deps=(searched, *search.deps[1:]),
        )
        out.append(se)
        for v in variants:
            st = by[v]
            kw: dict[str, Any] = {"search": se.name}
            start = st.run.keywords.get("start")  # type: ignore[attr-defined]
            if start in _W2S:  # W2S-MCTS+TreeDPO starts from this round's W2S-MCTS
                kw["start"] = round_name(start, k)
            deps = tuple(se.name if d == "search" else round_name(d, k) if d in _W2S else d for d in st.deps)
            out.append(replace(st, name=round_name(v, k), run=partial(st.run, **kw), deps=deps))
    return out


# ------------------------------------------------------------------------------------------- metrics


def _json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _lines(path: Path) -> int:
    if not path.is_file():
        return 0
    with path.open(encoding="utf-8") as fh:
        return sum(1 for line in fh if line.strip())


def round_metrics(run_dir: Path, seeds: Sequence[int], cfg: ExperimentConfig) -> dict[str, Any]:
    """The ``rounds`` entry of a run's metrics, summed over ``seeds``: per round, who explored (the sources of
    that round's new episodes), its exploration's episodes, successes and tasks solved, its trees (every round's
    trajectories so far: trajectories, nodes, trees with a successful leaf), its best-path rows and TreeDPO
    pairs, and the W2S models it trained."""
    extra = [f"weak-sft-{w.name}" for w in cfg.weak_extra]
    per: list[dict[str, Any]] = []
    for k in range(1, cfg.run.rounds + 1):
        if k == 1:
            explores = ["explore", *(f"explore-{w.name}" for w in cfg.weak_extra)]
            sources = ["weak-sft", *extra]
        else:
            explores = [round_name("explore", k)]
            sources = [round_source(cfg.run.round_model, k - 1)]
        row: dict[str, Any] = {
            "round": k,
            "explored_by": sources,
            "episodes": 0,
            "successes": 0,
            "tasks_solved": 0,
            "skipped": [],
            "trajectories": 0,
            "nodes": 0,
            "trees_with_success": 0,
            "sft_rows": 0,
            "pairs": 0,
            "models": [],
        }
        for s in seeds:
            seed_dir = run_dir / f"seed-{s}"
            for stage in explores:
                ex = _json(seed_dir / stage / "explore.json") or {}
                for key in ("episodes", "successes", "tasks_solved"):
                    row[key] += ex.get(key, 0)
                if ex.get("skipped"):
                    row["skipped"].append(f"seed {s}: {ex['skipped']}")
            for t in _json(seed_dir / round_name("trees", k) / "trees.json") or []:
                row["trajectories"] += t["trajectories"]
                row["nodes"] += t["nodes"]
                row["trees_with_success"] += t["success_leaves"] > 0
            row["sft_rows"] += _lines(seed_dir / round_name("search", k) / "sft.jsonl")
            row["pairs"] += _lines(seed_dir / round_name("search", k) / "pairs.jsonl")
            for v in _W2S:
                name = round_name(v, k)
                if (seed_dir / name / "model.json").is_file() and name not in row["models"]:
                    row["models"].append(name)
        if not row["skipped"]:
            del row["skipped"]
        per.append(row)
    return {"rounds": cfg.run.rounds, "round_model": cfg.run.round_model, "per_round": per}


def rounds_section(metrics: Mapping[str, Any], labels: Mapping[str, str]) -> list[str]:
    """The report's "Rounds" section (markdown lines) from ``metrics["rounds"]``; empty for a run of one round.
    ``labels`` are the display names of the stages."""
    data = metrics.get("rounds")
    if not data or data.get("rounds", 1) <= 1:
        return []
    models = metrics.get("models", {})
    explorer = labels.get(data["round_model"], data["round_model"])
    lines = [
        "## Rounds",
        "",
        f"Round k+1 explores the train tasks with round k's {explorer} "
        "and joins its episodes to the trees of round k (one tree per task holding every round's "
        "trajectories); the W2S models of each round train from the same starting points on that round's "
        "searched trees. Trajectories, nodes, rows and pairs are summed over run seeds; return x100 is the "
        "held-out estimate of each model of the round. The search cost below counts every round; the "
        "trajectory trees and best paths are round 1's.",
        "",
        "| round | explored by | episodes (successes) | tasks solved | trajectories in the trees | nodes | "
        "trees with a success | best-path rows | TreeDPO pairs | W2S models: return x100 |",
        "|" + "|".join(" --- " for _ in range(10)) + "|",
    ]
    notes = []
    for r in data.get("per_round", []):
        scores = []
        for name in r.get("models", []):
            est = models.get(name, {}).get("return", {}).get("estimate")
            label = models.get(name, {}).get("label") or labels.get(name, name)
            scores.append(f"{label} {'n/a' if est is None else f'{100 * est:.1f}'}")
        cells = [
            str(r["round"]),
            ", ".join(f"`{s}`" for s in r["explored_by"]),
            f"{r['episodes']} ({r['successes']})",
            str(r["tasks_solved"]),
            str(r["trajectories"]),
            str(r["nodes"]),
            str(r["trees_with_success"]),
            str(r["sft_rows"]),
            str(r["pairs"]),
            "; ".join(scores) or "none trained",
        ]
        lines.append("| " + " | ".join(cells) + " |")
        notes += [f"- Round {r['round']}: exploration skipped, {why}." for why in r.get("skipped", [])]
    if notes:
        lines += ["", *notes]
    return [*lines, ""]
