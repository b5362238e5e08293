"""Token masks of agent conversations: which tokens carry loss, and history truncation.

A conversation is rendered with the tokenizer's own chat template and tokenized once. The agent's tokens are
found by rendering prefixes of the conversation: for the assistant message ``i`` its text starts where
``render(messages[:i], add_generation_prompt=True)`` ends and stops where ``render(messages[:i + 1])`` ends
(trailing whitespace after the end-of-turn token excluded). A token carries loss when its first character lies
in such a span. This needs no ``{% generation %}`` markers in the template, so it works for any instruct
model whose template renders a conversation's prefixes as prefixes of the whole; where a template does not
(for example one that rewrites earlier turns), the ``{% generation %}`` mask of
``apply_chat_template(return_assistant_tokens_mask=True)`` is used when the template has one, and the row is
refused otherwise.

Only assistant turns from ``score_from`` on carry loss: system, task and observation (user) turns never do,
nor do the prompt's earlier agent turns in a preference pair. Padding is never inferred from token ids (the
pad token may equal the end-of-turn token, which does carry loss): sequences carry their own lengths.

History truncation works on messages, never by cutting tokens: the oldest (agent turn, observation) units
after the system and task turns are dropped until the conversation fits ``max_length``; the final agent turn
keeps the observation it answered. Preference pairs may also lose trailing units of their continuations.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from w2s_agents.errors import DataFormatError, W2SError
from w2s_agents.messages import Message

if TYPE_CHECKING:
    from .token_ids import PairRecorded

__all__ = [
    "ChatEncoder",
    "EncodedConversation",
    "PairPlan",
    "conversation_units",
    "fit_conversation",
    "fit_pair",
    "pair_messages",
    "pair_recorded",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodedConversation:
    """A tokenized conversation and its loss mask."""

    input_ids: list[int]
    loss_mask: list[int]  # 1 on agent tokens that carry loss, 0 elsewhere
    turn_ids: list[int]  # k >= 1 on the tokens of the k-th scored agent turn, 0 elsewhere
    recorded: tuple[int, ...] = ()  # messages (indices) of agent turns tokenized from their recorded ids
    refused: tuple[int, ...] = ()  # messages of agent turns whose recorded ids were refused (re-tokenised)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def recorded_turns(self) -> int:
        """Number of agent turns tokenized from their recorded ids (:mod:`.token_ids`)."""
        return len(self.recorded)

    @property
    def refused_turns(self) -> int:
        """Number of agent turns whose recorded ids were refused (the turn was re-tokenised)."""
        return len(self.refused)

    @property
    def n_loss_tokens(self) -> int:
        """Number of tokens that carry loss."""
        return sum(self.loss_mask)

    @property
    def n_turns(self) -> int:
        """Number of scored agent turns that kept at least one token."""
        return len({t for t in self.turn_ids if t})


class ChatEncoder:
    """Renders conversations with a tokenizer's chat template and builds agent-token masks.

    Args:
        tokenizer: a Hugging Face *fast* tokenizer with a chat template.
        name: how to name the tokenizer in error messages (e.g. its model folder).

    Raises:
        W2SError: the tokenizer has no chat template or is not a fast tokenizer (no character offsets).
    """

    def __init__(self, tokenizer: Any, *, name: str = "tokenizer") -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise W2SError(f"{name}: the tokenizer has no chat template; agent conversations need one")
        if not getattr(tokenizer, "is_fast", False):
            raise W2SError(
                f"{name}: a fast tokenizer is needed (character offsets locate the agent's tokens)"
            )
        self.tokenizer = tokenizer
        self.name = name
        self.has_generation_markers = "{% generation %}" in tokenizer.chat_template.replace(
            "{%- generation %}", "{% generation %}"
        )

    # ------------------------------------------------------------------ rendering

    def render(self, messages: Sequence[Message], *, generation_prompt: bool = False) -> str:
        """The chat template's text of ``messages`` (with the assistant header appended when asked)."""
        if not messages:
            return ""
        try:
            return self.tokenizer.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as exc:  # jinja2 errors raised by the model's own template
            raise DataFormatError(f"the chat template of {self.name} failed: {_first_line(exc)}") from None

    def _tokenize(self, text: str) -> tuple[list[int], list[int]]:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [start for start, _ in enc["offset_mapping"]]

    def message_token_counts(self, messages: Sequence[Message]) -> list[int]:
        """Tokens of each message in the rendering of the whole conversation (the template's text between
        the end of the previous message and the end of this one); their sum is the conversation's length."""
        text = self.render(messages)
        _, starts = self._tokenize(text)
        bounds = [len(self.render(messages[: i + 1])) for i in range(len(messages) - 1)] + [len(text) + 1]
        counts = [0] * len(messages)
        j = 0
        for s in starts:
            while s >= bounds[j]:
                j += 1
            counts[j] += 1
        return counts

    def length(self, messages: Sequence[Message]) -> int:
        """Number of tokens of the rendered conversation."""
        return len(self._tokenize(self.render(messages))[0])

    # ------------------------------------------------------------------ masks

    def encode(
        self,
        messages: Sequence[Message],
        *,
        score_from: int = 0,
        origin: str = "row",
        recorded: Sequence[Sequence[int] | None] | None = None,
    ) -> EncodedConversation:
        """Tokenize ``messages`` with a loss mask on the assistant turns at indices ``>= score_from``.

        ``recorded`` (one entry per message, None where there is none) gives the token ids an agent turn was
        produced as; they replace the turn's tokens where they spell its text (:mod:`.token_ids`).

        Raises:
            DataFormatError: the template cannot render the conversation, or renders it so that the agent's
                tokens cannot be located (named with ``origin``).
        """
        try:
            text = self.render(messages)
            spans = self._assistant_spans(messages, text, score_from)
        except _NotPrefixConsistent as exc:
            if not self.has_generation_markers:
                raise DataFormatError(
                    f"{origin}: the chat template of {self.name} does not render the conversation's prefixes "
                    f"as prefixes of the whole ({exc}) and has no {{% generation %}} markers; the agent's "
                    "tokens cannot be located"
                ) from None
            return self._encode_with_generation_markers(messages, score_from, origin)
        except DataFormatError as exc:
            raise DataFormatError(f"{origin}: {exc}") from None
        used: tuple[int, ...] = ()
        refused: tuple[int, ...] = ()
        if recorded is not None and any(r is not None for r in recorded):
            from .token_ids import splice_recorded

            offered = [
                i for i, r in enumerate(recorded) if r is not None and messages[i]["role"] == "assistant"
            ]
            turns = [(*self._turn_span(messages, i), messages[i]["content"], recorded[i]) for i in offered]
            ids, starts, taken = splice_recorded(self.tokenizer, text, turns)
            used = tuple(i for i, t in zip(offered, taken, strict=True) if t)
            refused = tuple(i for i, t in zip(offered, taken, strict=True) if not t)
        else:
            ids, starts = self._tokenize(text)
        loss_mask = [0] * len(ids)
        turn_ids = [0] * len(ids)
        k = 0
        for turn, (a, b) in enumerate(spans, 1):
            while k < len(starts) and starts[k] < a:
                k += 1
            while k < len(starts) and starts[k] < b:
                loss_mask[k] = 1
                turn_ids[k] = turn
                k += 1
        return EncodedConversation(ids, loss_mask, turn_ids, used, refused)

    def _turn_span(self, messages: Sequence[Message], i: int) -> tuple[int, int]:
        head = self.render(messages[:i], generation_prompt=True)
        upto = self.render(messages[: i + 1])
        return len(head), len(head) + len(upto[len(head) :].rstrip())

    def _assistant_spans(
        self, messages: Sequence[Message], text: str, score_from: int
    ) -> list[tuple[int, int]]:
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant" or i < score_from:
                continue
            head = self.render(messages[:i], generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if not text.startswith(head):
                raise _NotPrefixConsistent(f"message {i}, generation prompt")
            if not text.startswith(upto) or len(upto) < len(head):
                raise _NotPrefixConsistent(f"message {i}")
            end = len(head) + len(upto[len(head) :].rstrip())
            spans.append((len(head), end))
        return spans

    def _encode_with_generation_markers(
        self, messages: Sequence[Message], score_from: int, origin: str
    ) -> EncodedConversation:
        out = self.tokenizer.apply_chat_template(
            list(messages), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = list(out["input_ids"])
        mask = list(out["assistant_masks"])
        skip = sum(1 for m in messages[:score_from] if m["role"] == "assistant")
        loss_mask = [0] * len(ids)
        turn_ids = [0] * len(ids)
        run = 0
        for i, flag in enumerate(mask):
            if flag and (i == 0 or not mask[i - 1]):
                run += 1
            if flag and run > skip:
                loss_mask[i] = 1
                turn_ids[i] = run - skip
        return EncodedConversation(ids, loss_mask, turn_ids)


class _NotPrefixConsistent(Exception):
    pass


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _with_origin(exc: DataFormatError, origin: str) -> DataFormatError:
    text = str(exc)
    return exc if text.startswith(origin) else DataFormatError(f"{origin}: {text}")


# ---------------------------------------------------------------------------------------- truncation


def _head_length(messages: Sequence[Message]) -> int:
    """Messages up to and including the first user turn (system + task)."""
    for i, m in enumerate(messages):
        if m["role"] == "user":
            return i + 1
    return 0


def conversation_units(messages: Sequence[Message], start: int) -> list[tuple[int, int]]:
    """``(begin, end)`` index ranges of the units of ``messages[start:]``: each unit is an assistant message
    followed by the user messages up to the next assistant message."""
    units: list[tuple[int, int]] = []
    i = start
    while i < len(messages):
        j = i + 1
        while j < len(messages) and messages[j]["role"] != "assistant":
            j += 1
        units.append((i, j))
        i = j
    return units


def _drop(messages: Sequence[Message], head: int, units: list[tuple[int, int]], n: int) -> list[Message]:
    if n == 0:
        return list(messages)
    return list(messages[:head]) + list(messages[units[n - 1][1] :])


def fit_conversation(
    encoder: ChatEncoder,
    messages: Sequence[Message],
    max_length: int,
    *,
    origin: str = "row",
    recorded: Sequence[Sequence[int] | None] | None = None,
) -> tuple[EncodedConversation, int] | None:
    """Encode an SFT conversation, dropping its oldest units until it fits ``max_length`` tokens.

    The system and task turns are kept, and so are the last agent turn and the unit before it (whose
    observation the last turn answers). ``recorded`` are the recorded ids of the messages (see
    :meth:`ChatEncoder.encode`), dropped with their messages. Returns ``(encoded, units dropped)``, or None
    when even the shortest form is too long.
    """
    try:
        return _fit_conversation(encoder, messages, max_length, origin, recorded)
    except DataFormatError as exc:
        raise _with_origin(exc, origin) from None


def _fit_conversation(
    encoder: ChatEncoder,
    messages: Sequence[Message],
    max_length: int,
    origin: str,
    recorded: Sequence[Sequence[int] | None] | None = None,
) -> tuple[EncodedConversation, int] | None:
    head = _head_length(messages)
    units = conversation_units(messages, head)
    max_drop = max(0, len(units) - 2)
    counts = encoder.message_token_counts(messages)
    total = sum(counts)
    n = 0
    if total > max_length:
        excess = total - max_length
        removed = 0
        while n < max_drop and removed < excess:
            b, e = units[n]
            removed += sum(counts[b:e])
            n += 1
    while True:
        kept = _drop(recorded, head, units, n) if recorded is not None else None  # type: ignore[arg-type]
        enc = encoder.encode(_drop(messages, head, units, n), origin=origin, recorded=kept)
        if len(enc) <= max_length:
            return enc, n
        if n >= max_drop:
            return None
        n += 1


@dataclass(frozen=True)
class PairPlan:
    """How a pair is cut to fit: units dropped from the prompt's history, messages kept of each completion."""

    prompt_dropped: int
    chosen_kept: int
    rejected_kept: int

    def to_dict(self) -> dict[str, int]:
        """Plain dict (stored on cached reference rows)."""
        return {
            "prompt_dropped": self.prompt_dropped,
            "chosen_kept": self.chosen_kept,
            "rejected_kept": self.rejected_kept,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PairPlan:
        """Inverse of :meth:`to_dict`."""
        return cls(int(d["prompt_dropped"]), int(d["chosen_kept"]), int(d["rejected_kept"]))


def pair_messages(
    row: dict[str, Any], plan: PairPlan | None = None
) -> tuple[list[Message], list[Message], int]:
    """``(prompt + chosen, prompt + rejected, score_from)`` of a pair cut by ``plan`` (None: whole)."""
    return _cut_pair(row, plan, (row["prompt"], row["chosen"], row["rejected"]))


def pair_recorded(
    row: dict[str, Any], plan: PairPlan | None, recorded: PairRecorded
) -> tuple[list[list[int] | None], list[list[int] | None]]:
    """The recorded ids of ``prompt + chosen`` and ``prompt + rejected`` of a pair cut by ``plan``, one entry
    per message of what :func:`pair_messages` gives (the prompt's entries are the same list on both sides)."""
    chosen, rejected, _ = _cut_pair(row, plan, (recorded.prompt, recorded.chosen, recorded.rejected))
    return chosen, rejected


def _cut_pair(
    row: dict[str, Any], plan: PairPlan | None, parts: tuple[Sequence, Sequence, Sequence]
) -> tuple:
    """``parts`` (prompt, chosen, rejected: one item per message of the row's) cut as ``plan`` cuts the row's
    messages: ``(prompt + chosen, prompt + rejected, len(prompt))``."""
    prompt, chosen, rejected = parts
    if plan is not None:
        head = _head_length(row["prompt"])
        prompt = _drop(prompt, head, conversation_units(row["prompt"], head), plan.prompt_dropped)
        chosen, rejected = chosen[: plan.chosen_kept], rejected[: plan.rejected_kept]
    return list(prompt) + list(chosen), list(prompt) + list(rejected), len(prompt)


def _completion_cuts(completion: Sequence[Message]) -> list[int]:
    """Lengths a completion may be cut to: right after each of its assistant messages, longest first."""
    return [i + 1 for i in range(len(completion) - 1, -1, -1) if completion[i]["role"] == "assistant"]


def fit_pair(
    encoders: Sequence[ChatEncoder],
    row: dict[str, Any],
    max_length: int,
    *,
    origin: str = "row",
    recorded: Sequence[PairRecorded | None] | None = None,
) -> PairPlan | None:
    """The least cut of a preference pair for which prompt + chosen and prompt + rejected fit ``max_length``
    under every tokenizer in ``encoders`` (the policy's and the reference's, so both score the same
    messages).

    The prompt's oldest units go first (its last unit, with the observation acted on, stays); then trailing
    units of the chosen and rejected continuations (their first agent turn stays). ``recorded`` (one entry
    per encoder, None where it has none) are the pair's recorded ids usable by each tokenizer: the lengths
    are then those of the sequences tokenized with them (:mod:`.token_ids`). Returns None when even that is
    too long.
    """
    try:
        return _fit_pair(encoders, row, max_length, recorded or [None] * len(encoders))
    except DataFormatError as exc:
        raise _with_origin(exc, origin) from None


def _pair_lengths(
    encoder: ChatEncoder, row: dict[str, Any], plan: PairPlan, recorded: PairRecorded | None
) -> tuple[int, int]:
    """Tokens of prompt + chosen and prompt + rejected of ``row`` cut by ``plan`` under ``encoder``."""
    chosen, rejected, score_from = pair_messages(row, plan)
    if recorded is None:
        return encoder.length(chosen), encoder.length(rejected)
    rec_c, rec_r = pair_recorded(row, plan, recorded)
    return (
        len(encoder.encode(chosen, score_from=score_from, recorded=rec_c)),
        len(encoder.encode(rejected, score_from=score_from, recorded=rec_r)),
    )


def _fit_pair(
    encoders: Sequence[ChatEncoder],
    row: dict[str, Any],
    max_length: int,
    recorded: Sequence[PairRecorded | None],
) -> PairPlan | None:
    prompt = row["prompt"]
    n_prompt = len(prompt)
    head = _head_length(prompt)
    units = conversation_units(prompt, head)
    max_drop = max(0, len(units) - 1)
    cuts = {key: _completion_cuts(row[key]) for key in ("chosen", "rejected")}
    counts = [
        (e.message_token_counts(list(prompt) + list(row["chosen"])),
         e.message_token_counts(list(prompt) + list(row["rejected"])))
        for e in encoders
    ]  # fmt: skip

    def estimate(d: int, ci: int, ri: int) -> tuple[int, int]:
        worst_c = worst_r = 0
        for cc, cr in counts:
            dropped = sum(cc[head : units[d - 1][1]]) if d else 0
            worst_c = max(worst_c, sum(cc[: n_prompt + cuts["chosen"][ci]]) - dropped)
            worst_r = max(worst_r, sum(cr[: n_prompt + cuts["rejected"][ri]]) - dropped)
        return worst_c, worst_r

    # a first plan from per-message token counts, then exact lengths decide
    d, ci, ri = 0, 0, 0  # prompt units dropped, index into each completion's cut list
    while d < max_drop and max(estimate(d, ci, ri)) > max_length:
        d += 1
    while ci + 1 < len(cuts["chosen"]) and estimate(d, ci, ri)[0] > max_length:
        ci += 1
    while ri + 1 < len(cuts["rejected"]) and estimate(d, ci, ri)[1] > max_length:
        ri += 1
    while True:
        plan = PairPlan(d, cuts["chosen"][ci], cuts["rejected"][ri])
        lengths = [_pair_lengths(e, row, plan, rec) for e, rec in zip(encoders, recorded, strict=True)]
        over_c = any(c > max_length for c, _ in lengths)
        over_r = any(r > max_length for _, r in lengths)
        if not over_c and not over_r:
            return plan
        if d < max_drop:
            d += 1
            continue
        if over_c:
            if ci + 1 >= len(cuts["chosen"]):
                return None
            ci += 1
        if over_r:
            if ri + 1 >= len(cuts["rejected"]):
                return None
            ri += 1
