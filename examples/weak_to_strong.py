"""Weak-to-strong in one script, with the Python API: demos, weak SFT, exploration, trees, MCTS, MCTS-SFT.

Runs on CPU in a few minutes with tiny models::

    python examples/weak_to_strong.py --out /tmp/w2s-example --train 8 --test 4

Every step writes into ``--out`` and is skipped when its output is already there, so an interrupted run
continues where it stopped. ``w2s run`` does the same with cached stages, the ceiling, TreeDPO and a report.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from w2s_agents import TrajectoryStore, read_trajectories
from w2s_agents.agents import Agent, AgentConfig, Sampler
from w2s_agents.agents.models import create_tiny_model, load_model
from w2s_agents.envs.demos import export_demos, suite_task_ids
from w2s_agents.log import setup_logging
from w2s_agents.rollout import collect
from w2s_agents.search import best_path_row, node_values, read_sft_rows, search_tree, tree_pairs, write_rows
from w2s_agents.search.mcts import SearchConfig
from w2s_agents.trainers import TrainConfig, train_sft
from w2s_agents.tree import build_trees


def success_rate(
    model_dir: Path, tasks: list[str], store: Path, agent_cfg: AgentConfig, max_steps: int
) -> float:
    """Greedy success of a model on tasks (episodes stored in ``store``)."""
    agent = Agent(load_model(model_dir), agent_cfg)
    with TrajectoryStore(store) as s:
        collect(
            tasks,
            agent,
            [Sampler(temperature=0.0)],
            s,
            env_kwargs={"max_steps": max_steps},
            max_steps=max_steps,
        )
    trajs = list(read_trajectories(store))
    return sum(t.success for t in trajs) / len(trajs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/example"))
    ap.add_argument("--suite", default="tw-coin_collector")
    ap.add_argument("--train", type=int, default=8, help="train tasks")
    ap.add_argument("--test", type=int, default=4, help="held-out test tasks")
    ap.add_argument("--weak", default="nano", help="tiny preset of the weak model")
    ap.add_argument("--strong", default="weak", help="tiny preset of the strong model")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--max-steps", type=int, default=10)
    args = ap.parse_args()
    setup_logging("INFO")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    agent_cfg = AgentConfig(mode="choose", prompt_admissible=False, prompt_grammar=False)

    # 1. expert demos of the train tasks, and tiny models whose tokenizer is trained on their text
    export_demos(args.suite, "train", out / "demos.jsonl", limit=args.train)
    rows, _ = read_sft_rows(out / "demos.jsonl")  # the won expert episodes as conversations
    texts = ["\n".join(m["content"] for m in r.messages) for r in rows]
    for role, preset in (("weak", args.weak), ("strong", args.strong)):
        if not (out / role).exists():
            create_tiny_model(out / role, texts, preset=preset, seed=0)

    # 2. the weak agent: SFT on the demos
    sft = TrainConfig(method="sft", lr=1e-3, epochs=args.epochs, batch_size=8, valid_fraction=0.0)
    weak = train_sft(out / "weak", rows, out / "weak-sft", sft).model_dir

    # 3. exploration: the weak SFT agent on the train tasks under three sampling settings (tree width 3)
    train_tasks = suite_task_ids(args.suite, "train")[: args.train]
    samplers = [Sampler(temperature=0.0), Sampler(temperature=1.0), Sampler(temperature=1.5)]
    explorer = Agent(load_model(weak), agent_cfg)
    with TrajectoryStore(out / "explore.jsonl") as store:
        summary = collect(
            train_tasks,
            explorer,
            samplers,
            store,
            env_kwargs={"max_steps": args.max_steps},
            max_steps=args.max_steps,
        )
    print(f"exploration: {summary.episodes} new episodes, success so far {summary.success_rate:.2f}")

    # 4. one tree per task, MCTS, best paths and TreeDPO pairs
    search = SearchConfig(iterations=200, sft_min_value=0.5)
    best, pairs = [], []
    for tree in build_trees(read_trajectories(out / "explore.jsonl")).values():
        search_tree(tree, search)
        values = node_values(tree, search.value, search.discount)
        row = best_path_row(tree, values, min_return=search.sft_min_value)
        if row is not None:
            best.append(row)
        pairs += tree_pairs(tree, values, margin=search.margin)
    write_rows(best, out / "best_paths.jsonl")
    write_rows(pairs, out / "pairs.jsonl")
    print(f"search: {len(best)} best paths, {len(pairs)} TreeDPO pairs")

    # 5. the strong agent: MCTS-SFT on the weak agent's best paths (nothing to learn if none succeeded)
    results = {}
    test_tasks = suite_task_ids(args.suite, "test")[: args.test]
    results["weak-sft"] = success_rate(weak, test_tasks, out / "test-weak.jsonl", agent_cfg, args.max_steps)
    if best:
        mcts = TrainConfig(method="mcts-sft", lr=1e-3, epochs=args.epochs, batch_size=8, valid_fraction=0.0)
        strong = train_sft(out / "strong", best, out / "w2s-mcts", mcts).model_dir
        results["w2s-mcts"] = success_rate(
            strong, test_tasks, out / "test-w2s.jsonl", agent_cfg, args.max_steps
        )
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("held-out success:", results)


if __name__ == "__main__":
    main()
