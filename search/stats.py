"""Search statistics and the selection rules that every search shares (offline MCTS, online PUCT).

One vocabulary for every search (see the glossary in docs/DESIGN.md):

* ``visits`` N(v): simulations that went through node v (the paper's c_M);
* ``value_sum`` W(v): the sum of the values backed up through v (the paper's r_M);
* Q(v) = W(v) / N(v): v's search value (the paper's r_M / c_M).

Trees store a search's N and W per node as ``search_visits`` and ``search_value_sum``.

Selection:

* UCB (the paper's offline MCTS): ``Q(c) + gamma * sqrt(ln N(parent) / N(c))``; an unvisited child first;
* PUCT (online expansion with a policy prior P): ``Q(c) + c_puct * P(c) * sqrt(N(parent)) / (1 + N(c))``.

Backup adds one visit and the simulation's value to every node of its path. These functions are the plain
reference steps; the offline search runs the same rule in a contracted loop (:mod:`w2s_agents.search.mcts`)
and the tests hold the two equal.
"""

from __future__ import annotations

import math
from collections.abc import MutableSequence, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["SearchStats", "backup", "puct_score", "select_child", "ucb_score"]


def ucb_score(value_sum: float, visits: int, parent_visits: int, gamma: float) -> float:
    """UCB of a child: ``value_sum / visits + gamma * sqrt(ln(parent_visits) / visits)``; +inf when unvisited."""
    if visits == 0:
        return math.inf
    return value_sum / visits + gamma * math.sqrt(math.log(parent_visits) / visits)


def puct_score(q: float, prior: float, parent_visits: int, visits: int, c_puct: float) -> float:
    """PUCT: ``q + c_puct * prior * sqrt(parent_visits) / (1 + visits)``."""
    return q + c_puct * prior * math.sqrt(parent_visits) / (1 + visits)


def select_child(
    children: Sequence[int],
    visits: Sequence[int],
    value_sum: Sequence[float],
    parent_visits: int,
    gamma: float,
) -> int:
    """The child to descend to by UCB: the first unvisited one, else the highest UCB (first of equals wins)."""
    best, best_score = children[0], -math.inf
    for c in children:
        score = ucb_score(value_sum[c], visits[c], parent_visits, gamma)
        if score > best_score:
            best, best_score = c, score
    return best


def backup(
    path: Sequence[int], value: float, visits: MutableSequence[int], value_sum: MutableSequence[float]
) -> None:
    """Add one visit and ``value`` to every node on ``path`` (in place)."""
    for n in path:
        visits[n] += 1
        value_sum[n] += value


@dataclass
class SearchStats:
    """N and W of one search, one entry per node (node ids index the lists; :meth:`grow` as nodes are added)."""

    visits: list[int] = field(default_factory=list)
    """N: simulations through each node."""
    value_sum: list[float] = field(default_factory=list)
    """W: sum of the values backed up through each node."""

    @classmethod
    def zeros(cls, n: int) -> SearchStats:
        """Statistics of ``n`` unvisited nodes."""
        return cls([0] * n, [0.0] * n)

    def __len__(self) -> int:
        return len(self.visits)

    def grow(self, n: int) -> None:
        """Cover nodes up to ``n - 1`` (new nodes unvisited)."""
        extra = n - len(self.visits)
        if extra > 0:
            self.visits.extend([0] * extra)
            self.value_sum.extend([0.0] * extra)

    def q(self, node: int, default: float = math.nan) -> float:
        """Q = W / N of ``node``; ``default`` when the search never went there."""
        n = self.visits[node] if node < len(self.visits) else 0
        return self.value_sum[node] / n if n else default

    def backup(self, path: Sequence[int], value: float) -> None:
        """Add one visit and ``value`` to every node on ``path``."""
        self.grow(max(path) + 1)
        backup(path, value, self.visits, self.value_sum)

    def arrays(self, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(visits, value_sum)`` as int64 / float64 arrays of length ``n`` (default: the nodes covered)."""
        if n is not None:
            self.grow(n)
        return np.asarray(self.visits, dtype=np.int64), np.asarray(self.value_sum, dtype=np.float64)
