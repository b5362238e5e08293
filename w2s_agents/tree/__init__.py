"""Trajectory trees: the trajectories of one task merged step by step into one tree with per-node statistics.

:class:`TrajectoryTree` is the data structure; :func:`build_trees` / :func:`add_trajectories` merge a store's
trajectories into one tree per task. Trees are saved as versioned node-link JSON (:data:`TREE_SCHEMA`).
"""

from .tree import (
    ROOT,
    TREE_SCHEMA,
    ObservationKey,
    TrajectoryTree,
    TreeSummary,
    add_trajectories,
    build_trees,
    normalize_text,
    tree_filename,
)

__all__ = [
    "ROOT",
    "TREE_SCHEMA",
    "ObservationKey",
    "TrajectoryTree",
    "TreeSummary",
    "add_trajectories",
    "build_trees",
    "normalize_text",
    "tree_filename",
]
