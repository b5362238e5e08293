"""Hand-written trajectories shared by the tree and search tests."""

from __future__ import annotations

from w2s_agents.types import Source, Step, Trajectory

INSTRUCTION = "Leave the house."


def make_traj(
    steps: list[tuple[str, str] | tuple[str, str, str]],
    ret: float,
    end: str,
    *,
    model: str = "weak",
    seed: int = 0,
    task: str = "house/0",
    initial: str = "start",
    role: str = "weak",
) -> Trajectory:
    """A trajectory from ``(action, observation_after[, thought])`` tuples."""
    return Trajectory(
        task_id=task,
        env_id="w2s/Fake-v0",
        source=Source(model=model, role=role, seed=seed),
        instruction=INSTRUCTION,
        initial_observation=initial,
        steps=tuple(Step(action=s[0], observation=s[1], thought=s[2] if len(s) > 2 else "") for s in steps),
        return_=ret,
        success=end == "won",
        end=end,
    )


def golden_trajectories() -> list[Trajectory]:
    """Four episodes of one task; their tree (canonical ids) is::

        0 root "start"
        ├── 1 look                       (T4, error)
        └── 2 take key  (T1, T2, T3)
            ├── 3 go south               (T2, lost)
            └── 4 open door (T1, T3)
                ├── 5 go north           (T1, won)
                └── 6 go west            (T3, truncated)
    """
    return [
        make_traj(
            [("take key", "got key"), ("open door", "door open"), ("go north", "you win", "the exit is north")],
            1.0,
            "won",
            seed=1,
        ),
        make_traj([("take key", "got key", "x"), ("go south", "you fall in a pit")], 0.0, "lost", seed=2),
        make_traj(
            [("Take  Key", "got key", "grab it"), ("open door", "door open"), ("go west", "a wall")],
            0.5,
            "truncated",
            model="strong",
            seed=3,
        ),
        make_traj([("look", "start")], 0.0, "error", seed=4),
    ]
