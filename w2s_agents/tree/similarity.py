"""Merging trajectories by observation similarity (Ye et al. 2025), and the lexical embedding it uses by default.

The exact merge (:mod:`w2s_agents.tree.merge`) lets a step join an existing child of its node when the action
and the observation the action was chosen on both match after normalisation. The similarity merge relaxes the
second test: a step joins an existing child with the same normalised action whose observation-acted-on has an
embedding with cosine >= ``xi_sim`` (0.9 in the paper) with the step's; among several such children, the most
similar (the first made on ties). The observation compared is the one the exact merge keys children on: the
observation the step's action was chosen on (the task's first observation for the first step, else the previous
step's observation), so that a node still stands for "this action, taken on this observation, after this
history". A child is represented by the observation it was made with; a text equal after normalisation to one
already placed at the same node and action goes where that one went (so every exact merge is also made here, and
a similarity tree never has more nodes than the exact tree of the same trajectories).

:func:`merge_similar_observations` does this as a rewrite: it walks one task's trajectories (in a canonical
order: sorted by their texts, so the result does not depend on the order they come in) and replaces every
observation an action was chosen on by the representative of the child the step joins. The exact merge of the
rewritten trajectories then builds the similarity tree, with every statistic, file format and canonical id of
the exact trees; a merged node shows its representative's text. Online expansion and later merges into such a
tree are exact.

Embeddings: an :class:`Embedder` maps the distinct normalised texts of one task to :class:`Vectors`. The default,
:class:`TfidfEmbedder`, is TF-IDF over character 3- to 5-grams in numpy (hashed features, sublinear tf, smoothed
idf fitted on the texts given, L2 norm); a local sentence-embedding model (``w2s_agents.agents.embedding``) gives
:class:`DenseVectors`. A task's texts are embedded, all at once, when its first comparison is needed (a step
whose text differs from every sibling's under the same node and action); a task where that never happens (a
deterministic game) costs no embedding. The representatives' texts are what the trees, and the rows and pairs
taken from them, show for merged nodes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from itertools import pairwise
from typing import Protocol

import numpy as np

from w2s_agents.types import Trajectory

from .keys import normalize_text

__all__ = [
    "DenseVectors",
    "Embedder",
    "SimilarityMerge",
    "SparseVectors",
    "TfidfEmbedder",
    "Vectors",
    "merge_similar_observations",
]


class Vectors(Protocol):
    """Embeddings of a list of texts, compared by cosine."""

    def __len__(self) -> int: ...

    def cosine(self, i: int, others: Sequence[int]) -> np.ndarray:
        """Cosine similarity of text ``i`` with each text of ``others`` (float64, one entry per other)."""
        ...


class Embedder(Protocol):
    """Maps texts to :class:`Vectors`; one call per task, with the task's distinct normalised texts."""

    @property
    def name(self) -> str:
        """What the embeddings are (recorded with the trees' statistics)."""
        ...

    def embed(self, texts: Sequence[str]) -> Vectors:
        """The embeddings of ``texts``, in their order."""
        ...


class DenseVectors:
    """Dense embeddings, one row per text; rows are L2-normalised here (a zero row stays zero: cosine 0)."""

    def __init__(self, matrix: np.ndarray) -> None:
        m = np.asarray(matrix, dtype=np.float64)
        if m.ndim != 2:
            raise ValueError(f"embeddings must be a 2-d array (texts x dimensions), got shape {m.shape}")
        norms = np.linalg.norm(m, axis=1, keepdims=True)
        self.matrix = np.divide(m, norms, out=np.zeros_like(m), where=norms > 0)

    def __len__(self) -> int:
        return len(self.matrix)

    def cosine(self, i: int, others: Sequence[int]) -> np.ndarray:
        """Cosine similarity of row ``i`` with each row of ``others``."""
        return self.matrix[np.asarray(others, dtype=np.int64)] @ self.matrix[i]


class SparseVectors:
    """Sparse L2-normalised rows in CSR form: row ``r`` has the sorted feature ids ``indices[indptr[r]:indptr[r +
    1]]`` with the weights ``data`` at the same places."""

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray) -> None:
        self.indptr, self.indices, self.data = indptr, indices, data

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Feature ids (sorted) and weights of row ``i``."""
        a, b = self.indptr[i], self.indptr[i + 1]
        return self.indices[a:b], self.data[a:b]

    def cosine(self, i: int, others: Sequence[int]) -> np.ndarray:
        """Cosine similarity of row ``i`` with each row of ``others`` (dot products of unit rows)."""
        fi, wi = self.row(i)
        out = np.zeros(len(others), dtype=np.float64)
        if not len(fi):
            return out
        for k, j in enumerate(others):
            fj, wj = self.row(j)
            pos = np.searchsorted(fi, fj)
            np.minimum(pos, len(fi) - 1, out=pos)
            hit = fi[pos] == fj
            out[k] = float(wi[pos[hit]] @ wj[hit])
        return out


# splitmix64's finaliser: a stable 64-bit mix of each n-gram's polynomial hash (no Python hash(), whose value
# changes with PYTHONHASHSEED)
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_BASE = np.uint64(0x100000001B3)  # polynomial base of the rolling n-gram hash (the FNV-1 64-bit prime)


def _mix(h: np.ndarray, size: int) -> np.ndarray:
    z = h + np.uint64(size * _GOLDEN & 0xFFFFFFFFFFFFFFFF)  # n-grams of different lengths hash apart
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@dataclass(frozen=True)
class TfidfEmbedder:
    """TF-IDF over character n-grams, in numpy: the default lexical embedding of the similarity merge.

    A text (already normalised: lowercase, single spaces) is padded with a space at each end; its character
    n-grams of ``min_n`` to ``max_n`` characters are hashed (a polynomial hash of the code points, mixed by
    splitmix64: the same in every process) into ``2**bits`` features. Weights are sublinear term frequency
    ``1 + ln(count)`` times the smoothed inverse document frequency ``ln((1 + n) / (1 + df)) + 1`` over the
    ``n`` texts of the call (scikit-learn's ``TfidfVectorizer(analyzer="char", ngram_range=(3, 5),
    sublinear_tf=True)`` up to the hashing), and each row is L2-normalised. Identical texts have cosine 1,
    texts with no n-gram in common cosine 0; a text too short for any n-gram (the empty text, with the
    default sizes) has cosine 0 with every text, itself included.
    """

    min_n: int = 3
    max_n: int = 5
    bits: int = 20

    def __post_init__(self) -> None:
        if not 1 <= self.min_n <= self.max_n:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min_n <= max_n, got {self.min_n}, {self.max_n}")
        if not 8 <= self.bits <= 40:
            raise ValueError(f"bits must be between 8 and 40, got {self.bits}")

    @property
    def name(self) -> str:
        """``tfidf-char<min>-<max>``."""
        return f"tfidf-char{self.min_n}-{self.max_n}"

    def embed(self, texts: Sequence[str]) -> SparseVectors:
        """The TF-IDF rows of ``texts`` (the idf is fitted on these texts)."""
        n = len(texts)
        padded = [f" {t} " for t in texts]
        starts = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, padded), dtype=np.int64, count=n), out=starts[1:])
        codes = np.frombuffer("".join(padded).encode("utf-32-le"), dtype="<u4").astype(np.uint64)
        shift = np.uint64(64 - self.bits)
        # the features of the n-grams of `size` characters starting at every position of the joined texts
        # (those that run into the next text are left out below)
        sized: list[tuple[int, np.ndarray]] = []
        h = codes
        for size in range(1, self.max_n + 1):
            if size > 1:
                h = h[:-1] * _BASE + codes[size - 1 :]
            if size >= self.min_n:
                sized.append((size, (_mix(h, size) >> shift).astype(np.int64)))
        # per text, its distinct features and their counts (one small sort per text: faster than one sort of
        # every (text, feature) pair)
        rows: list[np.ndarray] = []
        counts: list[np.ndarray] = []
        empty = np.zeros(0, dtype=np.int64)
        bounds = starts.tolist()
        for a, b in pairwise(bounds):
            parts = [f[a : b - size + 1] for size, f in sized if b - a >= size]
            ids, c = np.unique(np.concatenate(parts), return_counts=True) if parts else (empty, empty)
            rows.append(ids)
            counts.append(c)
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum([len(r) for r in rows], out=indptr[1:])
        feature = np.concatenate(rows) if rows else empty
        tf = 1.0 + np.log(np.concatenate(counts)) if rows else np.zeros(0)
        df = np.bincount(feature, minlength=1 << self.bits)  # texts per feature (each is once in a row)
        weight = tf * (np.log((1.0 + n) / (1.0 + df[feature])) + 1.0)
        doc = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr))
        norms = np.sqrt(np.bincount(doc, weights=weight * weight, minlength=n))
        weight /= norms[doc]
        return SparseVectors(indptr, feature, weight)


@dataclass(frozen=True)
class SimilarityMerge:
    """Settings of the merge by observation similarity (see the module docstring)."""

    xi_sim: float = 0.9
    """Least cosine similarity of two observations for their steps to share a node, in (0, 1]."""
    embedder: Embedder | None = None
    """The embedding of observations; None: :class:`TfidfEmbedder` with its defaults."""

    def __post_init__(self) -> None:
        if not (
            isinstance(self.xi_sim, (int, float)) and math.isfinite(self.xi_sim) and 0 < self.xi_sim <= 1
        ):
            raise ValueError(f"xi_sim must be a number in (0, 1], got {self.xi_sim!r}")

    @property
    def embedder_name(self) -> str:
        """The name of the embedding used."""
        return (self.embedder or TfidfEmbedder()).name


def _order_key(traj: Trajectory) -> tuple[str, ...]:
    """Trajectories are walked sorted by their texts, so that representatives do not depend on input order."""
    return (traj.initial_observation, *[x for s in traj.steps for x in (s.action, s.observation)])


def merge_similar_observations(
    trajectories: Iterable[Trajectory], merge: SimilarityMerge | None = None
) -> list[Trajectory]:
    """The trajectories of one task, in their order, each observation an action was chosen on replaced by the
    representative observation of the child its step joins under the similarity merge (see the module
    docstring); the exact merge of the result is the similarity tree. Observations that need no change (those
    equal, after normalisation, to their representative, and every last observation) are kept as they are, so
    with nothing similar enough to merge the result builds the exact tree, byte for byte.

    Raises:
        ValueError: the trajectories belong to several tasks.
    """
    merge = merge or SimilarityMerge()
    trajs = list(trajectories)
    tasks = {t.task_id for t in trajs}
    if len(tasks) > 1:
        raise ValueError(f"merge_similar_observations takes one task's trajectories, got {len(tasks)} tasks")
    text_id: dict[str, int] = {}  # normalised text -> its index in texts
    raw_id: dict[str, int] = {}  # raw text -> text id
    texts: list[str] = []

    def tid(raw: str) -> int:
        i = raw_id.get(raw)
        if i is None:
            norm = normalize_text(raw)
            i = text_id.get(norm)
            if i is None:
                i = text_id[norm] = len(texts)
                texts.append(norm)
            raw_id[raw] = i
        return i

    akeys: dict[str, str] = {}
    vectors: Vectors | None = None
    sims: dict[tuple[int, int], float] = {}  # (text, representative text) -> cosine
    kids: dict[tuple[int, str], list[int]] = {}  # (node, action key) -> children, in the order made
    rep: list[int] = [-1]  # per node: the text id of its representative observation (the root has none)
    rep_raw: list[str] = [""]
    placed: dict[tuple[int, str, int], int] = {}  # (node, action key, text id) -> the child it joined
    out: list[Trajectory] = list(trajs)
    for k in sorted(range(len(trajs)), key=lambda k: _order_key(trajs[k])):
        traj = trajs[k]
        node = 0
        raw = traj.initial_observation
        new_obs: list[str] = []  # the observation each action was chosen on, as the tree will show it
        for step in traj.steps:
            o = tid(raw)
            a = akeys.get(step.action)
            if a is None:
                a = akeys[step.action] = normalize_text(step.action)
            c = placed.get((node, a, o))
            if c is None:
                siblings = kids.get((node, a))
                if siblings:
                    if vectors is None:  # every text of the task is known: embed them at once
                        for t in trajs:
                            tid(t.initial_observation)
                            for s in t.steps:
                                tid(s.observation)
                        vectors = (merge.embedder or TfidfEmbedder()).embed(texts)
                    missing = [rep[s] for s in siblings if (o, rep[s]) not in sims]
                    if missing:
                        for j, v in zip(missing, vectors.cosine(o, missing).tolist(), strict=True):
                            sims[o, j] = v
                    best, best_sim = -1, -math.inf
                    for s in siblings:  # the most similar; the first made on ties
                        v = sims[o, rep[s]]
                        if v > best_sim:
                            best, best_sim = s, v
                    if best_sim >= merge.xi_sim:
                        c = best
                if c is None:
                    c = len(rep)
                    rep.append(o)
                    rep_raw.append(raw)
                    kids.setdefault((node, a), []).append(c)
                placed[node, a, o] = c
            new_obs.append(raw if rep[c] == o else rep_raw[c])
            node = c
            raw = step.observation
        out[k] = _with_observations(traj, new_obs)
    return out


def _with_observations(traj: Trajectory, acted_on: list[str]) -> Trajectory:
    """``traj`` with the observation each action was chosen on replaced by ``acted_on`` (the same object when
    nothing changes)."""
    if not acted_on:
        return traj
    steps = list(traj.steps)
    changed = False
    for i in range(1, len(acted_on)):
        if acted_on[i] is not steps[i - 1].observation:
            steps[i - 1] = replace(steps[i - 1], observation=acted_on[i])
            changed = True
    if acted_on[0] is traj.initial_observation and not changed:
        return traj
    return replace(traj, initial_observation=acted_on[0], steps=tuple(steps))
