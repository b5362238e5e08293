"""Tokens in, tokens out: training on the token ids an agent's model produced instead of re-tokenised text.

A conversation is normally rendered with the chat template and tokenized as a whole (:mod:`.masks`). When the
model that acted produced an answer as tokens the tokenizer would not choose for the same text (a word sampled
as two pieces, say), re-tokenising the rendered text trains on a sequence the model never produced, and the
log-probabilities computed on it are not those of its actions. Rows of trajectories recorded with
``agent.record_tokens``, and of trees built from them, carry the answers' ids (``agent_tokens``: SFT and
policy-gradient rows one entry per assistant message, preference pairs one such list per part, prompt, chosen
and rejected); this module puts them back, for every trainer alike: SFT (:mod:`.sft`), DPO (:mod:`.dpo`, the
policy's sequences, and :mod:`.reference`, the reference's when its tokenizer has the same fingerprint) and
policy gradient (:mod:`.pg`, whose start and KL-reference log-probs are computed on the same sequences):

1. **Fingerprint rule** (:func:`recorded_for_messages`): a turn's recorded ids are offered only when their
   tokenizer fingerprint (:func:`w2s_agents.tokens.tokenizer_fingerprint`) equals the trained model's;
   otherwise the turn is re-tokenised.
2. **Text rule** (:func:`splice_recorded`): the ids are used when a prefix of them decodes to the start of
   the turn's text as the chat template renders it, covering at least the message's content (an answer
   generated up to the end of its ``Action:`` line covers it without its final newline); the rest of the turn
   (the end-of-turn token) is tokenized as text.
3. **Boundaries**: the conversation's tokenization must split at the turn's start and end (true where turns
   are delimited by special tokens); then the turn's tokens are replaced by the recorded ones and everything
   else (system, task and observation turns, template text) stays as tokenized.

A turn that fails a rule is re-tokenised as before; nothing else changes. History cut to fit ``max_length``
drops a turn's ids with its message, and a pair's cut is chosen on the lengths of the sequences as tokenized
with the ids. A pair's chosen and rejected sequences take the prompt's ids from one list and each rule decides
a prompt turn on the prompt's text alone, so both keep the same prompt tokens, as the DPO loss assumes (tested;
``encode_pairs`` warns about a pair whose sides differ there). The counts of both paths are logged and
returned by the trainers (``TrainResult.extra["token_ids"]``, when any row carried ids): rows (pairs), and
agent turns by outcome, a pair's prompt turns counted once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from w2s_agents.messages import Message

if TYPE_CHECKING:
    from .result import TrainResult


class _Encoded(Protocol):
    """What :meth:`TokenIdsUse.count_row` reads of an encoded conversation (``masks.EncodedConversation``; not
    imported: masks imports this module)."""

    recorded: tuple[int, ...]
    refused: tuple[int, ...]


__all__ = [
    "PairRecorded",
    "TokenIdsUse",
    "recorded_for_messages",
    "recorded_for_pair",
    "splice_recorded",
    "with_token_ids_use",
]


@dataclass
class TokenIdsUse:
    """How many rows and agent turns were trained on recorded ids and how many were re-tokenised."""

    recorded_rows: int = 0
    """Rows with at least one agent turn from its recorded ids."""
    retokenised_rows: int = 0
    """Rows wholly re-tokenised (no recorded ids, or none usable)."""
    turns: dict[str, int] = field(default_factory=dict)
    """Agent turns with recorded ids by outcome: ``recorded`` (used), ``tokenizer`` (fingerprint differs),
    ``text`` (the ids do not decode to the turn's text, or the turn's boundaries split a token)."""

    def count_turns(self, outcome: str, n: int = 1) -> None:
        """Add ``n`` agent turns with this outcome."""
        if n:
            self.turns[outcome] = self.turns.get(outcome, 0) + n

    def count_row(self, encoded: Sequence[_Encoded], *, shared: int = 0) -> None:
        """Add one row tokenized as ``encoded`` (an SFT or policy-gradient row's conversation, or a pair's
        chosen and rejected sequences): its agent turns by outcome (``recorded`` or ``text``), and the row as
        recorded (a turn took its ids) or re-tokenised. The first ``shared`` messages (a pair's prompt) are
        the same turns in every sequence and count once."""
        recorded = {(0 if i < shared else k, i) for k, enc in enumerate(encoded) for i in enc.recorded}
        refused = {(0 if i < shared else k, i) for k, enc in enumerate(encoded) for i in enc.refused}
        self.count_turns("recorded", len(recorded))
        self.count_turns("text", len(refused))
        if recorded:
            self.recorded_rows += 1
        else:
            self.retokenised_rows += 1

    @property
    def any_recorded(self) -> bool:
        """Whether any row carried recorded ids at all."""
        return bool(self.turns)

    def to_dict(self) -> dict[str, Any]:
        """The counts as ``TrainResult.extra["token_ids"]`` holds them."""
        return {
            "recorded_rows": self.recorded_rows,
            "retokenised_rows": self.retokenised_rows,
            "turns": dict(sorted(self.turns.items())),
        }

    def summary(self) -> str:
        """One line for the log."""
        turns = ", ".join(f"{k} {v}" for k, v in sorted(self.turns.items())) or "none recorded"
        return (
            f"agent tokens: {self.recorded_rows} rows from recorded token ids, {self.retokenised_rows} "
            f"re-tokenised (agent turns with recorded ids: {turns})"
        )


def recorded_for_messages(
    messages: Sequence[Message], agent_tokens: Any, fingerprint: str, use: TokenIdsUse | None = None
) -> list[list[int] | None] | None:
    """The recorded ids of each message of a conversation (None for other messages and for turns without
    usable ids), or None when the row has no recorded ids at all.

    Args:
        messages: the row's conversation.
        agent_tokens: the row's ``agent_tokens`` (one entry per assistant message, checked by
            :class:`w2s_agents.search.rows.SftRow`), or None.
        fingerprint: the fingerprint of the trained model's tokenizer; entries of another tokenizer are
            dropped (and counted as ``tokenizer`` in ``use``).
        use: counts to add the dropped turns to.
    """
    if not agent_tokens:
        return None
    entries = iter(agent_tokens)
    out: list[list[int] | None] = []
    for m in messages:
        entry = next(entries, None) if m["role"] == "assistant" else None
        if isinstance(entry, Mapping) and entry.get("tokenizer") != fingerprint:
            if use is not None:
                use.count_turns("tokenizer")
            entry = None
        out.append(list(entry["ids"]) if isinstance(entry, Mapping) else None)
    return out if any(x is not None for x in out) else None


@dataclass(frozen=True)
class PairRecorded:
    """The usable recorded ids of a preference pair, one entry per message of each part (None where a message
    has none), as :func:`recorded_for_pair` gives them; :func:`~.masks.pair_recorded` cuts them as the pair's
    messages are cut."""

    prompt: list[list[int] | None]
    chosen: list[list[int] | None]
    rejected: list[list[int] | None]


def recorded_for_pair(
    row: Mapping[str, Any], fingerprint: str, use: TokenIdsUse | None = None
) -> PairRecorded | None:
    """The recorded ids of a preference pair's messages (:func:`recorded_for_messages` for its prompt, chosen
    and rejected parts), or None when none of them has usable ids.

    Args:
        row: the pair (``prompt``, ``chosen``, ``rejected`` and ``agent_tokens``, checked by
            :class:`w2s_agents.search.rows.PairRow`: a mapping from part to one entry per assistant message).
        fingerprint: the fingerprint of the scoring model's tokenizer; entries of another are dropped.
        use: counts to add the dropped turns to (each once: the prompt's turns are shared by both sides).
    """
    tokens = row.get("agent_tokens") or {}
    parts: dict[str, list[list[int] | None]] = {}
    for key in ("prompt", "chosen", "rejected"):
        got = recorded_for_messages(row[key], tokens.get(key), fingerprint, use)
        parts[key] = got if got is not None else [None] * len(row[key])
    if all(x is None for part in parts.values() for x in part):
        return None
    return PairRecorded(**parts)


def _turn_tokens(tokenizer: Any, span: str, content: str, recorded: Sequence[int]) -> list[int] | None:
    """The recorded ids (a prefix of them, the rest of ``span`` tokenized) that spell ``span``, or None when
    no prefix of them decodes to a start of ``span`` covering ``content``."""
    at = span.find(content)
    if at < 0:
        return None
    need = at + len(content)
    for j in range(len(recorded), 0, -1):
        text = tokenizer.decode(
            list(recorded[:j]), skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        if len(text) < need:
            return None  # shorter prefixes decode to shorter texts
        if span.startswith(text):
            rest = span[len(text) :]
            tail = list(tokenizer(rest, add_special_tokens=False)["input_ids"]) if rest else []
            return list(recorded[:j]) + tail
    return None


def splice_recorded(
    tokenizer: Any, text: str, turns: Sequence[tuple[int, int, str, Sequence[int]]]
) -> tuple[list[int], list[int], list[bool]]:
    """Tokenize ``text`` with the recorded ids of agent turns in place of the tokenizer's own.

    Args:
        tokenizer: a fast tokenizer (character offsets).
        text: the rendered conversation.
        turns: ``(start, end, content, recorded ids)`` of each agent turn with ids: the turn's character span
            in ``text`` (from the end of the generation prompt to its end-of-turn token) and its message content.

    Returns:
        ``(ids, starts, taken)``: the token ids, the character where each token starts (for a recorded
        token, the start of its turn: the loss mask needs only which span a token lies in), and for each of
        ``turns``, in their order, whether it took its recorded ids (False: re-tokenised; see the module
        docstring for the rules).
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = [(int(s), int(e)) for s, e in enc["offset_mapping"]]
    out_ids: list[int] = []
    out_starts: list[int] = []
    taken = [False] * len(turns)
    k = 0
    for t in sorted(range(len(turns)), key=lambda t: turns[t][0]):
        a, b, content, recorded = turns[t]
        lo = k
        while lo < len(ids) and offsets[lo][0] < a:
            lo += 1
        hi = lo
        while hi < len(ids) and offsets[hi][0] < b:
            hi += 1
        split = (lo == 0 or offsets[lo - 1][1] <= a) and (hi == 0 or offsets[hi - 1][1] <= b)
        piece = _turn_tokens(tokenizer, text[a:b], content, recorded) if split else None
        if piece is None:
            continue
        out_ids += ids[k:lo]
        out_starts += [s for s, _ in offsets[k:lo]]
        out_ids += piece
        out_starts += [a] * len(piece)  # all of the turn's span: where inside it does not matter to the mask
        k = hi
        taken[t] = True
    out_ids += ids[k:]
    out_starts += [s for s, _ in offsets[k:]]
    return out_ids, out_starts, taken


def with_token_ids_use(result: TrainResult, use: TokenIdsUse, *, save: bool) -> TrainResult:
    """``result`` with the counts of ``use`` in ``extra["token_ids"]`` (saved again when ``save``), when any
    training row carried recorded token ids; ``result`` itself otherwise."""
    if not use.any_recorded:
        return result
    result = replace(result, extra={**result.extra, "token_ids": use.to_dict()})
    if save:
        result.save()
    return result
