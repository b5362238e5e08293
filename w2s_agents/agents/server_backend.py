"""The server backend (``agent.backend: server``): an agent's model behind an OpenAI-compatible HTTP server running
elsewhere (``vllm serve MODEL``), so that exploration can use an engine on another machine.

The agent tokenizes with the model folder it is given (its tokenizer, chat template and config; the weights are
not loaded) and sends token ids to the server's ``/v1/completions`` (a prompt may be a list of token ids):

* generate mode: one request per episode with its sampler's ``temperature`` and ``top_p``, a ``seed`` drawn from
  the episode's stream when it samples, the stop tokens as ``stop_token_ids``, and ``return_token_ids`` so that
  the answer comes back as the exact ids the model produced; the agent's own stop rule cuts it afterwards;
* choose mode: one request per (state, candidate) with ``prompt_logprobs: 0`` and ``max_tokens: 1``; a command's
  score is the sum of its tokens' log-probabilities.

``return_token_ids``, ``stop_token_ids`` and ``prompt_logprobs`` are vLLM's extensions of the OpenAI API: a server
without them fails with a one-line error saying what is missing. Requests run concurrently (at most
``agent.server.max_concurrency``); the server batches them. Only the standard library is used (``urllib``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from w2s_agents.agents.backend import GenerationBackend, StopCheck, cut_answer, local_model_files
from w2s_agents.errors import W2SError

if TYPE_CHECKING:
    from w2s_agents.agents.config import AgentConfig
    from w2s_agents.agents.decoding import CandidateLogprobs
    from w2s_agents.agents.sampling import Sampler

__all__ = ["ServerBackend"]

logger = logging.getLogger(__name__)


class ServerBackend(GenerationBackend):
    """An agent's model behind an OpenAI-compatible server (see the module docstring).

    Args:
        model_path: a local folder with the served model's tokenizer and config (its weights are not read).
        config: the agent's settings (``config.server`` for the server).

    Raises:
        ModelLoadError: the folder is not a model folder.
        W2SError: the server cannot be reached, or serves no model of the configured name.
    """

    name = "server"

    def __init__(self, model_path: str | Path, config: AgentConfig) -> None:
        self.path, self.tokenizer, self.stop_ids, positions = local_model_files(
            model_path, why="the server backend tokenizes with a local copy of the served model's folder"
        )
        self.config = config
        opts = config.server
        self.url = opts.url.rstrip("/")
        self.max_positions = min(config.max_context_tokens, positions or config.max_context_tokens)
        key = os.environ.get(opts.api_key_env, "")
        self._headers = {
            "Content-Type": "application/json",
            **({"Authorization": f"Bearer {key}"} if key else {}),
        }
        self.model = opts.model or self._only_model()

    # -- HTTP ---------------------------------------------------------------------------------------------

    def _call(self, method: str, route: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One request to the server; its JSON answer.

        Raises:
            W2SError: the server cannot be reached, answers with an error, or not with JSON.
        """
        data = json.dumps(body).encode("utf-8") if body is not None else None
        request = urllib.request.Request(self.url + route, data=data, headers=self._headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.config.server.timeout_s) as response:
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")
            with contextlib.suppress(ValueError, AttributeError):  # vLLM's error body: {"error": {"message"}}
                detail = json.loads(detail).get("error", {}).get("message", detail)
            raise W2SError(
                f"agent.server.url {self.url}: {method} {route} answered {exc.code}: {_one_line(detail)}"
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise W2SError(
                f"agent.server.url {self.url}: cannot reach the server ({_one_line(reason)})"
            ) from None
        except ValueError as exc:
            raise W2SError(
                f"agent.server.url {self.url}: {route} did not answer JSON ({_one_line(exc)})"
            ) from None

    def _only_model(self) -> str:
        listed = [m.get("id") for m in self._call("GET", "/v1/models").get("data", [])]
        if len(listed) != 1:
            raise W2SError(
                f"agent.server.model: the server at {self.url} serves {len(listed)} models ({', '.join(map(str, listed))}); "
                "name the one to use"
            )
        return str(listed[0])

    def _complete(self, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The first choice of every completion request, sent concurrently."""
        if not bodies:
            return []
        workers = min(len(bodies), self.config.server.max_concurrency)

        def one(body: dict[str, Any]) -> dict[str, Any]:
            choices = (
                self._call("POST", "/v1/completions", {"model": self.model, **body}).get("choices") or []
            )
            if not choices:
                raise W2SError(f"agent.server.url {self.url}: a completion came back without choices")
            return choices[0]

        if workers == 1:
            return [one(b) for b in bodies]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(one, bodies))

    # -- the two calls ------------------------------------------------------------------------------------

    def candidate_logprobs(
        self,
        prompts: Sequence[list[int]],
        candidates: Sequence[Sequence[list[int]]],
        *,
        amateur: bool = False,
    ) -> list[list[CandidateLogprobs]]:
        """See :meth:`GenerationBackend.candidate_logprobs` (no amateur on this backend; ``best`` is NaN)."""
        import torch

        from w2s_agents.agents.decoding import CandidateLogprobs

        if amateur:
            raise ValueError("the server backend has no amateur model")
        if len(prompts) != len(candidates):
            raise ValueError(f"{len(prompts)} prompts but {len(candidates)} candidate lists")
        rows = [(i, j) for i, cands in enumerate(candidates) for j in range(len(cands))]
        if any(len(candidates[i][j]) == 0 for i, j in rows):
            raise ValueError("cannot score an empty candidate")
        bodies = [
            {
                "prompt": list(prompts[i]) + list(candidates[i][j]),
                "max_tokens": 1,
                "temperature": 0.0,
                "prompt_logprobs": 0,
                "add_special_tokens": False,
            }
            for i, j in rows
        ]
        result: list[list[Any]] = [[None] * len(c) for c in candidates]
        for (i, j), choice in zip(rows, self._complete(bodies), strict=True):
            found = choice.get("prompt_logprobs")
            if not found:
                raise W2SError(
                    f"agent.server.url {self.url}: the server returned no prompt_logprobs (a vLLM extension that "
                    "choose mode needs)"
                )
            cand, start = candidates[i][j], len(prompts[i])
            token = [float(found[start + k][str(t)]["logprob"]) for k, t in enumerate(cand)]
            result[i][j] = CandidateLogprobs(
                torch.tensor(token, dtype=torch.float32), torch.full((len(cand),), math.nan)
            )
        return result

    def generate(
        self,
        prompts: Sequence[list[int]],
        samplers: Sequence[Sampler],
        rngs: Sequence[random.Random],
        *,
        max_new_tokens: int,
        stop: StopCheck | None = None,
    ) -> list[list[int]]:
        """See :meth:`GenerationBackend.generate`; a sampled row draws one seed from its stream per answer."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not (len(prompts) == len(samplers) == len(rngs)):
            raise ValueError("generate needs one sampler and one random stream per prompt")
        stops = sorted(self.stop_ids)
        bodies = []
        for prompt, sampler, rng in zip(prompts, samplers, rngs, strict=True):
            body: dict[str, Any] = {
                "prompt": list(prompt),
                "max_tokens": max_new_tokens,
                "temperature": sampler.temperature,
                "top_p": sampler.top_p,
                "stop_token_ids": stops,
                "skip_special_tokens": False,
                "add_special_tokens": False,
                "return_token_ids": True,
            }
            if not sampler.greedy:
                body["seed"] = rng.randrange(2**31)
            bodies.append(body)
        out = []
        for row, choice in enumerate(self._complete(bodies)):
            ids = choice.get("token_ids")
            if ids is None:
                raise W2SError(
                    f"agent.server.url {self.url}: the server returned no token_ids (return_token_ids, a vLLM "
                    "extension that generate mode needs)"
                )
            out.append(cut_answer(ids, self.stop_ids, stop, row))
        return out


def _one_line(value: Any) -> str:
    text = " ".join(str(value).split())
    return text or type(value).__name__
