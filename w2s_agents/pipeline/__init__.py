"""The end-to-end weak-to-strong pipeline behind ``w2s run``: experiment config, cached stages, report.

``experiment`` holds the config, ``runner`` the list of stages and :func:`run_pipeline`, ``stages/`` one
function per stage (``stage_io`` what they share), ``cache`` the cached stages, ``evaluate`` the evaluation,
``metrics`` the aggregation over seeds, ``stats`` the statistics and ``report`` the report.
"""

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
