"""Experiment tracking of ``w2s run``: every stage of every run seed under the run's name.

``run.report_to`` (``[tensorboard, wandb]``, empty by default) applies to every stage; a training stage's own
``train.<stage>.report_to`` (:class:`~w2s_agents.trainers.TrainConfig`), when set, replaces it for that stage
(``[]``: none). Neither enters a stage key or a training run's fingerprint: they say where numbers go, not
what is computed (:func:`train_key_part`).

Where (``<run dir>`` is ``run.out_dir/run.name``)::

    TensorBoard   <run dir>/tb/seed-<k>/<stage>/      tensorboard --logdir <run dir>/tb
    W&B           <run dir>/wandb/                     one run per stage: group <run name>,
                                                       name <run name>/seed-<k>/<stage>, job type <stage>

What each stage reports, as it finishes (a cached stage reports nothing: it ran before):

=================================================  ==========================================================
training stages (``weak-sft``, ``w2s-mcts``, ...)   every step, validation and the summary
                                                    (:mod:`w2s_agents.trainers.reporting`)
``explore``, ``explore-<name>``, ``explore-r<k>``,  ``rollout/episodes``, ``successes``, ``success_rate``,
``strong-explore``                                  ``tasks_solved``, ``env_steps``, ``tokens``,
                                                    ``mean_return``
``expand``, ``expand-r<k>``                         ``expand/iterations``, ``env_steps``, ``tokens``,
                                                    ``new_nodes``, ``successes``
``search``, ``search-r<k>``                         ``search/simulations`` (per tree), ``search/nodes`` and
                                                    ``nodes_visited`` (every tree's), ``search/sft_rows``,
                                                    ``pairs``, ``expert_pairs``, ``search/best_paths/...``
``eval``                                            ``<split>/<model>/mean_return`` (split: test or valid)
=================================================  ==========================================================

Each stage's W&B run also records the experiment's resolved config, the run seed and the stage.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from w2s_agents.config import config_to_dict
from w2s_agents.trainers.config import TRACKING_KEYS, TrainConfig, method_key_dict
from w2s_agents.trainers.tracking import TrackingSpec, check_backends, scalars

if TYPE_CHECKING:
    from w2s_agents.pipeline.cache import StageContext
    from w2s_agents.pipeline.experiment import ExperimentConfig

__all__ = [
    "check_tracking",
    "rollout_scalars",
    "stage_tracking",
    "track_stage",
    "train_key_part",
]


def train_key_part(tc: TrainConfig) -> dict[str, Any]:
    """A training config as a stage key hashes it: every key but the tracking ones (``report_to``), so that a
    stage's key is the one it had before tracking existed, whatever it reports to."""
    # the pg section counts only for method pg, so the keys of the other methods' stages are unchanged by it
    return {k: v for k, v in method_key_dict(tc, config_to_dict(tc)).items() if k not in TRACKING_KEYS}


def check_tracking(cfg: ExperimentConfig) -> None:
    """Check, before anything runs, that the package of every tracker the run reports to is installed.

    Raises:
        W2SError: one line naming the config key and ``pip install "w2s-agents[tracking]"``.
    """
    check_backends(cfg.run.report_to, "run.report_to")
    for f in dataclasses.fields(cfg.train):
        tc = getattr(cfg.train, f.name)
        if isinstance(tc, TrainConfig) and tc.report_to:
            check_backends(tc.report_to, f"train.{f.name}.report_to")


def stage_tracking(
    ctx: StageContext, cfg: ExperimentConfig, seed: int, report_to: Sequence[str] | None = None
) -> TrackingSpec | None:
    """Where stage ``ctx.name`` of run seed ``seed`` is tracked (see the module docstring), with the trackers
    ``report_to`` (a training stage's own ``report_to``) or else ``run.report_to``; None when there are
    none."""
    backends = cfg.run.report_to if report_to is None else report_to
    if not backends:
        return None
    run_dir = cfg.run.run_dir
    return TrackingSpec(
        report_to=tuple(backends),  # type: ignore[arg-type]
        tensorboard_dir=run_dir / "tb" / f"seed-{seed}" / ctx.name,
        wandb_dir=run_dir,
        name=f"{cfg.run.name}/seed-{seed}/{ctx.name}",
        group=cfg.run.name,
        job_type=ctx.name,
        key="run.report_to" if report_to is None else f"train.*.report_to (stage {ctx.name})",
        config={"experiment": config_to_dict(cfg), "seed": seed, "stage": ctx.name},
    )


def track_stage(ctx: StageContext, cfg: ExperimentConfig, seed: int, values: Mapping[str, Any]) -> None:
    """Report a finished stage's numbers (the numeric leaves of ``values``, nested names joined by ``/``) at
    step 0 to the trackers of ``run.report_to``; nothing when there are none. Each call is a W&B run of its
    own (a stage redone with ``--from`` is another run).

    Raises:
        W2SError: a tracker's package is missing, or the W&B run cannot start.
    """
    spec = stage_tracking(ctx, cfg, seed)
    if spec is None:
        return
    trackers = spec.open()
    try:
        trackers.log(scalars(values), 0)
    except BaseException:
        trackers.finish(failed=True)
        raise
    trackers.finish()


def rollout_scalars(stats: Mapping[str, Any]) -> dict[str, Any]:
    """An exploration stage's statistics (``exploration_stats``) under ``rollout/``, with the success rate
    (successes per episode) beside the counts."""
    out = {k: v for k, v in stats.items() if k != "solved_tasks"}
    episodes = out.get("episodes", 0)
    if episodes:
        out["success_rate"] = out.get("successes", 0) / episodes
    return {"rollout": out}
