"""Training rows as the trainers use them: read and checked by :mod:`w2s_agents.search.rows`, then split.

Rows are the typed rows that :mod:`w2s_agents.search` writes (DESIGN section 4): SFT rows (``messages``, a
conversation whose assistant turns are the agent's) and preference pairs (``prompt``, ``chosen``, ``rejected``).
Trajectory files (``w2s.trajectory/1``, e.g. expert demos) are accepted for SFT too: each won episode becomes
one conversation (:meth:`~w2s_agents.search.rows.SftRow.from_trajectory`). A malformed row is refused with
``file:line``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from w2s_agents.errors import DataFormatError
from w2s_agents.search.rows import RowsInput, describe, read_pairs, read_sft_rows
from w2s_agents.seeding import derive_seed

__all__ = [
    "Row",
    "RowsInput",
    "data_fingerprint",
    "load_pairs",
    "load_sft_rows",
    "split_by_task",
    "train_and_valid_rows",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Row:
    """One training row with where it came from (``file:line`` or ``rows[i]``) for error messages."""

    data: dict[str, Any]
    """The row as written (:meth:`SftRow.to_dict` / :meth:`PairRow.to_dict`)."""
    origin: str
    sources: tuple[str, ...] = field(default=())  # weak models behind the row (RAVEN weights)
    easy: bool = True  # the sources agree (SftRow.supervision / PairRow.supervision)


def load_sft_rows(rows_or_path: RowsInput, *, success_only: bool = True) -> list[Row]:
    """SFT rows from ``.jsonl`` files or memory, checked (see :func:`w2s_agents.search.rows.read_sft_rows`).

    Raises:
        DataFormatError: a malformed row, with ``file:line`` (or ``rows[i]``) and what is wrong, or no rows.
    """
    rows, skipped = read_sft_rows(rows_or_path, success_only=success_only)
    if skipped:
        logger.info("left out %d trajectories (not won or without steps)", skipped)
    if not rows:
        more = f" ({skipped} trajectories not won or without steps)" if skipped else ""
        raise DataFormatError(f"no SFT rows in {describe(rows_or_path)}{more}")
    return [Row(r.to_dict(), r.origin, *r.supervision()) for r in rows]


def load_pairs(pairs_or_path: RowsInput) -> list[Row]:
    """Preference pairs from ``.jsonl`` files or memory, checked (see :func:`w2s_agents.search.rows.read_pairs`).

    A pair whose chosen side equals its rejected side carries no preference (its DPO loss is log 2 whatever
    the model does): such pairs are dropped with a warning that counts them and names the first.

    Raises:
        DataFormatError: a malformed pair, with ``file:line`` (or ``rows[i]``) and what is wrong; no pairs; or
            only pairs whose two sides are equal (naming the first).
    """
    pairs = read_pairs(pairs_or_path)
    if not pairs:
        raise DataFormatError(
            f"no preference pairs in {describe(pairs_or_path)} (pairs need trees with branches: several "
            "trajectories per task)"
        )
    same = [p for p in pairs if p.chosen == p.rejected]
    if same:
        if len(same) == len(pairs):
            raise DataFormatError(
                f"{same[0].origin}: 'chosen' equals 'rejected' in every pair of {describe(pairs_or_path)} "
                f"({len(pairs)} pairs); a pair needs two different continuations"
            )
        logger.warning(
            "%d of %d pairs have 'chosen' equal to 'rejected' (the first at %s); dropped: they carry no preference",
            len(same),
            len(pairs),
            same[0].origin,
        )
        pairs = [p for p in pairs if p.chosen != p.rejected]
    return [Row(p.to_dict(), p.origin, *p.supervision()) for p in pairs]


def split_by_task(rows: Sequence[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Hold out about ``fraction`` of the tasks (``task_id``; rows without one count as their own task).

    The choice is a seeded hash of the task id, so it does not depend on the order of the rows. Returns
    ``(train, valid)``; ``valid`` is empty when ``fraction`` is 0, when fewer than two tasks exist, or when
    the hash holds out every task or none.
    """
    if fraction <= 0:
        return list(rows), []
    tasks = sorted({str(r.data.get("task_id", r.origin)) for r in rows})
    if len(tasks) < 2:
        return list(rows), []
    ranked = sorted(tasks, key=lambda t: derive_seed(seed, "valid-split", t))
    n_valid = min(len(tasks) - 1, max(1, round(fraction * len(tasks))))
    held = set(ranked[:n_valid])
    train = [r for r in rows if str(r.data.get("task_id", r.origin)) not in held]
    valid = [r for r in rows if str(r.data.get("task_id", r.origin)) in held]
    return train, valid


def train_and_valid_rows(
    load: Callable[[RowsInput], list[Row]],
    rows_or_path: RowsInput,
    valid_rows_or_path: RowsInput | None,
    *,
    hold_out: bool,
    fraction: float,
    seed: int,
) -> tuple[list[Row], list[Row]]:
    """``(train, valid)`` rows of a training run: ``load(rows_or_path)`` and ``load(valid_rows_or_path)`` when
    validation data is given; else, when ``hold_out``, about ``fraction`` of the tasks held out
    (:func:`split_by_task` with ``seed``); else no validation rows.

    Raises:
        DataFormatError: what ``load`` raises (a malformed row with ``file:line``, or no rows).
    """
    rows = load(rows_or_path)
    if valid_rows_or_path is not None:
        return rows, load(valid_rows_or_path)
    if hold_out:
        return split_by_task(rows, fraction, seed)
    return rows, []


def data_fingerprint(rows: Sequence[Row]) -> str:
    """A hash of the rows' content (order included): a run resumes only on the data it started with."""
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps(r.data, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()[:16]
