"""An environment plugin in one script: a text env of your own, explored, searched and looked at.

Defines ``VaultEnv`` (a corridor with a key somewhere and a vault at its east end), registers it as
``example/Vault-v0`` the way a plugin's entry point would, lets a tiny random-weight agent explore it under
three sampling settings, merges the episodes into one trajectory tree per task, runs MCTS, extracts the best
paths and TreeDPO pairs, and writes the interactive viewer of each tree and a static figure::

    python examples/custom_env.py --out /tmp/w2s-vault

Open ``OUT/viz/index.html`` in a browser. A package ships such an env, and the task suite ``VAULT_SUITE``
below, by declaring them instead of calling ``register_env`` (docs/envs.md, Plugins); with this file as
``acme_envs/vault.py``::

    [project.entry-points."w2s_agents.envs"]
    "example/Vault-v0" = "acme_envs.vault:VaultEnv"

    [project.entry-points."w2s_agents.suites"]
    vault = "acme_envs.vault:VAULT_SUITE"

Once the package is installed, ``w2s envs suites`` lists ``vault`` and the whole pipeline runs on it::

    w2s run tasks.suite=vault tasks.train=4 tasks.valid=0 tasks.test=2 tasks.max_steps=12

(``w2s rollout CONFIG rollout.suite=vault`` alone explores it); the test
``tests/test_envs_plugins.py::test_w2s_run_on_an_installed_plugin_suite`` does exactly this.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from w2s_agents import TrajectoryStore, read_trajectories
from w2s_agents.agents import Agent, AgentConfig, Sampler
from w2s_agents.agents.models import create_tiny_model, load_model
from w2s_agents.envs import register_env
from w2s_agents.envs.base import EngineStatus, TextEnv, UnknownTaskError
from w2s_agents.envs.suites import EnvSuite
from w2s_agents.log import setup_logging
from w2s_agents.rollout import collect
from w2s_agents.search import best_path_row, node_values, search_tree, tree_pairs, write_rows
from w2s_agents.search.mcts import SearchConfig
from w2s_agents.tree import build_trees, tree_filename
from w2s_agents.viz import export_static, render_run_index

TASKS = 10  # vault/0 .. vault/9: 3 to 6 rooms, the key in a different room each


class VaultEnv(TextEnv):
    """Rooms 1..N in a row. Taking the key scores a point; opening the vault in room N with it wins."""

    env_id = "example/Vault-v0"
    command_grammar = "go east, go west, take key, open vault, look"

    def __init__(self, task: str | None = None, *, max_steps: int = 20, render_mode: str | None = None):
        super().__init__(task, max_steps=max_steps, render_mode=render_mode)
        self.rooms, self.key_room = 3, 1
        self.pos, self.has_key, self.opened = 0, False, False

    # -- tasks
    def task_ids(self, split: str | None = None) -> list[str]:
        ids = [f"vault/{i}" for i in range(TASKS)]
        return {"train": ids[:6], "valid": [], "test": ids[6:]}.get(split, ids) if split else ids

    def default_task(self) -> str:
        return "vault/0"

    def _load_task(self, task_id: str) -> str:
        if task_id not in self.task_ids():
            raise UnknownTaskError(f"unknown task {task_id!r}; tasks are vault/0 .. vault/{TASKS - 1}")
        i = int(task_id.split("/")[1])
        self.rooms = 3 + i % 4
        self.key_room = (i * 5 + 1) % self.rooms
        return "Find the brass key and open the vault at the east end of the corridor."

    # -- engine
    def _describe(self, text: str) -> EngineStatus:
        room = f"-= Room {self.pos + 1} =-\nA dusty room of the corridor."
        if self.pos == self.key_room and not self.has_key:
            room += " A brass key lies on the floor."
        if self.pos == self.rooms - 1:
            room += " The vault door is here."
        admissible = ["look"]
        if self.pos > 0:
            admissible.append("go west")
        if self.pos < self.rooms - 1:
            admissible.append("go east")
        if self.pos == self.key_room and not self.has_key:
            admissible.append("take key")
        if self.pos == self.rooms - 1 and not self.opened:
            admissible.append("open vault")
        return EngineStatus(
            observation=f"{text}\n\n{room}".strip(),
            raw_score=float(self.has_key) + float(self.opened),
            max_score=2.0,
            won=self.opened,
            lost=False,
            admissible=tuple(sorted(admissible)),
            expert_plan=tuple(self._plan()),
        )

    def _plan(self) -> list[str]:
        plan, pos = [], self.pos
        if not self.has_key:
            step = "go east" if self.key_room > pos else "go west"
            plan += [step] * abs(self.key_room - pos) + ["take key"]
            pos = self.key_room
        return [*plan, *["go east"] * (self.rooms - 1 - pos), "open vault"] if not self.opened else []

    def _engine_reset(self) -> EngineStatus:
        self.pos, self.has_key, self.opened = 0, False, False
        return self._describe("You wake up at the west end of a corridor.")

    def _engine_step(self, command: str) -> EngineStatus:
        if command == "go east" and self.pos < self.rooms - 1:
            self.pos += 1
            return self._describe("You walk east.")
        if command == "go west" and self.pos > 0:
            self.pos -= 1
            return self._describe("You walk west.")
        if command == "take key" and self.pos == self.key_room and not self.has_key:
            self.has_key = True
            return self._describe("You pick up the brass key. Your score has gone up by one point.")
        if command == "open vault" and self.pos == self.rooms - 1:
            if not self.has_key:
                return self._describe("The vault is locked.")
            self.opened = True
            return self._describe("The vault swings open. You have won!")
        if command == "look":
            return self._describe("")
        return self._describe("You can't do that here.")

    def _engine_snapshot(self) -> Any:
        return (self.pos, self.has_key, self.opened)  # exact: clone/restore costs nothing

    def _engine_restore(self, snapshot: Any) -> bool:
        self.pos, self.has_key, self.opened = snapshot
        return True


VAULT_SUITE = EnvSuite(
    "vault",
    VaultEnv.env_id,
    description="corridors of 3 to 6 rooms: take the key, open the vault",
)
"""The env's tasks as a suite (train vault/0..5, test vault/6..9: the env's own ``task_ids(split)``)."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/vault-example"))
    ap.add_argument("--seeds", type=int, default=4, help="episodes per task and sampler")
    ap.add_argument("--max-steps", type=int, default=12)
    args = ap.parse_args()
    setup_logging("INFO")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    register_env(VaultEnv.env_id, VaultEnv)  # what the entry point of an installed plugin does

    # a tiny random-weight agent whose tokenizer knows the env's words (its text from one expert play a task)
    env = VaultEnv()
    texts = []
    for task in env.task_ids("train"):
        obs, info = env.reset(options={"task": task})
        texts.append(obs)
        for action in info["expert_plan"]:
            obs, *_ = env.step(action)
            texts += [action, obs]
    if not (out / "model").exists():
        create_tiny_model(out / "model", texts, preset="nano", vocab_size=300, seed=0)
    # random weights favour short commands by their summed log-likelihood; the per-token mean explores more
    config = AgentConfig(mode="choose", name="random-nano", length_normalize=True)
    agent = Agent(load_model(out / "model"), config)

    # exploration: every train task under three sampling settings
    samplers = [Sampler(temperature=0.0), Sampler(temperature=1.0), Sampler(temperature=3.0)]
    with TrajectoryStore(out / "trajectories.jsonl") as store:
        summary = collect(
            env.task_ids("train"), agent, samplers, store, env=VaultEnv.env_id,
            env_kwargs={"max_steps": args.max_steps}, seeds=args.seeds, max_steps=args.max_steps,
        )  # fmt: skip
    print(f"exploration: {summary.episodes} new episodes, success so far {summary.success_rate:.2f}")

    # trees, MCTS, best paths and pairs; a viewer page per tree and a figure of the first one
    search = SearchConfig(iterations=300, discount=0.95)
    best, pairs, files = [], [], []
    for task, tree in sorted(build_trees(read_trajectories(out / "trajectories.jsonl")).items()):
        search_tree(tree, search)
        values = node_values(tree, search.value)
        if (row := best_path_row(tree, values)) is not None:
            best.append(row)
        pairs += tree_pairs(tree, values, margin=search.margin)
        files.append(tree.save(out / "trees" / tree_filename(task)))
    write_rows(best, out / "sft.jsonl")
    write_rows(pairs, out / "pairs.jsonl")
    index, _ = render_run_index(out, out / "viz", search=search, pairs=out / "pairs.jsonl")
    export_static(files[0], out / "viz" / "first-tree.svg", depth=4, search=search)
    results = {
        "episodes": len(list(read_trajectories(out / "trajectories.jsonl"))),
        "trees": len(files),
        "best_paths": len(best),
        "pairs": len(pairs),
        "best_returns": {r.task_id: r.return_ for r in best},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"search: {len(files)} trees, {len(best)} best paths, {len(pairs)} TreeDPO pairs")
    print(f"viewer: {index}")


if __name__ == "__main__":
    main()
