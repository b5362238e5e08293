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
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from w2s_agents.config import check, option
from w2s_agents.errors import ConfigError, ModelLoadError, W2SError
from w2s_agents.messages import Message, agent_message, episode_messages, system_prompt

if TYPE_CHECKING:
    import torch

    from w2s_agents.agents.models import LoadedModel
    from w2s_agents.types import Trajectory

__all__ = [
    "Agent",
    "AgentConfig",
    "Decision",
    "EpisodeState",
    "ParsedOutput",
    "Prompt",
    "Sampler",
    "action_distribution",
    "load_agent",
    "parse_react",
    "score_actions",
]

logger = logging.getLogger(__name__)

Mode = Literal["generate", "choose"]


# ------------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class Sampler:
    """One sampling setting of exploration (one slot of the paper's tree width).

    Temperature 0 is greedy: the argmax, ties broken by the lowest index (first admissible command, lowest token
    id). Otherwise the agent samples from ``softmax(score / temperature)`` cut to the smallest set of most
    probable choices whose probability reaches ``top_p``.
    """

    name: str = option("", "name recorded in trajectories (source.sampler); empty: 'greedy' or 't<T>-p<P>'")
    temperature: float = option(0.0, "softmax temperature; 0 is greedy (argmax)")
    top_p: float = option(1.0, "nucleus: keep the most probable choices up to this cumulative probability")

    def __post_init__(self) -> None:
        check(
            math.isfinite(self.temperature) and self.temperature >= 0,
            "temperature",
            f"must be a finite number >= 0, got {self.temperature}",
        )
        check(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")
        check(
            self.name == "" or re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", self.name) is not None,
            "name",
            f"must be letters, digits, '.', '_', '+' or '-', got {self.name!r}",
        )
        if not self.name:
            auto = "greedy" if self.temperature == 0 else f"t{self.temperature:g}-p{self.top_p:g}"
            object.__setattr__(self, "name", auto)

    @property
    def greedy(self) -> bool:
        """Whether this sampler takes the argmax."""
        return self.temperature == 0


@dataclass(frozen=True)
class AgentConfig:
    """How an LLM agent turns a state into an action."""

    mode: Mode = option(
        "choose",
        "'choose': score every admissible command and pick one; 'generate': write 'Thought: ... Action: ...'",
    )
    name: str | None = option(
        None, "model name recorded in trajectories (source.model); null: the model folder's name"
    )
    role: Literal["weak", "strong", "expert", "search"] = option(
        "weak", "role recorded in trajectories (source.role)"
    )
    max_context_tokens: int = option(
        2048, "longest prompt plus answer; older turns are dropped to fit (capped by the model's positions)"
    )
    max_new_tokens: int = option(64, "generate mode: longest answer in tokens")
    score_batch_size: int = option(
        0,
        "choose mode: most rows (a prompt with its candidates packed behind it) per forward pass; 0: 4 on a CPU "
        "(long rows are compute-bound there and larger batches only add memory traffic), 16 on a GPU",
    )
    score_block_tokens: int = option(
        256, "choose mode: most candidate tokens packed behind one copy of a prompt (bounds the logits kept)"
    )
    share_prompt: bool = option(
        True,
        "choose mode: pack the candidates behind one copy of their prompt (False: one row per candidate)",
    )
    prefix_cache: int = option(
        64,
        "choose mode with share_prompt: keep the keys and values of this many recent prompts, so that a prompt "
        "extending one (the next step of an episode) runs only its new tokens; at least the number of live "
        "episodes for all to reuse theirs; 0 turns it off",
    )
    length_normalize: bool = option(
        False, "choose mode: score a command by its mean token log-probability instead of the sum"
    )
    prompt_grammar: bool = option(True, "describe the env's command language in the system instruction")
    prompt_admissible: bool = option(True, "list the admissible commands in the system instruction")
    max_admissible_in_prompt: int = option(
        100, "show at most this many admissible commands in the prompt (choose mode still scores all)"
    )
    bare_action: bool = option(
        True,
        "generate mode: accept an answer without 'Thought:'/'Action:' as a bare command (the format of steps "
        "without a thought)",
    )
    stop_after_action: bool = option(True, "generate mode: stop an answer at the end of its 'Action:' line")
    amateur_path: str | None = option(
        None, "contrastive decoding: local folder of the amateur model (same tokenizer); null turns it off"
    )
    contrastive_lambda: float = option(
        0.5, "contrastive decoding: lambda of (1 + lambda) * log p_expert - lambda * log p_amateur"
    )
    contrastive_alpha: float = option(
        0.1, "contrastive decoding: a token is plausible when p_expert >= alpha * max p_expert"
    )

    def __post_init__(self) -> None:
        check(
            self.max_context_tokens >= 16,
            "max_context_tokens",
            f"must be >= 16, got {self.max_context_tokens}",
        )
        check(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        check(
            self.max_new_tokens < self.max_context_tokens,
            "max_new_tokens",
            f"must be below max_context_tokens ({self.max_context_tokens}), got {self.max_new_tokens}",
        )
        check(self.score_batch_size >= 0, "score_batch_size", f"must be >= 0, got {self.score_batch_size}")
        check(
            self.score_block_tokens >= 1, "score_block_tokens", f"must be >= 1, got {self.score_block_tokens}"
        )
        check(self.prefix_cache >= 0, "prefix_cache", f"must be >= 0, got {self.prefix_cache}")
        check(
            self.max_admissible_in_prompt >= 0,
            "max_admissible_in_prompt",
            f"must be >= 0, got {self.max_admissible_in_prompt}",
        )
        check(self.name is None or bool(self.name.strip()), "name", "must be a non-empty string or null")
        check(
            self.amateur_path is None or bool(self.amateur_path.strip()),
            "amateur_path",
            "must be a directory or null",
        )
        check(
            math.isfinite(self.contrastive_lambda) and self.contrastive_lambda >= 0,
            "contrastive_lambda",
            f"must be a finite number >= 0, got {self.contrastive_lambda}",
        )
        check(
            0.0 <= self.contrastive_alpha <= 1.0,
            "contrastive_alpha",
            f"must be in [0, 1], got {self.contrastive_alpha}",
        )

    @property
    def contrastive(self) -> bool:
        """Whether contrastive decoding is on (an amateur model is configured)."""
        return self.amateur_path is not None


# ------------------------------------------------------------------------------------------- states


@dataclass(frozen=True)
class EpisodeState:
    """What the agent sees of a live episode: the task, the history so far and the current options."""

    instruction: str
    initial_observation: str
    turns: tuple[tuple[str, str, str], ...] = ()
    """``(thought, action, observation after the action)`` of every step so far, oldest first."""
    admissible: tuple[str, ...] | None = None
    """Commands the env accepts now, None when the env does not report them."""
    grammar: str | None = None
    """The env's command language (``TextEnv.command_grammar``), None when unknown."""

    @property
    def observation(self) -> str:
        """The current observation (what the next action acts on)."""
        return self.turns[-1][2] if self.turns else self.initial_observation

    @classmethod
    def from_trajectory(cls, traj: Trajectory, step: int, *, grammar: str | None = None) -> EpisodeState:
        """The state in which ``traj`` chose its action number ``step`` (0-based).

        Raises:
            IndexError: ``step`` is not an index of ``traj.steps``.
        """
        if not 0 <= step < len(traj.steps):
            raise IndexError(f"step {step} of a {len(traj.steps)}-step trajectory")
        turns = tuple((s.thought, s.action, s.observation) for s in traj.steps[:step])
        return cls(traj.instruction, traj.initial_observation, turns, traj.steps[step].admissible, grammar)


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


@dataclass(frozen=True)
class ParsedOutput:
    """A generated answer split into thought and action."""

    thought: str
    action: str
    ok: bool
    error: str = ""


# ------------------------------------------------------------------------------------------- parsing

_MARKER = re.compile(r"(?i)(?<![a-z0-9])(thought|action)\b[ \t]*\**[ \t]*[:：]")
_LINE_START = re.compile(r"^[ \t>*_#\-]*$")
_WRAPPERS = "*_`\"' \t"
_PAIRS = {"[": "]", "(": ")", "<": ">", "{": "}"}


def _clean_action(text: str) -> str:
    text = text.strip().strip(_WRAPPERS)
    while len(text) >= 2 and text[0] in _PAIRS and text[-1] == _PAIRS[text[0]]:
        text = text[1:-1].strip().strip(_WRAPPERS)
    return text.rstrip(".!?;,").strip().strip(_WRAPPERS)


def parse_react(text: str, *, bare_action: bool = True) -> ParsedOutput:
    """Split a generated ReAct answer into thought and action.

    Accepts ``Thought: ... Action: ...`` in any letter case, with or without spaces before the colon, markdown
    emphasis (``**Action:**``), on separate lines or one line, and extra text after the action line (a
    hallucinated observation, further turns): the action is the rest of the first ``Action:`` line (or the next
    non-empty line when that is empty), stripped of quotes, brackets and trailing punctuation; the thought is the
    text before it, without its ``Thought:`` marker. Markers at the start of a line win over markers inside text.

    An answer with neither marker is a bare command (its first non-empty line) when ``bare_action`` is true, the
    format :func:`w2s_agents.messages.agent_message` renders for a step without a thought. An answer with a
    thought but no action, an empty answer or an empty action is unparseable (``ok`` false, ``error`` says why).
    """
    text = text.strip()
    if not text:
        return ParsedOutput("", "", False, "empty output")
    markers = list(_MARKER.finditer(text))

    def at_line_start(m: re.Match[str]) -> bool:
        return _LINE_START.match(text[text.rfind("\n", 0, m.start()) + 1 : m.start()]) is not None

    actions = [m for m in markers if m.group(1).lower() == "action"]
    actions = [m for m in actions if at_line_start(m)] or actions
    if not actions:
        if markers:
            thought = text[markers[0].end() :].strip().strip(_WRAPPERS)
            return ParsedOutput(thought, "", False, "no 'Action:' in the output")
        if not bare_action:
            return ParsedOutput("", "", False, "no 'Action:' in the output")
        line = next(ln for ln in text.splitlines() if ln.strip())
        action = _clean_action(line)
        if not action:
            return ParsedOutput("", "", False, "empty action")
        return ParsedOutput("", action, True)
    act = actions[0]
    rest = text[act.end() :]
    first, _, after = rest.partition("\n")
    action = _clean_action(first)
    if not action:
        following = next((ln for ln in after.splitlines() if ln.strip()), "")
        if following and not _MARKER.search(following):
            action = _clean_action(following)
    thoughts = [m for m in markers if m.group(1).lower() == "thought" and m.start() < act.start()]
    start = thoughts[0].end() if thoughts else 0
    thought = text[start : act.start()].strip().strip(_WRAPPERS).strip()
    if not action:
        return ParsedOutput(thought, "", False, "empty action")
    return ParsedOutput(thought, action, True)


def _action_line_complete(text: str) -> bool:
    """Whether ``text`` already holds an ``Action:`` line with a command, ended by a newline."""
    for m in _MARKER.finditer(text):
        if m.group(1).lower() != "action":
            continue
        rest = text[m.end() :]
        line, newline, _ = rest.partition("\n")
        if newline and _clean_action(line):
            return True
    return False


# ------------------------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class Prompt:
    """A prompt rendered for the model."""

    ids: list[int]
    messages: list[Message]
    turns_dropped: int = 0
    """Oldest turns left out to fit the context."""
    shortened: tuple[str, ...] = ()
    """What else was cut to fit (``admissible``, ``grammar``, ``initial_observation``, ``observation``)."""


_PROBE_SYSTEM: Message = {"role": "system", "content": "probe"}


@dataclass(frozen=True)
class _Segments:
    """How a chat template renders a conversation message by message (see :func:`_template_segments`)."""

    tokenizer: Any
    system_prefix: str
    """The rendering of the probe system message alone."""
    gen_ids: tuple[int, ...]
    """Tokens of the generation prompt (the opening of the assistant's answer)."""
    bos_ids: tuple[int, ...] = ()
    """Tokens before the first message (none: the first message's piece holds the template's opening)."""

    def piece(self, message: Message, first: bool) -> str:
        """The text ``message`` adds to a conversation (after a system message unless it comes first; the first
        message's piece includes the template's opening, such as a bos token)."""
        render = self.tokenizer.apply_chat_template
        if first:
            full, base = render([message], tokenize=False), ""
        else:
            full, base = render([_PROBE_SYSTEM, message], tokenize=False), self.system_prefix
        if not full.startswith(base):  # pragma: no cover - excluded by the probe of _template_segments
            raise W2SError("the chat template renders messages differently by position")
        return full[len(base) :]


def _template_segments(tokenizer: Any) -> _Segments | None:
    """The message-by-message form of the tokenizer's chat template, or None when it has none.

    A conversation's ids can then be assembled from cached per-message ids, which is exact when (checked on a
    probe conversation) the template renders each message independently of the others, and every message and
    the generation prompt start with a special token, at which tokenization always splits.
    """
    try:
        render = tokenizer.apply_chat_template

        def ids(text: str) -> list[int]:
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])

        seg = _Segments(tokenizer, render([_PROBE_SYSTEM], tokenize=False), ())
        user: Message = {"role": "user", "content": "u"}
        closed = render([_PROBE_SYSTEM, user], tokenize=False)
        opened = render([_PROBE_SYSTEM, user], tokenize=False, add_generation_prompt=True)
        if not opened.startswith(closed):
            return None
        gen = opened[len(closed) :]
        probe: list[Message] = [
            {"role": "system", "content": "You act.\n\nCommands: look, go X"},
            {"role": "user", "content": "Task: leave\n\n-= Room =-\nYou are here.  "},
            {"role": "assistant", "content": "Thought: a door\nAction: open door"},
            {"role": "user", "content": "\nThe door opens.\n"},
            {"role": "assistant", "content": "go north"},
            {"role": "user", "content": " Outside. 3 points"},
        ]
        pieces = [seg.piece(m, i == 0) for i, m in enumerate(probe)]
        whole = render(probe, tokenize=False, add_generation_prompt=True)
        if "".join(pieces) + gen != whole:
            return None
        parts = [ids(p) for p in [*pieces, gen]]
        special = set(tokenizer.all_special_ids)
        if any(not p or p[0] not in special for p in parts):
            return None
        if ids(whole) != [t for p in parts for t in p]:
            return None
        return _Segments(tokenizer, seg.system_prefix, tuple(parts[-1]))
    except Exception:  # a template that refuses these conversations: render whole prompts
        logger.debug("chat template probe failed", exc_info=True)
        return None


class PromptBuilder:
    """Renders :class:`EpisodeState` as token ids through the tokenizer's chat template, fitted to a budget.

    Fitting, in order, until the prompt fits ``budget`` tokens: drop the fewest oldest turns that make it fit (the
    last turn, which holds the current observation, stays); leave the admissible list, then the command grammar out
    of the system instruction; shorten the first observation (when it is not the current one), then, as a last resort, the current
    observation, each to its tail. The instruction is never cut: a prompt that still does not fit raises
    :class:`W2SError`.
    """

    def __init__(self, tokenizer: object, config: AgentConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self._counts: dict[str, int] = {}
        self._overhead: int | None = None
        self._pieces: dict[tuple[str, str, bool], array] = {}
        self._piece_tokens = 0
        self._segments = _template_segments(tokenizer)
        if self._segments is None:
            logger.info("the chat template is not message-by-message; prompts are rendered whole (slower)")

    @property
    def incremental(self) -> bool:
        """Whether prompts are assembled from cached per-message token ids (exact for this template)."""
        return self._segments is not None

    def _piece(self, message: Message, first: bool) -> array:
        """Token ids one message adds to a conversation (cached by role and text)."""
        key = (message["role"], message["content"], first)
        ids = self._pieces.get(key)
        if ids is None:
            assert self._segments is not None
            text = self._segments.piece(message, first)
            ids = array("l", self.tokenizer(text, add_special_tokens=False)["input_ids"])
            if self._piece_tokens > 4_000_000:  # bound the cache (8 bytes a token)
                self._pieces.clear()
                self._piece_tokens = 0
            self._pieces[key] = ids
            self._piece_tokens += len(ids)
        return ids

    def messages(
        self,
        state: EpisodeState,
        *,
        drop: int = 0,
        admissible: bool = True,
        grammar: bool = True,
        initial: str | None = None,
        current: str | None = None,
    ) -> list[Message]:
        """The conversation of ``state`` with the ``drop`` oldest turns left out, the admissible list or the
        grammar left out of the system instruction, and shortened observations."""
        cfg = self.config
        system = system_prompt(
            state.admissible if (cfg.prompt_admissible and admissible) else None,
            state.grammar if (cfg.prompt_grammar and grammar) else None,
            max_admissible=cfg.max_admissible_in_prompt,
        )
        turns = list(state.turns[drop:])
        if current is not None:
            if turns:
                thought, action, _ = turns[-1]
                turns[-1] = (thought, action, current)
            else:
                initial = current
        first = state.initial_observation if initial is None else initial
        return episode_messages(state.instruction, first, turns, system=system)

    def encode_messages(self, messages: list[Message]) -> list[int]:
        """Token ids of a conversation followed by the opening of the agent's answer."""
        if self._segments is not None and messages and messages[0]["role"] == "system":
            out = array("l", self._segments.bos_ids)
            for i, m in enumerate(messages):
                out.extend(self._piece(m, i == 0))
            out.extend(self._segments.gen_ids)
            return out.tolist()
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def count(self, text: str) -> int:
        """Tokens of ``text`` alone (cached; observations and commands repeat across steps)."""
        n = self._counts.get(text)
        if n is None:
            n = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            if len(self._counts) > 200_000:
                self._counts.clear()
            self._counts[text] = n
        return n

    def _turn_overhead(self) -> int:
        """Template tokens one (assistant, user) turn adds beyond its two texts."""
        if self._overhead is None:
            base = [{"role": "user", "content": "x"}]
            turn = [agent_message("a"), {"role": "user", "content": "o"}]
            extra = len(self.encode_messages(base + turn)) - len(self.encode_messages(base))
            self._overhead = max(0, extra - self.count("a") - self.count("o"))
        return self._overhead

    def build(self, state: EpisodeState, budget: int) -> Prompt:
        """The prompt of ``state`` in at most ``budget`` tokens (see the class docstring).

        Raises:
            W2SError: not even the shortened instruction, observation and system instruction fit.
        """
        n = len(state.turns)
        if self._segments is not None:
            # exact arithmetic on cached per-message ids: drop the fewest oldest turns that make it fit
            msgs = self.messages(state)
            pieces = [self._piece(m, i == 0) for i, m in enumerate(msgs)]
            seg = self._segments
            total = len(seg.bos_ids) + len(seg.gen_ids) + sum(len(p) for p in pieces)
            d = 0
            while total > budget and d < n - 1:
                total -= len(pieces[2 + 2 * d]) + len(pieces[3 + 2 * d])
                d += 1
            if total <= budget:
                kept = msgs[:2] + msgs[2 + 2 * d :]
                out = array("l", seg.bos_ids)
                for p in pieces[:2] + pieces[2 + 2 * d :]:
                    out.extend(p)
                out.extend(seg.gen_ids)
                return Prompt(out.tolist(), kept, turns_dropped=d)
            drop = max(0, n - 1)
        elif n <= 1:
            msgs = self.messages(state)
            ids = self.encode_messages(msgs)
            if len(ids) <= budget:
                return Prompt(ids, msgs)
            drop = 0
        else:
            # tokens with every droppable turn dropped, plus an exact-by-construction estimate of each turn's
            # tokens, give the smallest drop; rendering checks it (and corrects it, should BPE merge differently)
            shortest = self.messages(state, drop=n - 1)
            shortest_ids = self.encode_messages(shortest)
            fixed = len(shortest_ids)
            over = self._turn_overhead()
            costs = [
                self.count(agent_message(a, t)["content"]) + self.count(o) + over for t, a, o in state.turns
            ]
            drop = n - 1
            total = fixed
            while drop > 0 and total + costs[drop - 1] <= budget:
                drop -= 1
                total += costs[drop]
            found: tuple[int, list[int], list[Message]] | None = None
            for d in range(drop, n):
                if d == n - 1:
                    msgs, ids = shortest, shortest_ids
                else:
                    msgs = self.messages(state, drop=d)
                    ids = self.encode_messages(msgs)
                if len(ids) <= budget:
                    found = (d, ids, msgs)
                    break
            if found is not None:
                d, ids, msgs = found
                while d > 0:  # an estimate that was too cautious: keep the turns that still fit
                    m = self.messages(state, drop=d - 1)
                    i = self.encode_messages(m)
                    if len(i) > budget:
                        break
                    d, ids, msgs = d - 1, i, m
                return Prompt(ids, msgs, turns_dropped=d)
            drop = n - 1
        overrides: dict[str, object] = {"drop": drop}
        shortened: list[str] = []
        steps: list[str] = []
        if state.admissible is not None and self.config.prompt_admissible:
            steps.append("admissible")
        if state.grammar and self.config.prompt_grammar:
            steps.append("grammar")
        if n > 0:
            steps.append("initial")
        steps.append("current")  # the instruction is never cut
        texts = {"initial": state.initial_observation, "current": state.observation}
        for what in steps:
            if what in ("admissible", "grammar"):
                overrides[what] = False
                shortened.append(what)
            else:
                overrides[what] = self._shorten(state, overrides, what, texts[what], budget)
                shortened.append({"initial": "initial_observation", "current": "observation"}[what])
            msgs = self.messages(state, **overrides)  # type: ignore[arg-type]
            ids = self.encode_messages(msgs)
            if len(ids) <= budget:
                logger.debug(
                    "prompt fitted to %d tokens by dropping %d turns and shortening %s",
                    budget,
                    drop,
                    shortened,
                )
                return Prompt(ids, msgs, drop, tuple(shortened))
        raise W2SError(
            f"the prompt does not fit in {budget} tokens even with its history dropped and its texts cut "
            f"({len(ids)} tokens); raise agent.max_context_tokens or lower agent.max_new_tokens"
        )

    def _shorten(
        self, state: EpisodeState, overrides: dict[str, object], what: str, text: str, budget: int
    ) -> str:
        """The tail of ``text`` short enough for the prompt to fit (as far as this field allows)."""
        tok = self.tokenizer
        pieces = tok(text, add_special_tokens=False)["input_ids"]
        keep = len(pieces)
        marker = "... "
        for _ in range(6):
            trial = {**overrides, what: (marker + tok.decode(pieces[len(pieces) - keep :])) if keep else ""}
            over = len(self.encode_messages(self.messages(state, **trial))) - budget  # type: ignore[arg-type]
            if over <= 0:
                return str(trial[what])
            if keep == 0:
                break
            keep = max(0, keep - over - 2)
        return ""


# ------------------------------------------------------------------------------------------- agent


def load_agent(
    model_path: str,
    config: AgentConfig | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
) -> Agent:
    """Load the model at ``model_path`` (and the amateur of contrastive decoding) and build an :class:`Agent`.

    Raises:
        ModelLoadError: a model folder cannot be loaded.
        ConfigError: the amateur's tokenizer differs from the model's.
    """
    from w2s_agents.agents.models import load_model

    return Agent(load_model(model_path, device=device, dtype=dtype), config or AgentConfig())


class Agent:
    """An LLM agent over a loaded model (see the module docstring).

    Args:
        lm: the model, from :func:`w2s_agents.agents.models.load_model`.
        config: agent settings.
        amateur: the amateur model of contrastive decoding; loaded from ``config.amateur_path`` (same device and
            dtype as ``lm``) when not given.

    Raises:
        ConfigError: the amateur's tokenizer differs from the model's.
        ModelLoadError: the amateur cannot be loaded.
    """

    def __init__(
        self, lm: LoadedModel, config: AgentConfig | None = None, *, amateur: LoadedModel | None = None
    ):
        self.lm = lm
        self.config = config or AgentConfig()
        self.name = self.config.name or lm.path.name
        tok = lm.tokenizer
        if tok.pad_token_id is None:
            raise ModelLoadError(f"{lm.path}: the tokenizer has no pad token")
        self.pad_id = int(tok.pad_token_id)
        self.stop_ids = _stop_ids(lm)
        positions = getattr(lm.model.config, "max_position_embeddings", None)
        self.max_context = min(self.config.max_context_tokens, positions or self.config.max_context_tokens)
        self.prompts = PromptBuilder(tok, self.config)
        self._answer_affixes = _answer_affixes(tok)
        self._completion_cache: dict[str, list[int]] = {}
        self.amateur: LoadedModel | None = amateur
        if self.amateur is None and self.config.amateur_path is not None:
            from w2s_agents.agents.models import load_model

            self.amateur = load_model(
                self.config.amateur_path, device=str(lm.device), dtype=str(lm.dtype).removeprefix("torch.")
            )
        if self.amateur is not None and self.amateur.tokenizer.get_vocab() != tok.get_vocab():
            raise ConfigError(
                f"agent.amateur_path: the amateur model {self.amateur.path} does not share the tokenizer of "
                f"{lm.path}; contrastive decoding compares the two models token by token"
            )
        self._prefix = self._prefix_cache(lm)
        self._prefix_amateur = self._prefix_cache(self.amateur) if self.amateur is not None else None

    @property
    def prefix_cache(self) -> Any:
        """The :class:`~w2s_agents.agents.decoding.PrefixCache` of the model's recent prompts, or None when off."""
        return self._prefix

    def _prefix_cache(self, lm: LoadedModel) -> Any:
        from w2s_agents.agents.decoding import PrefixCache

        if not (self.config.prefix_cache and self.config.share_prompt):
            return None
        if not PrefixCache.supported(lm.model):
            logger.info("%s: its KV cache cannot be kept per prompt; every prompt runs whole", lm.path)
            return None
        return PrefixCache(lm.model, self.config.prefix_cache)

    def __repr__(self) -> str:
        amateur = f", amateur={self.amateur.path.name!r}" if self.amateur is not None else ""
        return f"Agent({self.name!r}, mode={self.config.mode!r}{amateur})"

    # -- token helpers ----------------------------------------------------------------------------------

    def completion_ids(self, action: str) -> list[int]:
        """Token ids of the agent's answer ``action`` as the chat template writes it, through the end-of-turn
        token (what choose mode scores)."""
        ids = self._completion_cache.get(action)
        if ids is None:
            before, after = self._answer_affixes
            text = before + agent_message(action)["content"] + after
            ids = list(self.lm.tokenizer(text, add_special_tokens=False)["input_ids"])
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
        from w2s_agents.agents.decoding import candidate_logprobs, contrastive_token_scores

        cfg = self.config
        kwargs = {
            "pad_id": self.pad_id,
            "batch_rows": cfg.score_batch_size or (4 if self.lm.device.type == "cpu" else 16),
            "block_tokens": cfg.score_block_tokens,
            "share_prompt": cfg.share_prompt,
        }
        expert = candidate_logprobs(self.lm.model, prompts, candidates, prefix=self._prefix, **kwargs)
        amateur = (
            candidate_logprobs(self.amateur.model, prompts, candidates, prefix=self._prefix_amateur, **kwargs)
            if self.amateur is not None
            else None
        )
        out = []
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
        return out

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
            probs = _softmax(sc, temperature)
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
        scores = self._candidate_scores([p.ids for p in prompts], cand_ids)
        latency = time.perf_counter() - start
        out = []
        for cs, ids, prompt, sc, sampler, rng in zip(
            cands, cand_ids, prompts, scores, samplers, rngs, strict=True
        ):
            k, prob = _pick(sc, sampler, rng)
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
                )
            )
        return out

    def _act_generate(
        self, states: list[EpisodeState], samplers: list[Sampler], rngs: list[random.Random]
    ) -> list[Decision]:

        from w2s_agents.agents.decoding import contrastive_token_scores, generate, pick_tokens

        start = time.perf_counter()
        cfg = self.config
        prompts = [self.prompts.build(s, self.max_context - cfg.max_new_tokens) for s in states]
        tok = self.lm.tokenizer

        def choose(rows: list[int], logp: torch.Tensor, logp_b: torch.Tensor | None) -> torch.Tensor:
            scores = logp
            if logp_b is not None:
                best = logp.max(dim=-1, keepdim=True).values
                scores = contrastive_token_scores(
                    logp, best, logp_b, lam=cfg.contrastive_lambda, alpha=cfg.contrastive_alpha
                )
            return pick_tokens(
                scores,
                [samplers[r].temperature for r in rows],
                [samplers[r].top_p for r in rows],
                [None if samplers[r].greedy else rngs[r].random() for r in rows],
            )

        newline_ids = self._newline_ids()

        def stop(row: int, ids: list[int]) -> bool:
            if not cfg.stop_after_action or ids[-1] not in newline_ids:
                return False
            return _action_line_complete(tok.decode(ids, skip_special_tokens=True))

        outputs = generate(
            self.lm.model,
            [p.ids for p in prompts],
            choose,
            pad_id=self.pad_id,
            stop_ids=sorted(self.stop_ids),
            max_new_tokens=cfg.max_new_tokens,
            amateur=self.amateur.model if self.amateur is not None else None,
            stop=stop,
        )
        latency = time.perf_counter() - start
        out = []
        for prompt, ids in zip(prompts, outputs, strict=True):
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
                )
            )
        return out

    def _newline_ids(self) -> frozenset[int]:
        ids = getattr(self, "_newline_cache", None)
        if ids is None:
            tok = self.lm.tokenizer
            vocab = tok.get_vocab()
            ids = frozenset(i for i in vocab.values() if "\n" in tok.decode([i]))
            self._newline_cache = ids
        return ids


def _stop_ids(lm: LoadedModel) -> frozenset[int]:
    """End-of-turn tokens: the tokenizer's eos and the model's generation eos ids."""
    ids: set[int] = set()
    if lm.tokenizer.eos_token_id is not None:
        ids.add(int(lm.tokenizer.eos_token_id))
    gen = getattr(lm.model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(e) for e in eos)
    if not ids:
        raise ModelLoadError(f"{lm.path}: the tokenizer has no eos token to end the agent's answer")
    return frozenset(ids)


_PLACEHOLDER = "\x00W2S-ANSWER\x00"


def _answer_affixes(tokenizer: object) -> tuple[str, str]:
    """The text the chat template puts around an assistant answer after the generation prompt.

    Raises:
        ModelLoadError: the template has no chat template or renders a generation prompt that is not a prefix
            of the conversation with the answer (choose mode could not score answers as the model reads them).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError("the tokenizer has no chat template; an agent needs one to render conversations")
    base: list[Message] = [{"role": "user", "content": "x"}]
    prompt = tokenizer.apply_chat_template(base, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(
        [*base, {"role": "assistant", "content": _PLACEHOLDER}], tokenize=False
    )
    if not full.startswith(prompt) or _PLACEHOLDER not in full[len(prompt) :]:
        raise ModelLoadError(
            "the chat template's generation prompt is not the start of an assistant turn; choose mode cannot "
            "score answers with this tokenizer"
        )
    before, after = full[len(prompt) :].split(_PLACEHOLDER, 1)
    return before, after


def _reduce(scores: torch.Tensor, mean: bool) -> float:
    total = float(scores.double().sum())
    return total / scores.numel() if mean else total


def _softmax(scores: np.ndarray, temperature: float) -> np.ndarray:
    if temperature == 0:
        out = np.zeros_like(scores)
        out[int(np.argmax(scores))] = 1.0
        return out
    z = scores / temperature
    z = z - np.max(z[np.isfinite(z)])
    p = np.where(np.isfinite(z), np.exp(z), 0.0)
    return p / p.sum()


def _pick(scores: np.ndarray, sampler: Sampler, rng: random.Random) -> tuple[int, float]:
    """Index chosen among candidate ``scores`` by ``sampler`` and the probability it had."""
    import torch

    from w2s_agents.agents.decoding import pick_tokens

    if sampler.greedy:
        k = int(np.argmax(scores))
        return k, 1.0
    u = rng.random()
    k = int(pick_tokens(torch.from_numpy(scores)[None, :], [sampler.temperature], [sampler.top_p], [u])[0])
    probs = _softmax(scores, sampler.temperature)
    order = np.argsort(-probs, kind="stable")
    cum = np.cumsum(probs[order])
    keep = order[(cum - probs[order]) < sampler.top_p]
    if keep.size == 0:
        keep = order[:1]
    return k, float(probs[k] / probs[keep].sum())


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
