"""Building trajectory trees from a store's trajectories: one tree per task, and the file name of each."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from itertools import islice

from w2s_agents.types import Trajectory

from .keys import ObservationKey
from .merge import gc_paused, merge
from .similarity import SimilarityMerge, merge_similar_observations
from .tree import TrajectoryTree


def add_trajectories(
    trajectories: Iterable[Trajectory],
    trees: dict[str, TrajectoryTree] | None = None,
    *,
    obs_key: ObservationKey | None = None,
    chunk: int = 1 << 15,
) -> dict[str, TrajectoryTree]:
    """Merge trajectories into one tree per task; returns ``{task_id: tree}``.

    ``trees`` (updated in place, missing tasks added) holds the trees to merge into; ``obs_key`` is the
    observation key of new trees. The trajectories are taken ``chunk`` at a time and grouped by task before
    they are merged, so that a tree's index stays in the CPU caches while its trajectories go in: with many
    tasks interleaved in a file this is much faster than adding them in file order, and gives the same trees
    (the order of trajectories does not matter). Statistics are summed on first read, ids are not canonical:
    see :func:`build_trees`.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    out: dict[str, TrajectoryTree] = {} if trees is None else trees
    it = iter(trajectories)
    while batch := list(islice(it, chunk)):
        groups: dict[str, list[Trajectory]] = {}
        for traj in batch:
            group = groups.get(traj.task_id)
            if group is None:
                group = groups[traj.task_id] = []
            group.append(traj)
        del batch
        with gc_paused():  # see TrajectoryTree.extend
            for task_id, group in groups.items():
                tree = out.get(task_id)
                if tree is None:
                    tree = out[task_id] = TrajectoryTree(task_id, obs_key=obs_key)
                merge(tree, group)
    return out


def build_trees(
    trajectories: Iterable[Trajectory],
    *,
    obs_key: ObservationKey | None = None,
    similarity: SimilarityMerge | None = None,
) -> dict[str, TrajectoryTree]:
    """One canonical tree per task from any number of trajectories; returns ``{task_id: tree}`` sorted by task.

    With ``similarity`` the steps merge by observation similarity (:mod:`w2s_agents.tree.similarity`) instead
    of the exact match of the normalised observation (or of ``obs_key``, which cannot be combined with it).

    Raises:
        ValueError: both ``obs_key`` and ``similarity`` are given.
    """
    if similarity is not None:
        if obs_key is not None:
            raise ValueError("build_trees: give obs_key or similarity, not both")
        groups: dict[str, list[Trajectory]] = {}
        for traj in trajectories:
            groups.setdefault(traj.task_id, []).append(traj)
        trajectories = (t for group in groups.values() for t in merge_similar_observations(group, similarity))
    trees = add_trajectories(trajectories, obs_key=obs_key)
    for tree in trees.values():
        tree.canonicalize()
    return {k: trees[k] for k in sorted(trees)}


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def tree_filename(task_id: str) -> str:
    """A safe, unique file name for the tree of ``task_id``: readable part plus a short hash of the id."""
    readable = _UNSAFE.sub("_", task_id).strip("._")[:80] or "task"
    digest = hashlib.sha1(task_id.encode("utf-8")).hexdigest()[:8]
    return f"{readable}-{digest}.json"
