"""The typed training rows: one writer, one reader, round trips, and errors that name file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from w2s_agents.errors import DataFormatError
from w2s_agents.search import (
    PairRow,
    SftRow,
    best_path_row,
    expert_failure_pairs,
    mean_values,
    read_pairs,
    read_sft_rows,
    tree_pairs,
    unique_rows,
    write_rows,
)
from w2s_agents.tree import build_trees


@pytest.fixture
def golden_rows(golden_trajectories) -> tuple[list[SftRow], list[PairRow]]:
    tree = build_trees(golden_trajectories)["house/0"]
    values = mean_values(tree)
    best = best_path_row(tree, values)
    assert best is not None
    return [best], tree_pairs(tree, values, margin=0.1)


def test_rows_round_trip_through_their_files(tmp_path: Path, golden_rows, make_traj) -> None:
    sft, pairs = golden_rows
    eto = expert_failure_pairs(
        [
            make_traj([("take key", "k")], 1.0, "won", role="expert", model="gold"),
            make_traj([("look", "s")], 0, "lost"),
        ]
    )
    assert write_rows(sft, tmp_path / "sft.jsonl") == 1
    assert write_rows([*pairs, *eto], tmp_path / "pairs.jsonl") == len(pairs) + 1
    back, skipped = read_sft_rows(tmp_path / "sft.jsonl")
    assert back == sft and skipped == 0 and back[0].origin == f"{tmp_path / 'sft.jsonl'}:1"
    assert read_pairs(tmp_path / "pairs.jsonl") == [*pairs, *eto]
    # the written fields, in the order of DESIGN section 4 (unset optional fields left out)
    first = json.loads((tmp_path / "sft.jsonl").read_text().splitlines()[0])
    assert list(first) == ["messages", "task_id", "node", "value", "return", "sources", "steps"]
    pair = json.loads((tmp_path / "pairs.jsonl").read_text().splitlines()[0])
    assert list(pair)[:4] == ["prompt", "chosen", "rejected", "level"]
    assert pair["chosen_sources"] == list(pairs[0].chosen_sources) == ["strong", "weak"]


def test_unknown_fields_are_kept_and_written_back(tmp_path: Path, golden_rows) -> None:
    _, pairs = golden_rows
    row = {**pairs[0].to_dict(), "ref_chosen_logp": -3.5, "ref_rejected_logp": -4.0, "note": "mine"}
    (tmp_path / "p.jsonl").write_text(json.dumps(row) + "\n")
    (pair,) = read_pairs(tmp_path / "p.jsonl")
    assert dict(pair.extra) == {"ref_chosen_logp": -3.5, "ref_rejected_logp": -4.0, "note": "mine"}
    write_rows([pair], tmp_path / "q.jsonl")
    assert json.loads((tmp_path / "q.jsonl").read_text()) == row


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"x\.jsonl:2: invalid JSON"),
        ("[1, 2]", r"x\.jsonl:2: a pairs row must be a JSON object, got list"),
        ('{"prompt": [], "chosen": [], "rejected": []}', r"x\.jsonl:2: 'prompt' must be a non-empty list"),
        ('PAIR:node="3"', r"x\.jsonl:2: field 'node' must be an integer, got '3'"),
        ('PAIR:level="sideways"', r"x\.jsonl:2: field 'level' must be one of step, continuation, trajectory"),
        ('PAIR:chosen_sources="weak"', r"x\.jsonl:2: 'chosen_sources' must be a list of source names"),
        ("PAIR:ref_chosen_logp=true", r"x\.jsonl:2: 'ref_chosen_logp' must be a number"),
    ],
)
def test_a_bad_pair_is_refused_with_file_and_line(
    tmp_path: Path, golden_rows, line: str, message: str
) -> None:
    _, pairs = golden_rows
    good = pairs[0].to_dict()
    if line.startswith("PAIR:"):
        key, value = line[5:].split("=", 1)
        line = json.dumps({**good, key: json.loads(value)})
    (tmp_path / "x.jsonl").write_text(json.dumps(good) + "\n" + line + "\n")
    with pytest.raises(DataFormatError, match=message):
        read_pairs(tmp_path / "x.jsonl")


def test_sft_rows_from_trajectories_and_their_errors(tmp_path: Path, make_traj) -> None:
    won = make_traj([("take key", "got key"), ("open door", "out")], 1.0, "won")
    lost = make_traj([("look", "start")], 0.0, "lost", seed=1)
    rows, skipped = read_sft_rows([won.to_dict(), lost.to_dict()])
    assert skipped == 1 and rows == [SftRow.from_trajectory(won)]
    assert rows[0].messages[-1] == {"role": "assistant", "content": "open door"}
    assert (rows[0].return_, rows[0].sources, rows[0].steps, rows[0].origin) == (1.0, ("weak",), 2, "rows[0]")
    both, skipped = read_sft_rows([won.to_dict(), lost.to_dict()], success_only=False)
    assert len(both) == 2 and skipped == 0
    with pytest.raises(DataFormatError, match=r"rows\[0\]: 'messages' must end with an assistant"):
        read_sft_rows([{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataFormatError, match=r"rows\[1\]: invalid trajectory"):
        read_sft_rows([won.to_dict(), {**won.to_dict(), "return": 7}])
    with pytest.raises(DataFormatError, match="SFT file not found"):
        read_sft_rows(tmp_path / "missing.jsonl")


def test_supervision_and_unique_rows(golden_rows) -> None:
    sft, pairs = golden_rows
    assert sft[0].supervision() == (("weak",), True)
    assert {p.supervision()[0] for p in pairs} <= {("weak",), ("strong", "weak"), ("strong",)}
    assert list(unique_rows([*pairs, *pairs])) == pairs
    explicit = PairRow.from_dict({**pairs[0].to_dict(), "easy": False})
    assert explicit.supervision()[1] is False
