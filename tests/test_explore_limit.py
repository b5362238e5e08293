"""``explore.max_steps``: explorations get a step limit of their own (twice ``tasks.max_steps`` unless set);
evaluation keeps ``tasks.max_steps``."""

from __future__ import annotations

from typing import Any

import pytest

from w2s_agents.errors import ConfigError
from w2s_agents.pipeline import build_stages
from w2s_agents.pipeline.cache import stage_keys
from w2s_agents.pipeline.experiment import load_experiment
from w2s_agents.store import read_trajectories


def test_the_exploration_limit_changes_exploration_and_what_follows_it_only() -> None:
    """Unset, the limit is twice ``tasks.max_steps``, and naming that value gives the same stage keys; another
    limit gives new keys to the stages that play explorations (and those that read them) while the tasks, demos
    and SFT baselines are reused."""
    default = load_experiment(None)
    assert default.explore.max_steps is None
    assert (default.explore_max_steps, default.tasks.max_steps) == (24, 12)
    assert load_experiment(None, ["tasks.max_steps=20"]).explore_max_steps == 40
    keys = stage_keys(build_stages(default, 0))
    assert stage_keys(build_stages(load_experiment(None, ["explore.max_steps=24"]), 0)) == keys
    same = load_experiment(None, ["explore.max_steps=12"])
    assert (same.explore_max_steps, same.tasks.max_steps) == (12, 12)
    other = stage_keys(build_stages(same, 0))
    changed = {n for n, k in keys.items() if other[n] != k}
    assert {"explore", "trees", "search", "w2s-mcts", "eval"} <= changed
    assert not changed & {"tasks", "held-out", "demos", "models", "weak-sft", "strong-sft", "ceiling-sft"}
    baselines = ["train.baselines=[eto]"]
    plain = stage_keys(build_stages(load_experiment(None, baselines), 0))
    explored = stage_keys(build_stages(load_experiment(None, [*baselines, "explore.max_steps=12"]), 0))
    assert plain["strong-explore"] != explored["strong-explore"]


@pytest.mark.parametrize("value", ["0", "-1"])
def test_an_exploration_limit_below_one_is_refused_naming_the_key(value: str) -> None:
    with pytest.raises(ConfigError, match=r"'explore'.*'max_steps' must be >= 1"):
        load_experiment(None, [f"explore.max_steps={value}"])


def test_explorations_run_to_their_own_limit_and_evaluation_to_the_tasks(feature_run: Any) -> None:
    """The shared feature run explores up to 9 steps (``explore.max_steps=9``) and evaluates up to 6
    (``tasks.max_steps``): its nano agents, too small to win, use the whole limit of each."""
    cfg = feature_run.cfg
    assert (cfg.explore.max_steps, cfg.tasks.max_steps) == (9, 6)
    seed_dir = feature_run.result.run_dir / "seed-0"
    for stage in ("explore", "explore-b", "strong-explore", "explore-r2"):
        lengths = [len(t.steps) for t in read_trajectories(seed_dir / stage / "trajectories.jsonl")]
        assert lengths and max(lengths) == 9, (stage, sorted(set(lengths)))
    tested = [len(t.steps) for p in (seed_dir / "eval").glob("test-*.jsonl") for t in read_trajectories(p)]
    assert tested and max(tested) == 6, sorted(set(tested))


def test_a_step_limit_among_the_env_arguments_is_refused_naming_the_key() -> None:
    """The step limits are tasks.max_steps and explore.max_steps; env_kwargs cannot set a third one."""
    with pytest.raises(ConfigError, match=r"'tasks'.*'env_kwargs' must not set max_steps"):
        load_experiment(None, ["tasks.env_kwargs={max_steps: 30}"])
    assert load_experiment(None, ["tasks.env_kwargs={banner: true}"]).tasks.env_settings(7) == {
        "max_steps": 7,
        "banner": True,
    }
