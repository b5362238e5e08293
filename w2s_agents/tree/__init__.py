"""Trajectory trees: the trajectories of one task merged step by step into one tree with per-node statistics.

:class:`TrajectoryTree` is the data structure; :func:`build_trees` / :func:`add_trajectories` merge a store's
trajectories into one tree per task. Trees are saved as versioned node-link JSON (:data:`TREE_SCHEMA`).

Modules: ``tree`` (the class: storage and queries), ``merge`` (merging trajectories, summing statistics),
``keys`` (action and observation keys, texts shown), ``counts`` (count tables), ``canonical`` (canonical node
ids), ``io`` (networkx graphs, files), ``build`` (trees from a store's trajectories).
"""

from .build import add_trajectories, build_trees, tree_filename
from .io import TREE_SCHEMA
from .keys import ObservationKey, normalize_text
from .tree import ROOT, TrajectoryTree, TreeSummary

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
