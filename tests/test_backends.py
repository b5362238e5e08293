"""The generation-backend seam of the agent, without vLLM: the agent on a backend of its own, the config of
``agent.backend``, the stage keys of runs that keep the default, the error where vLLM is missing, and the server
backend's errors against servers that cannot serve it.

The vLLM and server backends themselves are tested against a real engine and `vllm serve` in
tests/test_backend_vllm.py (``make test-vllm``)."""

from __future__ import annotations

import json
import random
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from w2s_agents.agents import (
    Agent,
    AgentConfig,
    GenerationBackend,
    Sampler,
    VLLMOptions,
    load_agent,
    load_model,
)
from w2s_agents.agents.backend import TransformersBackend
from w2s_agents.agents.config import ServerOptions
from w2s_agents.config import config_hash, config_to_dict, load_config
from w2s_agents.errors import ConfigError, W2SError
from w2s_agents.pipeline.cache import stage_keys
from w2s_agents.pipeline.experiment import load_experiment
from w2s_agents.pipeline.runner import build_stages
from w2s_agents.types import EpisodeState

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STATES = [
    EpisodeState("Find the key.", "-= Kitchen =- You see a key.", (), ("take key", "go east", "look")),
    EpisodeState(
        "Find the key.",
        "-= Kitchen =- You see a key.",
        (("", "go east", "-= Cellar =- It is dark."),),
        ("go west", "look", "open box with key"),
    ),
]


class Recording(GenerationBackend):
    """A backend of its own that runs the transformers backend and records what the agent hands it."""

    name = "recording"

    def __init__(self, inner: TransformersBackend) -> None:
        self.inner = inner
        self.path, self.tokenizer = inner.path, inner.tokenizer
        self.max_positions, self.stop_ids = inner.max_positions, inner.stop_ids
        self.calls: list[tuple[str, int]] = []

    def candidate_logprobs(self, prompts, candidates, *, amateur=False):
        self.calls.append(("score", len(prompts)))
        return self.inner.candidate_logprobs(prompts, candidates, amateur=amateur)

    def generate(self, prompts, samplers, rngs, *, max_new_tokens, stop=None):
        self.calls.append(("generate", len(prompts)))
        return self.inner.generate(prompts, samplers, rngs, max_new_tokens=max_new_tokens, stop=stop)


@pytest.mark.parametrize("mode", ["choose", "generate"])
def test_an_agent_on_another_backend_decides_as_on_the_transformers_backend(
    nano_model_dir: Path, mode
) -> None:
    cfg = AgentConfig(mode=mode, max_context_tokens=512, max_new_tokens=12)
    lm = load_model(nano_model_dir, device="cpu")
    plain = Agent(lm, cfg)
    backend = Recording(TransformersBackend(lm, cfg))
    other = Agent(backend, cfg)
    assert other.lm is None and other.model_path == nano_model_dir and other.name == "nano"
    samplers = [Sampler(), Sampler(temperature=1.0)]

    def decide(agent: Agent) -> list:
        return agent.act(STATES, samplers, [random.Random(k) for k in range(len(STATES))])

    want, got = decide(plain), decide(other)
    keep = ("action", "thought", "raw_output", "tokens_in", "tokens_out", "mode", "probability")
    assert [{k: getattr(d, k) for k in keep} for d in got] == [{k: getattr(d, k) for k in keep} for d in want]
    assert backend.calls == [("score" if mode == "choose" else "generate", len(STATES))]
    with pytest.raises(ValueError, match="takes its amateur from that backend"):
        Agent(backend, cfg, amateur=lm)


def test_the_default_backend_changes_no_config_hash_nor_stage_key() -> None:
    cfg = AgentConfig()
    assert not {"backend", "vllm", "server"} & set(config_to_dict(cfg))
    assert config_hash(AgentConfig(backend="transformers")) == config_hash(cfg)
    on = AgentConfig(backend="vllm", vllm=VLLMOptions(max_model_len=256))
    assert config_to_dict(on)["backend"] == "vllm" and config_to_dict(on)["vllm"] == config_to_dict(on.vllm)
    default = stage_keys(build_stages(load_experiment(None), 0))
    explicit = stage_keys(build_stages(load_experiment(None, ["agent.backend=transformers"]), 0))
    assert explicit == default
    vllm = stage_keys(build_stages(load_experiment(None, ["agent.backend=vllm"]), 0))
    changed = {name for name in default if vllm[name] != default[name]}
    # the stages that play the agent change (and those after them); the ones before the agent plays do not
    assert {"explore", "eval"} <= changed
    assert not changed & {"tasks", "held-out", "demos", "models", "weak-sft", "strong-sft"}


def test_bad_backend_settings_are_one_line_errors(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("backend: vllm\namateur_path: models/amateur\n")
    with pytest.raises(ConfigError, match="vllm cannot do contrastive decoding") as err:
        load_config(AgentConfig, path)
    assert str(path) in str(err.value) and "amateur_path" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"'vllm\.serve_adapters' is on but choose mode"):
        AgentConfig(backend="vllm", vllm=VLLMOptions(serve_adapters=True))
    AgentConfig(mode="generate", backend="vllm", vllm=VLLMOptions(serve_adapters=True))
    for key, value in [("gpu_memory_utilization", 0.0), ("max_engines", 0), ("kv_cache_space_gb", -1.0)]:
        with pytest.raises(ConfigError, match=f"'{key}' must"):
            VLLMOptions(**{key: value})
    with pytest.raises(
        ConfigError, match="'engine_args' sets dtype, max_model_len, which the agent sets itself"
    ):
        VLLMOptions(engine_args={"max_model_len": 8, "dtype": "half", "tensor_parallel_size": 2})
    with pytest.raises(ConfigError, match="expected one of 'transformers', 'vllm'"):
        load_config(AgentConfig, None, ["backend=sglang"])


def test_a_missing_vllm_is_a_one_line_error_naming_the_key_and_the_extra(
    nano_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # importing it raises ImportError
    with pytest.raises(W2SError, match=r"agent\.backend is 'vllm' but vLLM cannot be imported") as err:
        load_agent(str(nano_model_dir), AgentConfig(backend="vllm"))
    assert "pip install -e '.[vllm]'" in str(err.value) and "make vllm-env" in str(err.value)
    assert "\n" not in str(err.value)


class _Fake(BaseHTTPRequestHandler):
    """A server that lists ``models`` and answers completions with ``choice`` (what a server without vLLM's
    extensions answers)."""

    models: list[str] = []  # noqa: RUF012 - set per test
    choice: dict[str, Any] = {}  # noqa: RUF012

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._send(200, {"data": [{"id": m} for m in self.models]})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        if self.choice:
            self._send(200, {"choices": [self.choice]})
        else:
            self._send(400, {"error": {"message": "prompt must be a string\nnot a list"}})

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake_server() -> Any:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Fake)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_the_server_backend_says_what_a_server_lacks(
    nano_model_dir: Path, fake_server: str, monkeypatch
) -> None:
    def agent(mode: str, **server: Any) -> Agent:
        cfg = AgentConfig(mode=mode, backend="server", server=ServerOptions(url=fake_server, **server))
        return load_agent(str(nano_model_dir), cfg)

    def error(call: Any) -> str:
        with pytest.raises(W2SError) as err:
            call()
        assert "\n" not in str(err.value) and str(err.value).startswith("agent.server")
        return str(err.value)

    monkeypatch.setattr(_Fake, "models", ["a", "b"])
    assert "serves 2 models (a, b); name the one to use" in error(lambda: agent("generate"))
    gen, choose = agent("generate", model="a"), agent("choose", model="a")
    assert gen.backend.model == "a"
    monkeypatch.setattr(_Fake, "choice", {})  # a server that refuses token-id prompts
    assert "POST /v1/completions answered 400: prompt must be a string not a list" in error(
        lambda: gen.act(STATES[:1], [Sampler()], [random.Random(0)])
    )
    monkeypatch.setattr(_Fake, "choice", {"text": "look", "index": 0})  # no vLLM extensions
    assert "returned no token_ids" in error(lambda: gen.act(STATES[:1], [Sampler()], [random.Random(0)]))
    assert "returned no prompt_logprobs" in error(lambda: choose.score_actions(STATES[:1]))
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    gone = f"http://127.0.0.1:{port}"
    assert f"agent.server.url {gone}: cannot reach the server" in error(
        lambda: load_agent(str(nano_model_dir), AgentConfig(backend="server", server=ServerOptions(url=gone)))
    )
    with pytest.raises(ConfigError, match="'url' must start with http"):
        ServerOptions(url="localhost:8000")
