"""The end-to-end weak-to-strong pipeline behind ``w2s run``: experiment config, cached stages, report."""

from .experiment import ExperimentConfig, load_experiment
from .runner import W2S_VARIANTS, PipelineResult, build_stages, run_pipeline, stage_names

__all__ = [
    "W2S_VARIANTS",
    "ExperimentConfig",
    "PipelineResult",
    "build_stages",
    "load_experiment",
    "run_pipeline",
    "stage_names",
]
