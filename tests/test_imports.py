"""Import hygiene: the package, the trainers, the agent and the model builder import and run without ray,
textworld, gymnasium, trl, datasets, jericho, vllm or wandb (optional extras a GPU machine may lack).

A child process wraps the finders of ``sys.meta_path`` so that they find none of those packages, as on a machine
without them, then imports the modules, builds
a tiny model, lets an agent act in both action modes and trains one SFT step and one DPO step on the CPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BLOCKED = ("ray", "textworld", "gymnasium", "trl", "datasets", "jericho", "vllm", "wandb")

CHILD = textwrap.dedent(
    """
    import importlib, json, random, sys, tempfile
    from pathlib import Path

    BLOCKED = set(sys.argv[1].split(","))
    probed = []

    class Hide:
        # a meta-path finder that finds nothing of the blocked packages, as if they were not installed

        def __init__(self, inner):
            self.inner = inner

        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                probed.append(name)
                return None
            return self.inner.find_spec(name, path, target)

        def __getattr__(self, name):  # invalidate_caches, find_distributions (importlib.metadata)
            return getattr(self.inner, name)

    sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
    try:  # the finders work: a blocked package cannot be imported
        import ray  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("ray was imported although it is hidden")
    probed.clear()

    MODULES = [
        "w2s_agents", "w2s_agents.trainers", "w2s_agents.trainers.sft", "w2s_agents.trainers.dpo",
        "w2s_agents.trainers.loop", "w2s_agents.trainers.export", "w2s_agents.trainers.checkpoint",
        "w2s_agents.trainers.reference", "w2s_agents.trainers.resume", "w2s_agents.trainers.model",
        "w2s_agents.agents", "w2s_agents.agents.agent", "w2s_agents.agents.models",
        "w2s_agents.agents.decoding", "w2s_agents.agents.prefix_cache", "w2s_agents.agents.prompts",
    ]
    for name in MODULES:
        importlib.import_module(name)

    import torch
    torch.set_num_threads(1)
    from w2s_agents.agents import Agent, AgentConfig, Sampler, create_tiny_model, load_model
    from w2s_agents.messages import SYSTEM_PROMPT, agent_message, episode_messages
    from w2s_agents.trainers import TrainConfig, train_dpo, train_sft
    from w2s_agents.types import EpisodeState

    turns = [("", "look", "You are in the kitchen. You see an apple."), ("", "take apple", None)]
    rows = [{"messages": episode_messages(f"Take the apple {i}.", "-= Kitchen =-", turns), "task_id": f"t{i}"}
            for i in range(4)]
    prompt = episode_messages("Take the apple.", "-= Kitchen =-", turns[:1])  # ends with the observation
    pairs = [{"prompt": prompt, "chosen": [agent_message("take apple")], "rejected": [agent_message(f"go {d}")],
              "task_id": f"t{i}"} for i, d in enumerate(["north", "south", "east", "west"])]
    texts = [SYSTEM_PROMPT, "Thought: look\\nAction: take apple", *(m["content"] for m in rows[0]["messages"])]
    with tempfile.TemporaryDirectory() as tmp:
        model = create_tiny_model(Path(tmp) / "m", texts, preset="nano", vocab_size=400)
        lm = load_model(model, device="cpu")
        state = EpisodeState("Take the apple.", "-= Kitchen =-", admissible=("look", "take apple", "go north"))
        acted = {}
        for mode in ("choose", "generate"):
            agent = Agent(lm, AgentConfig(mode=mode, max_new_tokens=4))
            decisions = agent.act([state, state], [Sampler(), Sampler(temperature=1.0)],
                                  [random.Random(0), random.Random(1)])
            acted[mode] = [d.mode for d in decisions]
        cfg = dict(max_steps=1, batch_size=2, device="cpu", valid_fraction=0.0, max_length=256)
        sft = train_sft(model, rows, Path(tmp) / "sft", TrainConfig(method="sft", **cfg))
        dpo = train_dpo(model, pairs, Path(tmp) / "dpo", TrainConfig(method="dpo", **cfg), reference_path=model)
        loaded = [m for m in sys.modules if m.partition(".")[0] in BLOCKED]
        print(json.dumps({"acted": acted, "steps": [sft.steps, dpo.steps], "loaded": loaded,
                          "probed": sorted(set(probed))}))
    """
)


@pytest.mark.slow
def test_package_trainers_and_agent_work_without_optional_heavy_packages(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script), ",".join(BLOCKED)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["acted"] == {"choose": ["choose", "choose"], "generate": ["generate", "generate"]}
    assert report["steps"] == [1, 1]
    # none of them was imported (libraries may look for them, as accelerate looks for wandb: report["probed"])
    assert report["loaded"] == [], report
