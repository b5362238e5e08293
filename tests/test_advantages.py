"""Step-level and trajectory-level advantages on the golden tree, worked out by hand, and the PG rows they make.

The golden tree (tests/conftest.py), returns T1 1.0 (won), T2 0.0, T3 0.5, T4 0.0::

    0 root
    ├── 1 look                       (T4)            visits 1, mean return 0.0
    └── 2 take key  (T1, T2, T3)                     visits 3, mean return 0.5
        ├── 3 go south               (T2)            visits 1, mean return 0.0
        └── 4 open door (T1, T3)                     visits 2, mean return 0.75
            ├── 5 go north           (T1)            visits 1, mean return 1.0
            └── 6 go west            (T3)            visits 1, mean return 0.5
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from w2s_agents.errors import DataFormatError
from w2s_agents.search.advantages import (
    PGRow,
    group_normalise,
    pg_rows,
    read_pg_rows,
    step_advantages,
    trajectory_advantages,
)
from w2s_agents.search.mcts import search_tree
from w2s_agents.search.values import mean_values, search_values
from w2s_agents.tree import TrajectoryTree, build_trees


@pytest.fixture
def golden(golden_trajectories) -> TrajectoryTree:
    return build_trees(golden_trajectories)["house/0"]


def test_step_advantages_from_mean_returns_by_hand(golden: TrajectoryTree) -> None:
    adv, v = step_advantages(golden, mean_values(golden))
    # V(0) = (1 * 0.0 + 3 * 0.5) / 4 = 0.375          -> A(1) = 0 - 0.375 = -0.375, A(2) = 0.5 - 0.375 = 0.125
    # V(2) = (1 * 0.0 + 2 * 0.75) / 3 = 0.5           -> A(3) = -0.5, A(4) = 0.25
    # V(4) = (1 * 1.0 + 1 * 0.5) / 2 = 0.75           -> A(5) = 0.25, A(6) = -0.25
    expected = [-0.375, 0.125, -0.5, 0.25, 0.25, -0.25]
    assert math.isnan(adv[0]) and math.isnan(v[0])
    assert adv[1:] == pytest.approx(expected)
    assert v[1:] == pytest.approx([0.375, 0.375, 0.5, 0.5, 0.75, 0.75])


def test_step_advantages_from_given_values_skip_unknown_nodes(golden: TrajectoryTree) -> None:
    q = np.array([np.nan, 0.2, 0.6, 0.1, 0.9, 1.0, np.nan])  # node 6 never reached by the search
    adv, _ = step_advantages(golden, q)
    # V(0) = (1 * 0.2 + 3 * 0.6) / 4 = 0.5            -> A(1) = -0.3, A(2) = 0.1
    # V(2) = (1 * 0.1 + 2 * 0.9) / 3 = 1.9 / 3        -> A(3) = 0.1 - 0.6333 = -0.5333, A(4) = 0.2667
    # V(4) = node 5 alone (node 6 unknown) = 1.0      -> A(5) = 0, A(6) unknown
    assert adv[1:6] == pytest.approx([-0.3, 0.1, 0.1 - 1.9 / 3, 0.9 - 1.9 / 3, 0.0])
    assert math.isnan(adv[6])
    with pytest.raises(ValueError, match="one value per node"):
        step_advantages(golden, q[:3])


def test_step_advantages_from_mcts_values_are_q_minus_visit_weighted_sibling_mean(golden) -> None:
    search_tree(golden)
    q = search_values(golden)
    adv, v = step_advantages(golden, q)
    visits = [golden.visits(c) for c in (3, 4)]
    assert v[3] == pytest.approx((visits[0] * q[3] + visits[1] * q[4]) / sum(visits))
    assert adv[4] == pytest.approx(q[4] - v[4]) and adv[4] > 0 > adv[3]


def test_trajectory_advantages_group_normalised_by_hand(golden: TrajectoryTree) -> None:
    # episodes end at 1 (T4, 0.0), 3 (T2, 0.0), 5 (T1, 1.0), 6 (T3, 0.5): mean 0.375,
    # population variance ((0.375^2) * 2 + 0.625^2 + 0.125^2) / 4 = 0.171875, std 0.4145781
    std = math.sqrt(0.171875)
    adv = trajectory_advantages(golden, eps=0.0)
    # a node's advantage: (mean return through it - 0.375) / std
    through = [0.0, 0.5, 0.0, 0.75, 1.0, 0.5]
    assert adv[1:] == pytest.approx([(r - 0.375) / std for r in through])
    assert adv[5] == pytest.approx(1.5075567)
    episodes = group_normalise([0.0, 0.0, 1.0, 0.5], eps=0.0)
    assert episodes == pytest.approx([-0.9045340, -0.9045340, 1.5075567, 0.3015113])
    assert group_normalise([0.0, 1.0, 0.5], counts=[2, 1, 1], eps=0.0) == pytest.approx(episodes[1:])
    assert group_normalise([0.3, 0.3]) == pytest.approx([0.0, 0.0])  # one outcome: no signal


def test_pg_rows_end_on_the_steps_action_and_round_trip(golden: TrajectoryTree, tmp_path) -> None:
    rows = pg_rows(golden, level="step", value="mean", system=None)
    assert [r.node for r in rows] == [1, 2, 3, 4, 5, 6]
    row = rows[3]  # node 4, open door, after take key
    assert (
        row.advantage == pytest.approx(0.25) and row.q == pytest.approx(0.75) and row.v == pytest.approx(0.5)
    )
    assert [m["role"] for m in row.messages] == ["user", "assistant", "user", "assistant"]
    assert row.messages[-1]["content"].endswith("open door") and row.messages[-2]["content"] == "got key"
    assert row.sources == ("strong", "weak") and row.visits == 2
    kept = pg_rows(golden, level="step", value="mean", min_abs_advantage=0.3)
    assert [r.node for r in kept] == [1, 3]
    path = tmp_path / "pg.jsonl"
    path.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in rows))
    back = read_pg_rows(str(path))
    assert [r.to_dict() for r in back] == [r.to_dict() for r in rows]
    assert isinstance(back[0], PGRow) and back[0].origin == f"{path}:1"
    grpo = pg_rows(golden, level="trajectory")
    assert len(grpo) == 6 and grpo[0].level == "trajectory" and grpo[0].q is None


def test_pg_rows_need_search_values_for_mcts(golden: TrajectoryTree) -> None:
    with pytest.raises(ValueError, match="no search values"):
        pg_rows(golden, value="mcts")


def test_bad_pg_rows_are_refused_with_file_and_line(tmp_path) -> None:
    path = tmp_path / "bad.jsonl"
    good = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go"}],
        "advantage": 1,
    }
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "advantage": "big"}) + "\n")
    with pytest.raises(DataFormatError, match=rf"{path}:2: field 'advantage' must be a number"):
        read_pg_rows(str(path))
    path.write_text(json.dumps({**good, "advantage": None}) + "\n")
    with pytest.raises(DataFormatError, match=r":1: a policy-gradient row needs a finite number 'advantage'"):
        read_pg_rows(str(path))
    path.write_text(json.dumps({**good, "messages": good["messages"][:1]}) + "\n")
    with pytest.raises(DataFormatError, match=r":1: 'messages' must end with the step's action"):
        read_pg_rows(str(path))
