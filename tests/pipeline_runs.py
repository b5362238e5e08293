"""Miniature ``w2s run`` configs of the pipeline tests, and the one feature run that several tests share.

``MINI`` is the miniature experiment (nano models, 3 train tasks of 6 steps); a test that needs a run of its own
(a sweep, an expansion, a killed run) starts from it. :func:`run_features` runs ``MINI`` with every pipeline
feature switched on at once (``FEATURES``: scarce demos, a second weak model, the strong-SFT baselines, two rounds,
every W2S variant and the ceiling), stopped after round 2's exploration and then resumed, so that the tests of
those features assert on one run instead of running five (conftest's session fixture ``feature_run``).
Loaded by tests/conftest.py (pytest's importlib mode puts no test folder on ``sys.path``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from w2s_agents.pipeline import PipelineResult, run_pipeline
from w2s_agents.pipeline.experiment import ExperimentConfig, load_experiment

MINI = """\
run: {{name: mini, out_dir: {out}, jobs: 1}}
weak: {{tiny_preset: nano}}
strong: {{tiny_preset: nano}}
tasks: {{suite: tw-coin_collector, train: 3, valid: 1, test: 2, max_steps: 6}}
explore:
  samplers: [{{temperature: 0.0}}, {{temperature: 1.5}}]
  seeds: 1
  max_steps: 6
search: {{iterations: 20, sft_min_value: 0.0}}
train:
  weak_sft: {{lr: 0.003, epochs: 2, batch_size: 4}}
  strong_sft: {{lr: 0.003, epochs: 2, batch_size: 4}}
  mcts_sft: {{lr: 0.003, epochs: 2, batch_size: 4}}
  treedpo: {{lr: 0.0001, epochs: 1, batch_size: 4}}
  ceiling_dpo: {{lr: 0.0001, epochs: 1, batch_size: 4}}
  variants: [w2s-mcts, w2s-treedpo, w2s-mcts-treedpo]
eval: {{misfit_states: 10}}
"""
"""The miniature experiment; ``{out}`` is the runs folder (``MINI.format(out=...)``)."""

FEATURES = [
    "run.name=features",
    # scarce demonstrations: weak and strong SFT see the first train task's demo, the ceiling all four
    "tasks.train=4",
    "tasks.demos=1",
    # a second weak supervisor (weak_extra): its own SFT and exploration, joined in the trees
    "weak_extra=[{name: b, tiny_preset: nano}]",
    # the strong-SFT baselines; 2 samplers x 2 seeds of the strong SFT agent per train task
    "train.baselines=[eto,best-of-n]",
    "explore.seeds=2",
    # the strong SFT agent learns its one demo, so that its samples both win and fail (ETO needs failed
    # episodes of the demo task, Best-of-N won ones)
    "train.strong_sft.epochs=30",
    "train.strong_sft.lr=0.02",
    # round 2 explores with round 1's W2S-MCTS and trains the W2S stages again
    "run.rounds=2",
    # explorations (weak agents', the strong SFT agent's, round 2's) run up to 9 steps, evaluation up to 6
    "explore.max_steps=9",
]
"""``MINI``'s overrides for the feature run."""

TRACKING = ["run.report_to=[tensorboard,wandb]"]
"""The feature run also reports every stage to TensorBoard and W&B (offline; conftest's ``feature_run`` sets the W&B
environment, tests/test_tracking.py reads the files). Kept out of ``FEATURES``: ``report_to`` enters no stage key,
so a copy of the run loaded with ``FEATURES`` alone reuses its stages and tracks nothing.
"""

JOBS = ["run.jobs=2"]
"""The feature run's stages run side by side, two at a time (``run.jobs``; each stage in a process of its own), so
that every kind of stage goes through that path once; tests/test_pipeline.py compares the two paths' results."""

STOP = "explore-r2"
"""The stage the feature run's first invocation stops after (then it is resumed)."""


@dataclass(frozen=True)
class FeatureRun:
    """The shared feature run: its config and both invocations."""

    config: Path
    """The MINI file the run was loaded from (with ``FEATURES`` as overrides)."""
    cfg: ExperimentConfig
    first: PipelineResult
    """The invocation stopped after ``STOP``: every stage up to it ran."""
    result: PipelineResult
    """The resumed invocation: the stages up to ``STOP`` cached, the rest ran; metrics and report written."""


def run_features(root: Path) -> FeatureRun:
    """Run ``MINI`` with ``FEATURES``, ``TRACKING`` and ``JOBS`` under ``root``: until ``STOP``, then resumed to the end. The
    caller sets ``W2S_CACHE`` (the game cache), the W&B environment and the torch threads."""
    config = root / "mini.yaml"
    config.write_text(MINI.format(out=root / "runs"))
    cfg = load_experiment(config, [*FEATURES, *TRACKING, *JOBS])
    first = run_pipeline(cfg, until=STOP)
    result = run_pipeline(cfg)
    return FeatureRun(config, cfg, first, result)
