"""Trajectory trees: the trajectories of one task, successes and failures alike, merged into one tree.

The root is the task (instruction and first observation). A step of a trajectory joins an existing child of
the node it starts from when its action matches after normalisation (strip, lowercase, collapse spaces) *and*
the key of the observation it acted on matches (by default the normalised text; pass ``obs_key`` for envs with
noisy observations). Children are found by one dict lookup, so inserting a trajectory costs O(length). A node
therefore stands for "this action, taken on this observation, after this history".

Per node the tree keeps the data statistics of DESIGN section 4: ``visits`` (trajectories through the node),
``return_sum`` (their final returns), ``successes`` and ``failures`` (won / not won), ``sources`` (trajectories
per model) and ``terminal`` (how the trajectories that ended at the node ended), plus the search statistics
``search_visits`` (N) and ``search_value_sum`` (W) written by :mod:`w2s_agents.search`, and per node the
key of the game state its action reached (``state_key``, when the env reports keys).

This module holds :class:`TrajectoryTree`: its storage, its queries, and thin methods over the modules that
do the work: :mod:`~w2s_agents.tree.merge` (merging trajectories, summing the statistics they leave
pending), :mod:`~w2s_agents.tree.keys` (action and observation keys, the texts a node shows),
:mod:`~w2s_agents.tree.counts` (count tables), :mod:`~w2s_agents.tree.canonical` (canonical node ids) and
:mod:`~w2s_agents.tree.io` (networkx graphs and files).

Storage is a struct of arrays: one ``array("q")`` per integer attribute and one Python list per text
attribute, indexed by node id (texts are references to strings, not copies), a dict ``(parent, action key,
observation token) -> child`` for merging, flat count tables for the rarer cases (nodes reached by several
models, nodes where trajectories ended), and the children in CSR form (two numpy arrays, :meth:`child_arrays`).
A tree of any size thus holds a few dozen objects that the garbage collector tracks, not one per node.
Returns are summed in fixed point (units of 2**-32, exact for the usual returns and within 2**-32 per
trajectory otherwise), so the sums, and the whole tree, do not depend on the order trajectories are added in.

The tree's texts are order-independent too: where merged steps differ in spelling, a node shows the smallest
raw text of its key; its thought is that of the highest-return trajectory through it (smallest text on ties).
:meth:`TrajectoryTree.canonicalize` renumbers nodes in preorder with children sorted by (action key,
observation key); the builders, :meth:`~TrajectoryTree.to_networkx` and :meth:`~TrajectoryTree.save` apply it,
so the same trajectories in any order give the same node ids and the same file.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np

from w2s_agents.types import END_REASONS, Trajectory

from . import canonical, io, merge
from .counts import _N_END, _SCALE, _Rows, source_counts
from .keys import ObservationKey, key_before, normalize_text, settle_texts

ROOT = 0
"""Node id of the root (the task) in every tree."""


@dataclass(frozen=True)
class TreeSummary:
    """Shape and outcome counts of one tree."""

    task_id: str
    nodes: int
    """Number of nodes, root included."""
    depth: int
    """Depth of the deepest node (the root has depth 0)."""
    leaves: int
    """Nodes without children."""
    trajectories: int
    """Trajectories merged into the tree (the root's visits)."""
    successes: int
    failures: int
    mean_return: float
    branch_points: int
    """Nodes with two or more children (where pairs can be taken)."""
    branching_mean: float
    """Mean number of children over the nodes that have any."""
    branching_max: int
    sources: Mapping[str, int]
    """Trajectories per model."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready mapping."""
        d = dict(self.__dict__)
        d["sources"] = dict(self.sources)
        return d


class TrajectoryTree:
    """The trajectories of one task merged into a tree with per-node statistics.

    Args:
        task_id: the task every added trajectory must belong to.
        env_id: the env of the task (taken from the first trajectory when empty).
        instruction: the task's goal (taken from the trajectories when empty).
        obs_key: key of an observation for merging (default :func:`normalize_text`); a pure function whose
            keys are hashable and orderable (children are sorted by them).

    Node ids are integers, ``ROOT`` (0) being the task. Attributes are read with the accessor methods
    (:meth:`action`, :meth:`visits`, ...) or all at once with :meth:`node`.
    """

    def __init__(
        self,
        task_id: str,
        *,
        env_id: str = "",
        instruction: str = "",
        obs_key: ObservationKey | None = None,
    ) -> None:
        self.task_id = task_id
        self.env_id = env_id
        self.instruction = instruction
        self.obs_key: ObservationKey = obs_key or normalize_text
        # struct of arrays, indexed by node id
        # (parent, action key, observation token): the token is keys.FIRST_SEEN when the observation acted on
        # has the key of the parent's first text, else that observation's key (see w2s_agents.tree.keys)
        self._key: list[tuple[int, Any, Any]] = [(-1, "", None)]
        self._parent = array("q", [-1])  # the parents of _key, for numpy
        self._depth = array("q", [0])
        # shown key: the smallest key of the observations after the node's action (root: first observation);
        # None until settled when it is the key of the first text (see keys.settle_texts)
        self._oka: list[Any] = [None]
        self._otext: list[str | None] = [None]  # the first raw text seen after the node's action
        self._settled_below = 1  # the nodes below this id have a shown key and their texts registered
        self._thought: list[str] = [""]
        self._tret = array("q", [-1])  # fixed-point return of the trajectory whose thought is kept
        # (token ids, tokenizer fingerprint) of that trajectory's answer at the node when it recorded them
        self._tokens: list[tuple[tuple[int, ...], str] | None] = [None]
        self._visits = array("q", [0])
        self._ret: list[int] = [0]  # fixed-point return sums
        self._succ = array("q", [0])
        self._src = array("q", [-1])  # index of the only model through the node, -1 when several (or none)
        # counts per model index where several models went through the node: a row of _mix (columns: the
        # first models, up to counts._DENSE_MODELS), or a dict in _src_sparse (more models, or loaded from a
        # file, which keeps explicit zero counts); a node is in one or the other
        self._mix = _Rows(0)
        self._src_sparse: dict[int, dict[int, int]] = {}
        self._terminal = _Rows(_N_END)  # node -> counts per END_REASONS, where trajectories ended
        # trajectories added since the statistics were last summed (see merge.flush): their paths,
        # concatenated (the root at the start of each path is marked by a negative code: see merge.merge)
        self._pend_nodes = array("q")
        self._pend_ret = array("q")  # fixed-point return of each pending trajectory
        self._ret_bound = 0  # upper bound of every |return sum| (the sum of every |return| added)
        self._index: dict[tuple[int, Any, Any], int] = {}
        # text tables: raw -> key, key -> smallest raw text (the text shown), key -> the key's one object
        self._akc: dict[str, str] = {}
        self._okc: dict[str, Any] = {}
        self._action_text: dict[str, str] = {"": ""}
        self._obs_text: dict[Any, str] = {}
        self._obs_intern: dict[Any, Any] = {}
        self._models: list[str] = []
        self._model_index: dict[str, int] = {}
        self._children: tuple[np.ndarray, np.ndarray] | None = None  # CSR, see child_arrays()
        self._canonical = True  # ids are in canonical preorder (true until a node is added)
        self._search_visits: np.ndarray | None = None  # N of the last search
        self._search_value_sum: np.ndarray | None = None  # W of the last search
        # the key of the state each node's action reached (root: the first state), None when unknown; a node
        # reached with two different keys (an env that is not deterministic given its key) gets None
        self._state: list[str | None] = [None]
        self._state_conflicts: set[int] = set()  # nodes reached with two different keys (state None)
        self._state_seen = False  # some trajectory brought a key (else _state is all None)
        self.search_info: dict[str, Any] = {}
        """Settings of the last search that wrote search statistics (saved with the tree)."""

    # ------------------------------------------------------------------------------------------- building

    def add(self, traj: Trajectory) -> int:
        """Merge one trajectory into the tree; returns the id of the node it ended at.

        Raises:
            ValueError: the trajectory belongs to another task.
        """
        return merge.merge(self, (traj,))[1]

    def extend(self, trajectories: Iterable[Trajectory]) -> int:
        """Merge several trajectories (faster than :meth:`add` one by one); returns how many were added.

        Raises:
            ValueError: a trajectory belongs to another task (those before it are merged).
        """
        if isinstance(trajectories, (list, tuple)):  # nothing of the caller's runs meanwhile
            with merge.gc_paused():
                return merge.merge(self, trajectories)[0]
        return merge.merge(self, trajectories)[0]

    def update_statistics(self) -> None:
        """Sum the statistics of the trajectories added since the last read into the per-node totals.

        :meth:`add` records only each trajectory's path; every method that reads visits, returns, successes
        or sources calls this first, so calling it is never needed for correct results (it only moves the
        cost)."""
        if self._pend_ret:
            merge.flush(self)

    # -------------------------------------------------------------------------------------------- queries

    def __len__(self) -> int:
        return len(self._key)

    @property
    def num_nodes(self) -> int:
        """Number of nodes, root included."""
        return len(self._key)

    @property
    def models(self) -> tuple[str, ...]:
        """Models whose trajectories are in the tree, in order of first appearance."""
        return tuple(self._models)

    def parent(self, node: int) -> int:
        """Parent id (-1 for the root)."""
        return self._parent[node]

    def depth(self, node: int) -> int:
        """Number of actions from the root to ``node``."""
        if self._pend_ret:
            merge.flush(self)
        return self._depth[node]

    def action_key(self, node: int) -> str:
        """Normalised action of ``node`` ("" for the root)."""
        return self._key[node][1]

    def parent_array(self) -> np.ndarray:
        """The parent of every node (int64, -1 for the root; a new array)."""
        return np.array(self._parent, dtype=np.int64)

    def action_keys(self) -> list[str]:
        """The normalised action of every node ("" for the root; a new list)."""
        return [k[1] for k in self._key]

    def state_keys(self) -> list[str | None]:
        """The state key of every node (see :meth:`state_key`; a new list)."""
        return list(self._state)

    def obs_key_before(self, node: int) -> Any:
        """Key of the observation the node's action was chosen on (None for the root)."""
        return key_before(self, node)

    def action(self, node: int) -> str:
        """The action as sent (the smallest raw spelling of its normalised form; "" for the root)."""
        return self._action_text[self._key[node][1]]

    def thought(self, node: int) -> str:
        """The thought before the action (from the highest-return trajectory through the node)."""
        return self._thought[node]

    def agent_tokens(self, node: int) -> dict[str, Any] | None:
        """``{"ids", "tokenizer"}``: the recorded token ids of the answer whose thought the node keeps (the step of
        the highest-return trajectory through it), None when that step recorded none."""
        t = self._tokens[node]
        return None if t is None else {"ids": list(t[0]), "tokenizer": t[1]}

    def observation(self, node: int) -> str:
        """The observation after the node's action (for the root: the first observation)."""
        settle_texts(self)
        k = self._oka[node]
        return "" if k is None else self._obs_text[k]

    def observation_before(self, node: int) -> str:
        """The observation the node's action was chosen on ("" for the root)."""
        settle_texts(self)
        k = key_before(self, node)
        return "" if k is None else self._obs_text[k]

    def visits(self, node: int) -> int:
        """Trajectories through ``node``."""
        if self._pend_ret:
            merge.flush(self)
        return self._visits[node]

    def return_sum(self, node: int) -> float:
        """Sum of the final returns of the trajectories through ``node``."""
        if self._pend_ret:
            merge.flush(self)
        return self._ret[node] / _SCALE

    def mean_return(self, node: int) -> float:
        """Mean final return of the trajectories through ``node`` (0 when none)."""
        if self._pend_ret:
            merge.flush(self)
        v = self._visits[node]
        return self._ret[node] / _SCALE / v if v else 0.0

    def mean_returns(self, nodes: Iterable[int]) -> list[float]:
        """:meth:`mean_return` of several nodes."""
        if self._pend_ret:
            merge.flush(self)
        visits, rets = self._visits, self._ret
        return [rets[n] / _SCALE / visits[n] if visits[n] else 0.0 for n in nodes]

    def successes(self, node: int) -> int:
        """Trajectories through ``node`` that were won."""
        if self._pend_ret:
            merge.flush(self)
        return self._succ[node]

    def failures(self, node: int) -> int:
        """Trajectories through ``node`` that were not won (lost, truncated or failed): visits - successes."""
        if self._pend_ret:
            merge.flush(self)
        return self._visits[node] - self._succ[node]

    def sources(self, node: int) -> dict[str, int]:
        """Trajectories through ``node`` per model, sorted by model name."""
        if self._pend_ret:
            merge.flush(self)
        return source_counts(self, node)

    def terminal(self, node: int) -> dict[str, int]:
        """How the trajectories that ended at ``node`` ended (outcome -> count; empty when none ended here)."""
        if self._pend_ret:
            merge.flush(self)
        ends = self._terminal.get(node)
        if ends is None:
            return {}
        return {name: n for name, n in zip(END_REASONS, ends, strict=True) if n}

    def search_visits(self, node: int) -> int:
        """N: simulations of the last search through ``node`` (the paper's c_M; 0 before any search)."""
        return 0 if self._search_visits is None else int(self._search_visits[node])

    def search_value_sum(self, node: int) -> float:
        """W: the sum of the values backed up through ``node`` by the last search (the paper's r_M; 0 before
        any search). The search value Q is W / N (:func:`w2s_agents.search.search_values`)."""
        return 0.0 if self._search_value_sum is None else float(self._search_value_sum[node])

    @property
    def has_state_keys(self) -> bool:
        """Whether some trajectory of the tree brought the env's state keys."""
        if not self._state_seen:
            self._state_seen = any(s is not None for s in self._state)
        return self._state_seen

    def state_key(self, node: int) -> str | None:
        """The key of the game state ``node``'s action reached (the root's: the first state), None when the
        env reported none or the node was reached with two different keys."""
        return self._state[node]

    def children(self, node: int) -> tuple[int, ...]:
        """Children of ``node`` in canonical order (by action key, then observation key)."""
        off, ids = self.child_arrays()
        return tuple(ids[off[node] : off[node + 1]].tolist())

    def child_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Children of every node in CSR form: ``ids[off[n]:off[n + 1]]`` are ``n``'s children in canonical
        order (``off``: int64, one more entry than nodes; ``ids``: int32). A shared cache; do not modify."""
        if self._children is None:
            self._children = canonical.build_children(self)
        return self._children

    def path(self, node: int) -> list[int]:
        """Node ids from the root to ``node``, both included."""
        out = []
        while node >= 0:
            out.append(node)
            node = self._parent[node]
        out.reverse()
        return out

    def node(self, node: int) -> dict[str, Any]:
        """Every attribute of ``node`` (the node attributes of the saved format)."""
        if self._pend_ret:
            merge.flush(self)
        out = {
            "depth": self._depth[node],
            "action": self.action(node),
            "thought": self._thought[node],
            "observation": self.observation(node),
            "observation_before": self.observation_before(node),
            "visits": self._visits[node],
            "return_sum": self.return_sum(node),
            "successes": self._succ[node],
            "failures": self.failures(node),
            "sources": self.sources(node),
            "search_visits": self.search_visits(node),
            "search_value_sum": self.search_value_sum(node),
            "state_key": self._state[node],
            "terminal": self.terminal(node),
            "thought_return": max(self._tret[node], 0) / _SCALE,
        }
        if self._tokens[node] is not None:
            out["agent_tokens"] = self.agent_tokens(node)
        return out

    @property
    def is_canonical(self) -> bool:
        """Whether node ids are in canonical preorder (see :meth:`canonicalize`)."""
        return self._canonical

    def stat_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(visits, return_sum, successes)`` of every node as new numpy arrays (int64, float64, int64)."""
        if self._pend_ret:
            merge.flush(self)
        return (
            np.array(self._visits, dtype=np.int64),  # a copy: a view would pin the array's size
            np.asarray(self._ret, dtype=np.float64) / _SCALE,
            np.array(self._succ, dtype=np.int64),
        )

    def search_arrays(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(search_visits, search_value_sum)``, N and W of every node (int64, float64; shared, do not
        modify), or None before any search."""
        if self._search_visits is None or self._search_value_sum is None:
            return None
        return self._search_visits, self._search_value_sum

    def set_search_values(
        self, visits: Sequence[int] | np.ndarray, value_sum: Sequence[float] | np.ndarray, **info: Any
    ) -> None:
        """Store N and W of a search (one entry per node) and the settings that produced them."""
        v = np.asarray(visits, dtype=np.int64)
        w = np.asarray(value_sum, dtype=np.float64)
        if v.shape != (len(self),) or w.shape != (len(self),):
            raise ValueError(f"search values need {len(self)} entries per array, got {v.shape} and {w.shape}")
        self._search_visits, self._search_value_sum = v, w
        self.search_info = dict(info)

    def summary(self) -> TreeSummary:
        """Node, leaf and outcome counts and branching statistics."""
        if self._pend_ret:
            merge.flush(self)
        n = len(self)
        counts = np.bincount(np.array(self._parent, dtype=np.int64)[1:], minlength=n)
        inner = counts[counts > 0]
        visits = self._visits[0]
        return TreeSummary(
            task_id=self.task_id,
            nodes=n,
            depth=max(self._depth),
            leaves=int((counts == 0).sum()),
            trajectories=visits,
            successes=self._succ[0],
            failures=visits - self._succ[0],
            mean_return=self.mean_return(0),
            branch_points=int((counts >= 2).sum()),
            branching_mean=float(inner.mean()) if inner.size else 0.0,
            branching_max=int(counts.max()) if n else 0,
            sources=self.sources(0),
        )

    # ---------------------------------------------------------------------------------- canonical ids

    def canonical_order(self) -> list[int]:
        """Node ids in preorder with children in canonical order (the numbering of saved trees)."""
        return canonical.preorder(self).tolist()

    def canonicalize(self) -> None:
        """Renumber the nodes in canonical preorder, so that ids do not depend on insertion order.

        Ids held from before the call refer to other nodes afterwards.
        """
        canonical.canonicalize(self)

    # ------------------------------------------------------------------------------- networkx, files

    def to_networkx(self) -> nx.DiGraph:
        """The tree as a ``networkx.DiGraph`` (canonical ids; node attributes of :meth:`node`).

        The graph attributes hold ``task_id``, ``env_id``, ``instruction``, ``sources`` (models) and
        ``search`` (settings of the last search).
        """
        return io.to_networkx(self)

    @classmethod
    def from_networkx(cls, graph: nx.DiGraph, *, obs_key: ObservationKey | None = None) -> TrajectoryTree:
        """Rebuild a tree from :meth:`to_networkx` output.

        Raises:
            DataFormatError: the graph is not a tree rooted at node 0 or a node attribute is missing or invalid.
        """
        return io.from_networkx(cls, graph, obs_key)

    def to_json(self) -> dict[str, Any]:
        """The saved form: node-link JSON with the schema tag (see :mod:`w2s_agents.tree.io`)."""
        return io.to_json(self)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the tree as versioned node-link JSON, atomically (temp file + rename); returns the path."""
        return io.save(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, obs_key: ObservationKey | None = None) -> TrajectoryTree:
        """Read a tree written by :meth:`save`.

        Raises:
            DataFormatError: the file is missing, not JSON, of another schema version, or not a valid tree
                (the message names the file and the problem).
        """
        return io.load(cls, path, obs_key)

    def __repr__(self) -> str:
        self.update_statistics()
        return f"TrajectoryTree({self.task_id!r}, nodes={len(self)}, trajectories={self._visits[0]})"
