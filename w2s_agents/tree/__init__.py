"""Trajectory trees: the trajectories of one task merged step by step into one tree with per-node statistics.

:class:`TrajectoryTree` is the data structure; :func:`build_trees` / :func:`add_trajectories` merge a store's
trajectories into one tree per task. Trees are saved as versioned node-link JSON (:data:`TREE_SCHEMA`).

Modules: ``tree`` (the class: storage and queries), ``merge`` (merging trajectories, summing statistics),
``keys`` (action and observation keys, texts shown), ``counts`` (count tables), ``canonical`` (canonical node
ids), ``io`` (networkx graphs, files), ``build`` (trees from a store's trajectories), ``similarity`` (the merge by
observation similarity and its TF-IDF embedding).
"""

from .build import add_trajectories, build_trees, tree_filename
from .io import TREE_SCHEMA
from .keys import ObservationKey, normalize_text
from .similarity import DenseVectors, Embedder, SimilarityMerge, TfidfEmbedder, merge_similar_observations
from .tree import ROOT, TrajectoryTree, TreeSummary

__all__ = [
    "ROOT",
    "TREE_SCHEMA",
    "DenseVectors",
    "Embedder",
    "ObservationKey",
    "SimilarityMerge",
    "TfidfEmbedder",
    "TrajectoryTree",
    "TreeSummary",
    "add_trajectories",
    "build_trees",
    "merge_similar_observations",
    "normalize_text",
    "tree_filename",
]
