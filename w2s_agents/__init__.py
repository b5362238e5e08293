"""w2s-agents: train a strong LLM agent from a weak agent's trajectory trees.

The weak agent explores text environments; its trajectories, successes and failures alike, are merged into
trajectory trees; MCTS scores the branches; the strong agent is fine-tuned on the best paths (MCTS-SFT) and on
preference pairs where branches diverge (TreeDPO).

The layout is the architecture (docs/DESIGN.md), bottom to top: the core modules here (``types``, ``store``,
``config``, ``messages``, ``episode``) and ``tree``; ``envs`` and ``search``; ``agents``; ``trainers`` and
``rollout``; ``pipeline`` and ``viz``; ``cli``. Core names are importable from here; heavy modules (models,
trainers) load torch only when used.
"""

from __future__ import annotations

from w2s_agents._moved import install as _install_moved_modules
from w2s_agents.errors import ConfigError, DataFormatError, DuplicateEpisodeError, ModelLoadError, W2SError
from w2s_agents.store import TrajectoryStore, read_trajectories
from w2s_agents.types import TRAJECTORY_SCHEMA, EpisodeKey, Source, Step, Trajectory

__version__ = "0.1.0"

_install_moved_modules()  # the module paths of earlier releases (w2s_agents.models, ...) keep working

__all__ = [
    "TRAJECTORY_SCHEMA",
    "ConfigError",
    "DataFormatError",
    "DuplicateEpisodeError",
    "EpisodeKey",
    "ModelLoadError",
    "Source",
    "Step",
    "Trajectory",
    "TrajectoryStore",
    "W2SError",
    "__version__",
    "read_trajectories",
]
