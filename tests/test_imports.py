"""Import hygiene: the package, the trainers, the agent and the model builder import and run without ray,
textworld, gymnasium, trl, datasets or jericho (a GPU machine may have none of them).

A child process puts a finder on ``sys.meta_path`` that refuses those packages, then imports the modules, builds
a tiny model, lets an agent act in both action modes and trains one SFT step and one DPO step on the CPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BLOCKED = ("ray", "textworld", "gymnasium", "trl", "datasets", "jericho")

CHILD = textwrap.dedent(
    """
    import importlib, json, random, sys, tempfile
    from pathlib import Path

    BLOCKED = set(sys.argv[1].split(","))
    refused = []

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                refused.append(name)
                raise ModuleNotFoundError(f"{name} is refused by the import-hygiene test", name=name)
            return None

    sys.meta_path.insert(0, Refuse())
    try:  # the finder works: a refused package cannot be imported
        import ray  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("the finder let ray through")
    refused.clear()

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
                          "refused": sorted(set(refused))}))
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
    assert report["loaded"] == []
    # nothing even tried to import them (a guarded import that falls back would still be listed here)
    assert report["refused"] == [], report["refused"]
