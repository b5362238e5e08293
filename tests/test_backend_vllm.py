"""The vLLM backend against the transformers backend, on a real vLLM engine (``make test-vllm`` runs these in the
second environment ``.venv-vllm``, where the CPU build of vLLM is installed; elsewhere they are skipped).

Both backends get the same token ids from the agent, so in greedy decoding they must give the same answers token
for token, and the choose mode's scores must agree up to float32 rounding. Two engines serve the whole module
(their start is most of its time): the base model, and the base model with LoRA enabled for the adapter (vLLM
computes no prompt log-probs on a LoRA engine, so the two cannot be one).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip(
    "vllm", reason="vLLM is not installed here; `make test-vllm` runs these tests in .venv-vllm"
)

from w2s_agents.agents import Agent, AgentConfig, Sampler, load_agent, load_model
from w2s_agents.agents.config import ServerOptions, VLLMOptions
from w2s_agents.agents.server_backend import ServerBackend
from w2s_agents.agents.vllm_backend import VLLMBackend, served_model, shutdown_engines
from w2s_agents.errors import ConfigError, ModelLoadError, W2SError
from w2s_agents.rollout import plan_episodes, run_episodes
from w2s_agents.types import EpisodeState

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

# the engine runs in a process of its own: one thread, no core binding, a small KV cache (2 shared cores here)
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

TOLERANCE = 1e-4
"""Choose-mode scores: both backends compute in float32, with different kernels (vLLM's CPU attention and
matmuls vs torch's), so a token's log-probability differs by rounding (~5e-7 seen on log-probabilities around
-6); a command's score sums at most a few dozen of them, well under 1e-4, while two commands that a greedy choice
tells apart differ by far more on these models."""

CONTEXT = 512
ENGINE = VLLMOptions(kv_cache_space_gb=0.25, enforce_eager=True, max_engines=2)


class Corridor:
    """Task ``corridor/N``: go east N times to win; ``jump`` loses."""

    env_id = "test/Corridor-v0"
    command_grammar = "go east, go west, look, jump, take key"

    def __init__(self) -> None:
        self.length = self.pos = 0

    def _info(self, won: bool = False, lost: bool = False) -> dict[str, Any]:
        return {
            "admissible_commands": ["go east", "go west", "look", "jump", "take key"],
            "won": won,
            "lost": lost,
            "score": self.pos / self.length,
        }

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[str, dict]:
        self.length = int(options["task"].split("/")[1])
        self.pos = 0
        obs = f"-= Hallway =- You are in room 0 of {self.length}. You see a key on the table."
        return obs, {**self._info(), "instruction": "Reach the last room."}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        before = self.pos
        self.pos += action == "go east"
        won, lost = self.pos >= self.length, action == "jump"
        obs = f"-= Room {self.pos} =- You are in room {self.pos} of {self.length}." if action else "Pardon?"
        return obs, (self.pos - before) / self.length, won or lost, False, self._info(won, lost)

    def close(self) -> None:
        pass


TASKS = [f"corridor/{n}" for n in range(2, 10)]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, game_texts: list[str]) -> dict[str, Path]:
    """A tiny ``weak`` model (head size 32, which vLLM's CPU attention takes), and an export of ``w2s train`` with
    LoRA on it: ``train/adapter`` (random adapter weights, so that it changes the answers) beside ``train/model``
    (the adapter merged), whose ``w2s_train.json`` names the base."""
    import torch
    from peft import LoraConfig, get_peft_model

    from w2s_agents.agents.models import create_tiny_model
    from w2s_agents.messages import SYSTEM_PROMPT

    root = tmp_path_factory.mktemp("vllm-models")
    texts = [
        *game_texts,
        SYSTEM_PROMPT,
        "Thought: I should look around.\nAction: look",
        "Admissible commands now:",
    ]
    base = create_tiny_model(root / "base", texts, preset="weak", vocab_size=512, seed=3)
    lm = load_model(base, device="cpu")
    peft = get_peft_model(
        lm.model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    peft.save_pretrained(root / "train" / "adapter")
    merged = peft.merge_and_unload()
    merged.save_pretrained(root / "train" / "model")
    lm.tokenizer.save_pretrained(root / "train" / "model")
    meta = {"method": "sft", "trained_from": str(base.resolve())}
    (root / "train" / "model" / "w2s_train.json").write_text(json.dumps(meta), encoding="utf-8")
    return {"base": base, "adapter": root / "train" / "adapter", "merged": root / "train" / "model"}


def _config(mode: str, backend: str = "transformers", *, adapters: bool = False) -> AgentConfig:
    opts = replace(ENGINE, serve_adapters=adapters)
    return AgentConfig(mode=mode, max_context_tokens=CONTEXT, max_new_tokens=24, backend=backend, vllm=opts)


@pytest.fixture(scope="module")
def engines(models: dict[str, Path]) -> Any:
    """The module's two engines: the base model's, and the adapter's (its base with LoRA on)."""
    base = VLLMBackend(models["base"], _config("generate", "vllm"))
    lora = VLLMBackend(models["merged"], _config("generate", "vllm", adapters=True))
    assert lora.engine is not base.engine
    yield {"base": base, "lora": lora}
    shutdown_engines()


def _agents(models: dict[str, Path], engines: Any, mode: str, which: str) -> tuple[Agent, Agent]:
    """(transformers agent, vLLM agent) of ``which`` model in ``mode``; the adapter's transformers agent runs the
    merged weights."""
    folder = models["base"] if which == "base" else models["merged"]
    hf = Agent(load_model(folder, device="cpu"), _config(mode))
    return hf, Agent(engines[which], _config(mode, "vllm", adapters=which == "lora" and mode == "generate"))


def _episodes(agent: Agent, samplers: list[Sampler], seeds: int = 1) -> list[Any]:
    eps = plan_episodes(TASKS, samplers, list(range(seeds)))
    return sorted(run_episodes(agent, Corridor, eps, batch_size=16, max_steps=4), key=lambda t: t.key)


def _course(traj: Any) -> list[tuple[str, str, int, int]]:
    return [(s.action, s.thought, s.tokens_in, s.tokens_out) for s in traj.steps]


def _states(trajs: list[Any]) -> list[EpisodeState]:
    """Every state the episodes acted in, step by step (prompts that extend earlier ones)."""
    return [EpisodeState.from_trajectory(t, k) for t in trajs for k in range(len(t.steps))]


def test_served_model_finds_the_adapter_and_its_base(models: dict[str, Path], tmp_path: Path) -> None:
    assert served_model(models["merged"]) == (models["base"].resolve(), models["adapter"])
    assert served_model(models["base"]) == (models["base"], None)
    # an export whose base folder is gone is served merged
    gone = tmp_path / "train"
    (gone / "adapter").mkdir(parents=True)
    (gone / "adapter" / "adapter_config.json").write_text("{}")
    (gone / "model").mkdir()
    (gone / "model" / "w2s_train.json").write_text(json.dumps({"trained_from": str(tmp_path / "nowhere")}))
    assert served_model(gone / "model") == (gone / "model", None)


def test_generate_mode_greedy_episodes_are_the_same_on_both_backends(models, engines) -> None:
    hf, vl = _agents(models, engines, "generate", "base")
    want, got = _episodes(hf, [Sampler()]), _episodes(vl, [Sampler()])
    assert len(want) == len(got) == len(TASKS)
    assert [t.key for t in got] == [t.key for t in want]
    assert [_course(t) for t in got] == [_course(t) for t in want]
    assert sum(s.tokens_out for t in got for s in t.steps) > len(TASKS)  # real answers, not empty ones
    # the answers themselves, token for token, for 16 states at once
    states = _states(want)[:16]
    rngs = [random.Random(0) for _ in states]
    a = hf.act(states, [Sampler()] * len(states), rngs)
    b = vl.act(states, [Sampler()] * len(states), rngs)
    assert [(d.raw_output, d.tokens_out, d.parse_ok) for d in b] == [
        (d.raw_output, d.tokens_out, d.parse_ok) for d in a
    ]
    assert all(r.random() == random.Random(0).random() for r in rngs)  # greedy rows draw nothing


def test_choose_mode_scores_agree_and_greedy_episodes_are_the_same(models, engines) -> None:
    hf, vl = _agents(models, engines, "choose", "base")
    want, got = _episodes(hf, [Sampler()]), _episodes(vl, [Sampler()])
    assert [_course(t) for t in got] == [_course(t) for t in want]
    states = _states(want)
    base = engines["base"]
    reused_before = base.reused_tokens
    a, b = hf.score_actions(states), vl.score_actions(states)
    assert len(a) == len(b) == len(states)
    for x, y in zip(a, b, strict=True):
        assert y == pytest.approx(x, abs=TOLERANCE, rel=0)
    # the engine's prefix cache served part of the prompts (the earlier steps of each episode)
    assert base.reused_tokens > reused_before
    # and scoring without it gives the same numbers
    base.read_prefix_cache = False
    try:
        fed_before = base.fed_tokens
        for x, y in zip(a, vl.score_actions(states), strict=True):
            assert y == pytest.approx(x, abs=TOLERANCE, rel=0)
        assert base.fed_tokens - fed_before == sum(
            len(p) + len(c) for p, cs in _scored(vl, states) for c in cs
        )
    finally:
        base.read_prefix_cache = True


def test_sampled_episodes_are_reproducible_on_the_vllm_backend(models, engines) -> None:
    _, vl = _agents(models, engines, "generate", "base")
    samplers = [Sampler(temperature=1.0), Sampler(temperature=0.7, top_p=0.9)]
    one, two = _episodes(vl, samplers, seeds=2), _episodes(vl, samplers, seeds=2)
    assert [_course(t) for t in one] == [_course(t) for t in two]
    # seeds draw their own answers
    by_seed = {s: [_course(t) for t in one if t.source.seed == s] for s in (0, 1)}
    assert by_seed[0] != by_seed[1]


def _scored(agent: Agent, states: list[EpisodeState]) -> list[tuple[list[int], list[list[int]]]]:
    """The prompt and candidate ids choose mode scores for every state."""
    out = []
    for s in states:
        cands = [agent.completion_ids(c) for c in dict.fromkeys(s.admissible)]
        out.append((agent.prompts.build(s, agent.max_context - max(len(c) for c in cands)).ids, cands))
    return out


def test_a_lora_adapter_served_unmerged_acts_as_its_merged_weights(models, engines) -> None:
    lora = engines["lora"]
    assert lora.adapter == models["adapter"] and lora.engine is not engines["base"].engine
    hf, vl = _agents(models, engines, "generate", "lora")
    want, got = _episodes(hf, [Sampler()]), _episodes(vl, [Sampler()])
    assert [_course(t) for t in got] == [_course(t) for t in want]
    # the adapter changes the answers: the base model's episodes differ
    _, base = _agents(models, engines, "generate", "base")
    assert [_course(t) for t in _episodes(base, [Sampler()])] != [_course(t) for t in got]
    # choose-mode scores need prompt log-probs, which vLLM does not compute on a LoRA engine: a clear error
    with pytest.raises(W2SError, match="set serve_adapters: false") as err:
        vl.score_actions(_states(want)[:2])
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"'vllm\.serve_adapters' is on but choose mode"):
        _config("choose", "vllm", adapters=True)


def test_recorded_tokens_are_the_same_on_both_backends(models, engines) -> None:
    """agent.record_tokens: the same greedy answers give the same token ids, and the model's log-probs of them
    agree within float tolerance, in both modes."""
    states = _states(_episodes(_agents(models, engines, "choose", "base")[0], [Sampler()]))[:8]
    for mode in ("generate", "choose"):
        hf = Agent(load_model(models["base"], device="cpu"), replace(_config(mode), record_tokens=True))
        vl = Agent(engines["base"], replace(_config(mode, "vllm"), record_tokens=True))
        a = hf.act(states, [Sampler()] * len(states), [random.Random(0) for _ in states])
        b = vl.act(states, [Sampler()] * len(states), [random.Random(0) for _ in states])
        assert [d.token_ids for d in b] == [d.token_ids for d in a]
        assert all(d.token_ids and d.tokenizer == a[0].tokenizer for d in a + b)
        for x, y in zip(a, b, strict=True):
            assert y.logprobs == pytest.approx(x.logprobs, abs=TOLERANCE, rel=0)


def test_load_agent_builds_the_configured_backend(models, engines) -> None:
    agent = load_agent(str(models["base"]), _config("choose", "vllm"))
    assert agent.backend.name == "vllm" and agent.lm is None and agent.model_path == models["base"]
    assert agent.backend.engine is engines["base"].engine
    assert "backend='vllm'" in repr(agent)


def test_bad_settings_fail_with_one_line_errors(models, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="is not a local directory") as err:
        VLLMBackend(tmp_path / "missing", _config("choose", "vllm"))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="'backend' vllm cannot do contrastive decoding") as err:
        AgentConfig(backend="vllm", amateur_path=str(models["base"]))
    assert "\n" not in str(err.value) and "amateur_path" in str(err.value)
    # an engine that cannot start: a context longer than the model's positions
    cfg = AgentConfig(
        backend="vllm", vllm=VLLMOptions(max_model_len=10**6, kv_cache_space_gb=0.25, max_engines=2)
    )
    with pytest.raises(ModelLoadError, match="the vLLM engine cannot start") as err:
        VLLMBackend(models["base"], cfg)
    assert "\n" not in str(err.value)


def test_the_agent_imports_vllm_only_when_the_backend_is_built(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys, w2s_agents, w2s_agents.agents, w2s_agents.agents.vllm_backend, w2s_agents.rollout\n"
        "from w2s_agents.agents import AgentConfig\n"
        "AgentConfig(backend='vllm')\n"
        "assert 'vllm' not in sys.modules, 'vllm imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr


# ------------------------------------------------------------------ the server backend against `vllm serve`


@pytest.fixture(scope="module")
def server(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """vLLM's OpenAI-compatible server on the base model (what `vllm serve` runs), on a free local port; stopped
    (its whole process group) afterwards."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    args = ["--model", str(models["base"]), "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
            "--dtype", "float32", "--max-model-len", str(CONTEXT), "--enforce-eager", "--uvicorn-log-level", "warning"]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", *args], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                tail = log.read_text()[-2000:]
                assert proc.poll() is None, f"the server exited: {tail}"
                assert time.monotonic() < deadline, f"the server did not start in 300 s: {tail}"
                time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _server_agent(models: dict[str, Path], url: str, mode: str) -> Agent:
    cfg = AgentConfig(mode=mode, max_context_tokens=CONTEXT, max_new_tokens=24, backend="server",
                      server=ServerOptions(url=url, max_concurrency=16))  # fmt: skip
    return load_agent(str(models["base"]), cfg)


def test_the_server_backend_acts_as_the_transformers_backend(models, engines, server) -> None:
    agent = _server_agent(models, server, "generate")
    assert (
        isinstance(agent.backend, ServerBackend) and agent.backend.model == "tiny"
    )  # the only model it lists
    hf, _ = _agents(models, engines, "generate", "base")
    want, got = _episodes(hf, [Sampler()]), _episodes(agent, [Sampler()])
    assert [_course(t) for t in got] == [_course(t) for t in want]
    samplers = [Sampler(temperature=1.0)]
    assert [_course(t) for t in _episodes(agent, samplers)] == [
        _course(t) for t in _episodes(agent, samplers)
    ]
    chooser = _server_agent(models, server, "choose")
    hf_c, _ = _agents(models, engines, "choose", "base")
    want = _episodes(hf_c, [Sampler()])
    assert [_course(t) for t in _episodes(chooser, [Sampler()])] == [_course(t) for t in want]
    states = _states(want)[:24]
    for x, y in zip(hf_c.score_actions(states), chooser.score_actions(states), strict=True):
        assert y == pytest.approx(x, abs=TOLERANCE, rel=0)
    # a model the server does not serve: the server's own message, on one line
    other = load_agent(
        str(models["base"]), replace(chooser.config, server=ServerOptions(url=server, model="other"))
    )
    with pytest.raises(
        W2SError, match=r"agent\.server\.url .*: POST /v1/completions answered 4\d\d: .*other"
    ) as err:
        other.score_actions(states[:1])
    assert "\n" not in str(err.value)
