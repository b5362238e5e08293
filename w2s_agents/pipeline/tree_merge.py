"""The trees of the ``trees`` stage and of ``w2s tree build`` under the ``tree`` config section: the exact merge,
or the merge by observation similarity together with the node counts the exact merge gives the same trajectories.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from w2s_agents.types import Trajectory

if TYPE_CHECKING:
    from w2s_agents.pipeline.experiment import TreeConfig
    from w2s_agents.tree import TrajectoryTree

__all__ = ["MergedTrees", "merge_trees"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergedTrees:
    """One canonical tree per task (sorted by task) and, for the similarity merge, the node counts both ways."""

    trees: dict[str, TrajectoryTree]
    merge: str = "exact"
    """``exact`` or ``similarity``."""
    info: dict[str, Any] = field(default_factory=dict)
    """Similarity merge: ``xi_sim``, ``embedder`` and the totals ``nodes_exact`` and ``nodes_similarity``."""
    nodes_exact: dict[str, int] = field(default_factory=dict)
    """Similarity merge: per task, the nodes of the exact tree of the same trajectories."""

    def counts(self, task_id: str) -> dict[str, int]:
        """The per-tree node counts both ways (``nodes_exact``, ``nodes_similarity``); empty for the exact merge."""
        if self.merge == "exact":
            return {}
        return {"nodes_exact": self.nodes_exact[task_id], "nodes_similarity": len(self.trees[task_id])}


def merge_trees(
    trajectories: Iterable[Trajectory], tree: TreeConfig | None = None, *, device: str = "auto"
) -> MergedTrees:
    """The trees of ``trajectories`` merged as ``tree`` says (the exact merge when None).

    With ``tree.merge == "similarity"`` the trajectories are merged both ways: the similarity trees are the ones
    returned, the exact ones are counted (``nodes_exact``) and dropped. ``device`` is where a model embedder runs.

    Raises:
        ModelLoadError: ``tree.embedder`` is not a loadable local model folder.
    """
    from w2s_agents.tree import SimilarityMerge, build_trees

    if tree is None or tree.merge == "exact":
        return MergedTrees(build_trees(trajectories))
    from w2s_agents.agents.embedding import load_embedder

    embedder = load_embedder(tree.embedder, device=device)
    trajs = list(trajectories)
    nodes_exact = {task: len(t) for task, t in build_trees(trajs).items()}
    trees = build_trees(trajs, similarity=SimilarityMerge(xi_sim=tree.xi_sim, embedder=embedder))
    info = {
        "xi_sim": tree.xi_sim,
        "embedder": embedder.name,
        "nodes_exact": sum(nodes_exact.values()),
        "nodes_similarity": sum(len(t) for t in trees.values()),
    }
    logger.info(
        "similarity merge (xi_sim %s, %s): %d nodes in %d trees; the exact merge gives %d",
        tree.xi_sim,
        embedder.name,
        info["nodes_similarity"],
        len(trees),
        info["nodes_exact"],
    )
    return MergedTrees(trees, "similarity", info, nodes_exact)
