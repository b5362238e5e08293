"""Reading the pair and SFT rows that ``w2s search`` writes (``pairs.jsonl``, ``sft.jsonl``) for the viewer.

Each reader keeps only the node fields a page needs (the messages are dropped) and groups the rows by task id;
each row remembers where it came from (``file:line``), so a row that does not fit its tree is named in the error.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from w2s_agents.errors import DataFormatError

__all__ = ["read_pair_rows", "read_path_rows"]


def _read_jsonl(path: Path, what: str) -> Iterable[tuple[int, dict[str, Any]]]:
    try:
        fh = path.open(encoding="utf-8")
    except FileNotFoundError:
        raise DataFormatError(f"{what} file not found: {path}") from None
    except OSError as exc:
        raise DataFormatError(f"{path}: cannot read {what} file: {exc}") from None
    with fh:
        try:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataFormatError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from None
                if not isinstance(row, dict):
                    raise DataFormatError(f"{path}:{lineno}: a {what} row must be a JSON object")
                yield lineno, row
        except UnicodeDecodeError as exc:
            raise DataFormatError(f"{path}: not UTF-8 text: {exc}") from None


def _int_field(row: Mapping[str, Any], key: str, where: str) -> int:
    v = row.get(key)
    if not isinstance(v, int) or isinstance(v, bool):
        raise DataFormatError(f"{where}: field '{key}' must be an integer, got {v!r}")
    return v


def _num_field(row: Mapping[str, Any], key: str, where: str) -> float:
    v = row.get(key, math.nan)
    if v is None:
        return math.nan
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise DataFormatError(f"{where}: field '{key}' must be a number, got {v!r}")
    return float(v)


def _task_field(row: Mapping[str, Any], where: str) -> str:
    task = row.get("task_id")
    if not isinstance(task, str) or not task:
        raise DataFormatError(f"{where}: field 'task_id' must be a non-empty string, got {task!r}")
    return task


def read_pair_rows(path: str | os.PathLike[str]) -> dict[str, list[dict[str, Any]]]:
    """The node fields of the pair rows of a ``pairs.jsonl`` (as written by ``w2s search``), by task id.

    Each returned row keeps ``task_id, node, chosen_node, rejected_node, level, value_gap, chosen_value,
    rejected_value`` and ``where`` (``file:line``); the messages are dropped.

    Raises:
        DataFormatError: the file is missing, a line is not a JSON object, or a field has the wrong type
            (the message names ``file:line``).
    """
    p = Path(path)
    out: dict[str, list[dict[str, Any]]] = {}
    for lineno, row in _read_jsonl(p, "pairs"):
        where = f"{p}:{lineno}"
        level = row.get("level", "step")
        if not isinstance(level, str):
            raise DataFormatError(f"{where}: field 'level' must be a string, got {level!r}")
        out.setdefault(_task_field(row, where), []).append(
            {
                "node": _int_field(row, "node", where),
                "chosen_node": _int_field(row, "chosen_node", where),
                "rejected_node": _int_field(row, "rejected_node", where),
                "level": level,
                "value_gap": _num_field(row, "value_gap", where),
                "chosen_value": _num_field(row, "chosen_value", where),
                "rejected_value": _num_field(row, "rejected_value", where),
                "where": where,
            }
        )
    return out


def read_path_rows(path: str | os.PathLike[str]) -> dict[str, list[dict[str, Any]]]:
    """The node fields of the SFT rows of an ``sft.jsonl`` (best paths, as written by ``w2s search``), by task.

    Each returned row keeps ``task_id, node`` (the path's last node), ``steps`` (its length in actions, when
    present), ``value``, ``return`` and ``where`` (``file:line``).

    Raises:
        DataFormatError: the file is missing, a line is not a JSON object, or a field has the wrong type.
    """
    p = Path(path)
    out: dict[str, list[dict[str, Any]]] = {}
    for lineno, row in _read_jsonl(p, "SFT"):
        where = f"{p}:{lineno}"
        steps = row.get("steps")
        if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool)):
            raise DataFormatError(f"{where}: field 'steps' must be an integer, got {steps!r}")
        out.setdefault(_task_field(row, where), []).append(
            {
                "node": _int_field(row, "node", where),
                "steps": steps,
                "value": _num_field(row, "value", where),
                "return": _num_field(row, "return", where),
                "where": where,
            }
        )
    return out
