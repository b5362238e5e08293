"""LLM agents for text environments: prompts, the two action modes, samplers and contrastive decoding.

An :class:`Agent` wraps a causal LM loaded by :func:`w2s_agents.agents.models.load_model` and decides the next action of
many live episodes at once (:meth:`Agent.act`), one batched model call per step:

* ``choose`` mode scores every admissible command by its log-likelihood as the agent's answer (the assistant turn
  ``"<command><end of turn>"``); all candidates of a state are packed behind one copy of its prompt, so one
  forward pass (of at most ``score_batch_size`` rows) scores many states and their candidates. The action is the
  argmax (temperature 0) or a sample of ``softmax(score / T)`` cut to its top-p nucleus. A state without
  admissible commands is decided by generation.
* ``generate`` mode decodes a ReAct answer ``Thought: ...\\nAction: ...`` with a KV cache for all episodes
  together and parses it with :func:`parse_react`; an output without an action is recorded as unparseable and the
  env receives an empty command, which it answers with its own invalid-command message.

Prompts are the conversations of :mod:`w2s_agents.messages` (the format trainers render), with the system
instruction of :func:`w2s_agents.messages.system_prompt` (command grammar and admissible commands, as configured),
fitted to ``max_context_tokens`` by dropping the oldest action/observation turns, never the task turn's
instruction nor the current observation (see :class:`PromptBuilder`).

Contrastive decoding (DESIGN section 6) is an option of both modes: with an amateur model (same tokenizer), a
token's score is ``(1 + lambda) * log p_A - lambda * log p_B`` where the expert ``p_A`` finds it plausible
(``p_A >= alpha * max p_A``), minus infinity elsewhere; a candidate's score is the sum over its tokens.

Every episode samples from its own random stream (a ``random.Random`` seeded per episode), so a decision depends
only on its own state and stream, not on which other episodes share the batch.

The model runs in a :class:`~w2s_agents.agents.backend.GenerationBackend` (``agent.backend``): in this process
through transformers (the default, all of the above), or in a vLLM engine
(:mod:`w2s_agents.agents.vllm_backend`). The agent's prompts, candidate tokens, parsing and choices are the same
on every backend.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from w2s_agents.errors import ModelLoadError, W2SError
from w2s_agents.messages import agent_message
from w2s_agents.types import EpisodeState

if TYPE_CHECKING:
    import torch

    from w2s_agents.agents.decoding import CandidateLogprobs
    from w2s_agents.agents.models import LoadedModel

from w2s_agents.agents.backend import GenerationBackend, TransformersBackend
from w2s_agents.agents.config import AgentConfig, Mode
from w2s_agents.agents.parsing import action_line_complete, parse_react
from w2s_agents.agents.prompts import PromptBuilder, answer_affixes
from w2s_agents.agents.sampling import Sampler, pick, softmax

__all__ = ["Agent", "Decision", "action_distribution", "load_agent", "make_backend", "score_actions"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    """The agent's answer for one episode at one step."""

    action: str
    """The command to send to the env ("" when the answer could not be parsed)."""
    thought: str
    """Reasoning before the action (generate mode), "" when none."""
    raw_output: str
    """The generated text (generate mode) or the chosen command (choose mode)."""
    parse_ok: bool
    """False when a generated answer held no usable action."""
    tokens_in: int
    """Prompt tokens."""
    tokens_out: int
    """Generated tokens (generate mode) or candidate tokens scored (choose mode)."""
    latency_s: float
    """Wall time of the batched model call that made this decision (shared by the batch)."""
    mode: Mode
    """How it was decided (a choose-mode agent generates where no admissible commands are known)."""
    parse_error: str = ""
    """Why the answer could not be parsed."""
    probability: float | None = None
    """Choose mode: probability of the chosen command under the sampler's distribution."""
    turns_dropped: int = 0
    """Oldest turns left out of the prompt to fit the context length."""
    token_ids: tuple[int, ...] | None = None
    """With ``record_tokens``: the answer's token ids (generate mode: as sampled; choose mode: the chosen
    command's as scored), else None."""
    logprobs: tuple[float, ...] | None = None
    """With ``record_tokens``: the model's log-probability of each of ``token_ids``."""
    tokenizer: str | None = None
    """With ``record_tokens``: the fingerprint of the tokenizer of ``token_ids``
    (:func:`w2s_agents.tokens.tokenizer_fingerprint`)."""


def make_backend(
    model_path: str | Path, config: AgentConfig, *, device: str = "auto", dtype: str = "auto"
) -> GenerationBackend:
    """The backend ``config.backend`` names, on the model folder ``model_path`` (for the server backend, a local
    copy of the served model's folder: its tokenizer and config).

    Raises:
        ModelLoadError: the model (or the amateur) cannot be loaded.
        W2SError: the backend's package is not installed (naming ``agent.backend`` and what to install), or its
            server cannot be reached.
    """
    if config.backend == "vllm":
        from w2s_agents.agents.vllm_backend import VLLMBackend

        return VLLMBackend(model_path, config, dtype=dtype)
    if config.backend == "server":
        from w2s_agents.agents.server_backend import ServerBackend

        return ServerBackend(model_path, config)
    from w2s_agents.agents.models import load_model

    return TransformersBackend(load_model(model_path, device=device, dtype=dtype), config)


def load_agent(
    model_path: str,
    config: AgentConfig | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
) -> Agent:
    """Load the model at ``model_path`` on the backend ``config.backend`` names (and the amateur of contrastive
    decoding) and build an :class:`Agent`.

    Raises:
        ModelLoadError: a model folder cannot be loaded.
        ConfigError: the amateur's tokenizer differs from the model's.
        W2SError: the backend's package is not installed.
    """
    config = config or AgentConfig()
    return Agent(make_backend(model_path, config, device=device, dtype=dtype), config)


class Agent:
    """An LLM agent over a model (see the module docstring).

    Args:
        lm: the model, from :func:`w2s_agents.agents.models.load_model` (run in this process by a
            :class:`~w2s_agents.agents.backend.TransformersBackend`), or a backend already built.
        config: agent settings.
        amateur: the amateur model of contrastive decoding (transformers backend); loaded from
            ``config.amateur_path`` (same device and dtype as ``lm``) when not given.

    Raises:
        ConfigError: the amateur's tokenizer differs from the model's.
        ModelLoadError: the amateur cannot be loaded.
    """

    def __init__(
        self,
        lm: LoadedModel | GenerationBackend,
        config: AgentConfig | None = None,
        *,
        amateur: LoadedModel | None = None,
    ):
        self.config = config or AgentConfig()
        tok = lm.tokenizer
        if tok.pad_token_id is None:
            raise ModelLoadError(f"{lm.path}: the tokenizer has no pad token")
        if isinstance(lm, GenerationBackend):
            if amateur is not None:
                raise ValueError("an agent on a backend already built takes its amateur from that backend")
            self.backend = lm
        else:
            self.backend = TransformersBackend(lm, self.config, amateur=amateur)
        self.lm: LoadedModel | None = getattr(self.backend, "lm", None)
        """The loaded model on the transformers backend (None on an engine)."""
        self.name = self.config.name or self.backend.path.name
        self.pad_id = int(tok.pad_token_id)
        self.stop_ids = self.backend.stop_ids
        positions = self.backend.max_positions
        self.max_context = min(self.config.max_context_tokens, positions or self.config.max_context_tokens)
        self.prompts = PromptBuilder(tok, self.config)
        self._answer_affixes = answer_affixes(tok)
        self._completion_cache: dict[str, list[int]] = {}
        self._fingerprint: str | None = None

    @property
    def tokenizer_fingerprint(self) -> str:
        """The fingerprint of the model's tokenizer recorded with token ids (computed once)."""
        if self._fingerprint is None:
            from w2s_agents.tokens import tokenizer_fingerprint

            self._fingerprint = tokenizer_fingerprint(self.tokenizer)
        return self._fingerprint

    @property
    def tokenizer(self) -> Any:
        """The tokenizer prompts and commands are tokenized with."""
        return self.backend.tokenizer

    @property
    def model_path(self) -> Path:
        """The model folder."""
        return self.backend.path

    @property
    def amateur(self) -> LoadedModel | None:
        """The amateur model of contrastive decoding (transformers backend), or None."""
        return getattr(self.backend, "amateur", None)

    @property
    def prefix_cache(self) -> Any:
        """The :class:`~w2s_agents.agents.prefix_cache.PrefixCache` of the model's recent prompts (transformers
        backend), or None when off."""
        return self.backend.prefix_cache

    def close(self) -> None:
        """Release the backend's engine (nothing to release on the transformers backend)."""
        self.backend.close()

    def __repr__(self) -> str:
        amateur = f", amateur={self.amateur.path.name!r}" if self.amateur is not None else ""
        backend = f", backend={self.backend.name!r}" if self.backend.name != "transformers" else ""
        return f"Agent({self.name!r}, mode={self.config.mode!r}{amateur}{backend})"

    # -- token helpers ----------------------------------------------------------------------------------

    def completion_ids(self, action: str) -> list[int]:
        """Token ids of the agent's answer ``action`` as the chat template writes it, through the end-of-turn
        token (what choose mode scores)."""
        ids = self._completion_cache.get(action)
        if ids is None:
            before, after = self._answer_affixes
            text = before + agent_message(action)["content"] + after
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            for i, t in enumerate(ids):
                if t in self.stop_ids:
                    ids = ids[: i + 1]
                    break
            if len(self._completion_cache) > 100_000:
                self._completion_cache.clear()
            self._completion_cache[action] = ids
        return ids

    # -- scoring ----------------------------------------------------------------------------------------

    def _candidate_scores(
        self, prompts: Sequence[list[int]], candidates: Sequence[Sequence[list[int]]]
    ) -> list[np.ndarray]:
        """Score of every candidate (sum or mean of its token scores; contrastive when configured)."""
        return self._scores_and_logprobs(prompts, candidates)[0]

    def _scores_and_logprobs(
        self, prompts: Sequence[list[int]], candidates: Sequence[Sequence[list[int]]]
    ) -> tuple[list[np.ndarray], list[list[CandidateLogprobs]]]:
        """The candidates' scores and the model's per-token log-probabilities they came from."""
        from w2s_agents.agents.decoding import contrastive_token_scores

        cfg = self.config
        expert = self.backend.candidate_logprobs(prompts, candidates)
        amateur = (
            self.backend.candidate_logprobs(prompts, candidates, amateur=True)
            if self.backend.has_amateur
            else None
        )
        out: list[np.ndarray] = []
        for e, cands in enumerate(expert):
            plain = np.array([_reduce(c.token, cfg.length_normalize) for c in cands], dtype=np.float64)
            if amateur is None:
                out.append(plain)
                continue
            contrast = np.array(
                [
                    _reduce(
                        contrastive_token_scores(
                            c.token,
                            c.best,
                            amateur[e][j].token,
                            lam=cfg.contrastive_lambda,
                            alpha=cfg.contrastive_alpha,
                        ),
                        cfg.length_normalize,
                    )
                    for j, c in enumerate(cands)
                ],
                dtype=np.float64,
            )
            if not np.isfinite(contrast).any():
                # every candidate has a token the expert finds implausible: fall back to the expert alone
                logger.debug("contrastive scores all -inf; using the expert's log-likelihoods")
                out.append(plain)
            else:
                out.append(contrast)
        return out, expert

    def score_actions(
        self, states: Sequence[EpisodeState], candidates: Sequence[Sequence[str]] | None = None
    ) -> list[np.ndarray]:
        """Choose-mode score of every candidate command of every state (default: its admissible commands).

        A score is the sum (or, with ``length_normalize``, the mean) of the answer's token log-probabilities,
        contrastive when an amateur is configured. Prompts are fitted to the context as in :meth:`act`.

        Raises:
            W2SError: a state has no candidates (no admissible commands and none given).
        """
        cands = self._candidates(states, candidates)
        cand_ids = [[self.completion_ids(c) for c in cs] for cs in cands]
        prompts = [
            self.prompts.build(s, self._choose_budget(ids)).ids
            for s, ids in zip(states, cand_ids, strict=True)
        ]
        return self._candidate_scores(prompts, cand_ids)

    def action_distributions(
        self,
        states: Sequence[EpisodeState],
        *,
        temperature: float = 1.0,
        candidates: Sequence[Sequence[str]] | None = None,
    ) -> list[dict[str, float]]:
        """The choose-mode policy over each state's commands: ``softmax(score / temperature)`` (no top-p cut);
        temperature 0 puts all mass on the argmax. Commands map to probabilities in candidate order.

        Raises:
            W2SError: a state has no admissible commands and no candidates are given.
        """
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
        cands = self._candidates(states, candidates)
        scores = self.score_actions(states, cands)
        out = []
        for cs, sc in zip(cands, scores, strict=True):
            probs = softmax(sc, temperature)
            out.append({c: float(p) for c, p in zip(cs, probs, strict=True)})
        return out

    def _candidates(
        self, states: Sequence[EpisodeState], candidates: Sequence[Sequence[str]] | None
    ) -> list[list[str]]:
        if candidates is not None:
            if len(candidates) != len(states):
                raise ValueError(f"{len(states)} states but {len(candidates)} candidate lists")
            out = [list(dict.fromkeys(c)) for c in candidates]
        else:
            out = [list(dict.fromkeys(s.admissible or ())) for s in states]
        for i, c in enumerate(out):
            if not c:
                raise W2SError(f"state {i} has no admissible commands to score")
        return out

    def _choose_budget(self, cand_ids: Sequence[list[int]]) -> int:
        longest = max(len(c) for c in cand_ids)
        budget = self.max_context - longest
        if budget < 8:
            raise W2SError(
                f"an admissible command of {longest} tokens leaves no room for the prompt in "
                f"{self.max_context} tokens of context"
            )
        return budget

    # -- acting -----------------------------------------------------------------------------------------

    def act(
        self,
        states: Sequence[EpisodeState],
        samplers: Sequence[Sampler],
        rngs: Sequence[random.Random],
    ) -> list[Decision]:
        """Decide the next action of every episode with one batched model call per mode.

        Args:
            states: the live episodes.
            samplers: the sampling setting of each episode.
            rngs: each episode's own random stream (drawn from only when its sampler samples).

        Returns:
            One :class:`Decision` per state, in order.
        """
        if not (len(states) == len(samplers) == len(rngs)):
            raise ValueError("act needs one sampler and one random stream per state")
        decisions: list[Decision | None] = [None] * len(states)
        choose = [i for i, s in enumerate(states) if self.config.mode == "choose" and s.admissible]
        chosen = set(choose)
        generate = [i for i in range(len(states)) if i not in chosen]  # incl. states without known commands
        for rows, decide in ((choose, self._act_choose), (generate, self._act_generate)):
            if rows:
                batch = decide(
                    [states[i] for i in rows], [samplers[i] for i in rows], [rngs[i] for i in rows]
                )
                for i, d in zip(rows, batch, strict=True):
                    decisions[i] = d
        return [d for d in decisions if d is not None]

    def _act_choose(
        self, states: list[EpisodeState], samplers: list[Sampler], rngs: list[random.Random]
    ) -> list[Decision]:
        start = time.perf_counter()
        cands = self._candidates(states, None)
        cand_ids = [[self.completion_ids(c) for c in cs] for cs in cands]
        prompts = [
            self.prompts.build(s, self._choose_budget(ids)) for s, ids in zip(states, cand_ids, strict=True)
        ]
        scores, logprobs = self._scores_and_logprobs([p.ids for p in prompts], cand_ids)
        latency = time.perf_counter() - start
        out = []
        for cs, ids, prompt, sc, lps, sampler, rng in zip(
            cands, cand_ids, prompts, scores, logprobs, samplers, rngs, strict=True
        ):
            k, prob = pick(sc, sampler, rng)
            out.append(
                Decision(
                    action=cs[k],
                    thought="",
                    raw_output=cs[k],
                    parse_ok=True,
                    tokens_in=len(prompt.ids),
                    tokens_out=sum(len(c) for c in ids),
                    latency_s=latency,
                    mode="choose",
                    probability=prob,
                    turns_dropped=prompt.turns_dropped,
                    **self._recorded(ids[k], lps[k].token.tolist()),
                )
            )
        return out

    def _recorded(self, ids: Sequence[int], logprobs: Sequence[float]) -> dict[str, Any]:
        """The :class:`Decision` fields of ``record_tokens`` (none when it is off)."""
        if not self.config.record_tokens:
            return {}
        return {
            "token_ids": tuple(int(t) for t in ids),
            "logprobs": tuple(float(x) for x in logprobs),
            "tokenizer": self.tokenizer_fingerprint,
        }

    def _act_generate(
        self, states: list[EpisodeState], samplers: list[Sampler], rngs: list[random.Random]
    ) -> list[Decision]:
        start = time.perf_counter()
        cfg = self.config
        prompts = [self.prompts.build(s, self.max_context - cfg.max_new_tokens) for s in states]
        tok = self.tokenizer
        newline_ids = self._newline_ids()

        def stop(row: int, ids: list[int]) -> bool:
            if not cfg.stop_after_action or ids[-1] not in newline_ids:
                return False
            return action_line_complete(tok.decode(ids, skip_special_tokens=True))

        outputs = self.backend.generate(
            [p.ids for p in prompts], samplers, rngs, max_new_tokens=cfg.max_new_tokens, stop=stop
        )
        answer_logprobs: list[list[float]] = []
        if cfg.record_tokens:  # the model's log-probs of what was sampled: the answers scored as candidates
            expert = self.backend.candidate_logprobs([p.ids for p in prompts], [[ids] for ids in outputs])
            answer_logprobs = [e[0].token.tolist() for e in expert]
        latency = time.perf_counter() - start
        out = []
        for r, (prompt, ids) in enumerate(zip(prompts, outputs, strict=True)):
            text_ids = [t for t in ids if t not in self.stop_ids]
            raw = tok.decode(text_ids, skip_special_tokens=True)
            parsed = parse_react(raw, bare_action=cfg.bare_action)
            out.append(
                Decision(
                    action=parsed.action if parsed.ok else "",
                    thought=parsed.thought,
                    raw_output=raw,
                    parse_ok=parsed.ok,
                    tokens_in=len(prompt.ids),
                    tokens_out=len(ids),
                    latency_s=latency,
                    mode="generate",
                    parse_error=parsed.error,
                    turns_dropped=prompt.turns_dropped,
                    **(self._recorded(ids, answer_logprobs[r]) if cfg.record_tokens else {}),
                )
            )
        return out

    def _newline_ids(self) -> frozenset[int]:
        ids = getattr(self, "_newline_cache", None)
        if ids is None:
            tok = self.tokenizer
            vocab = tok.get_vocab()
            ids = frozenset(i for i in vocab.values() if "\n" in tok.decode([i]))
            self._newline_cache = ids
        return ids


def _reduce(scores: torch.Tensor, mean: bool) -> float:
    total = float(scores.double().sum())
    return total / scores.numel() if mean else total


# ------------------------------------------------------------------------------------------- helpers


def score_actions(
    agent: Agent, states: Sequence[EpisodeState], candidates: Sequence[Sequence[str]] | None = None
) -> list[np.ndarray]:
    """Choose-mode scores of candidate commands (see :meth:`Agent.score_actions`)."""
    return agent.score_actions(states, candidates)


def action_distribution(
    agent: Agent,
    state: EpisodeState,
    *,
    temperature: float = 1.0,
    candidates: Sequence[str] | None = None,
) -> dict[str, float]:
    """The agent's choose-mode distribution over the commands of one state (see
    :meth:`Agent.action_distributions`); for misfit measures such as KL(pi_weak || pi_strong)."""
    cands = [candidates] if candidates is not None else None
    return agent.action_distributions([state], temperature=temperature, candidates=cands)[0]
