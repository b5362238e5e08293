"""Prompts: an :class:`~w2s_agents.types.EpisodeState` rendered through the chat template, fitted to a budget."""

from __future__ import annotations

import logging
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from w2s_agents.errors import ModelLoadError, W2SError
from w2s_agents.messages import Message, agent_message, episode_messages, system_prompt
from w2s_agents.types import EpisodeState

if TYPE_CHECKING:
    pass

from w2s_agents.agents.config import AgentConfig

__all__ = ["Prompt", "PromptBuilder", "answer_affixes"]

logger = logging.getLogger(__name__)


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


_PLACEHOLDER = "\x00W2S-ANSWER\x00"


def answer_affixes(tokenizer: object) -> tuple[str, str]:
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
