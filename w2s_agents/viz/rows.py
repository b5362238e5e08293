"""The pair and SFT rows that ``w2s search`` writes (``pairs.jsonl``, ``sft.jsonl``), as the viewer needs them.

The rows are read and checked by the one reader of row files (:mod:`w2s_agents.search.rows`); the viewer keeps
only their node fields, grouped by task id, each with where it came from (``file:line``), so a row that does
not fit its tree is named in the error. An SFT row of a shortened path (loop-erased or stitched over the game
states, :mod:`w2s_agents.search.paths`) also names its tree nodes (``path_nodes``), which the viewer shows as
the path.
"""

from __future__ import annotations

import math
import os
from typing import Any

from w2s_agents.errors import DataFormatError
from w2s_agents.search.rows import read_pairs, read_sft_rows

__all__ = ["read_pair_rows", "read_path_rows"]


def _node(value: int | None, key: str, where: str) -> int:
    if value is None:
        raise DataFormatError(f"{where}: field '{key}' must be an integer, got None")
    return value


def _task(value: str | None, where: str) -> str:
    if value is None:
        raise DataFormatError(f"{where}: field 'task_id' must be a non-empty string, got None")
    return value


def _num(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _path_nodes(value: Any, where: str) -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise DataFormatError(
            f"{where}: field 'path_nodes' must be a list of node ids (integers), got {value!r:.80}"
        )
    return value


def _path_kind(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise DataFormatError(f"{where}: field 'path' must be a non-empty string, got {value!r:.80}")
    return value


def read_pair_rows(path: str | os.PathLike[str]) -> dict[str, list[dict[str, Any]]]:
    """The node fields of the pair rows of a ``pairs.jsonl`` (as written by ``w2s search``), by task id.

    Each returned row keeps ``node, chosen_node, rejected_node, level, value_gap, chosen_value,
    rejected_value`` and ``where`` (``file:line``); the messages are dropped.

    Raises:
        DataFormatError: the file is missing, a line is not a JSON object, a row is not a pair, or a field has
            the wrong type (the message names ``file:line``).
    """
    out: dict[str, list[dict[str, Any]]] = {}
    for pair in read_pairs(os.fspath(path)):
        where = pair.origin
        out.setdefault(_task(pair.task_id, where), []).append(
            {
                "node": _node(pair.node, "node", where),
                "chosen_node": _node(pair.chosen_node, "chosen_node", where),
                "rejected_node": _node(pair.rejected_node, "rejected_node", where),
                "level": pair.level,
                "value_gap": _num(pair.value_gap),
                "chosen_value": _num(pair.chosen_value),
                "rejected_value": _num(pair.rejected_value),
                "where": where,
            }
        )
    return out


def read_path_rows(path: str | os.PathLike[str]) -> dict[str, list[dict[str, Any]]]:
    """The node fields of the SFT rows of an ``sft.jsonl`` (best paths, as written by ``w2s search``), by task.

    Each returned row keeps ``node`` (the path's last node), ``steps`` (its length in actions, when present),
    ``value``, ``return``, ``path_nodes`` (the tree nodes of a shortened path, the root first; None for a tree
    path, which runs from the root to ``node``), ``path`` (how the path was found: ``tree``, ``loop-erased``,
    ``stitched``; None when the row does not say) and ``where`` (``file:line``).

    Raises:
        DataFormatError: the file is missing, a line is not a JSON object, a row is not an SFT row, or a field
            has the wrong type.
    """
    out: dict[str, list[dict[str, Any]]] = {}
    rows, _ = read_sft_rows(os.fspath(path), success_only=False)
    for row in rows:
        where = row.origin
        out.setdefault(_task(row.task_id, where), []).append(
            {
                "node": _node(row.node, "node", where),
                "steps": row.steps,
                "value": _num(row.value),
                "return": _num(row.return_),
                "path_nodes": _path_nodes(row.extra.get("path_nodes"), where),
                "path": _path_kind(row.extra.get("path"), where),
                "where": where,
            }
        )
    return out
