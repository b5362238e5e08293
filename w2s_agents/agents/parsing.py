"""Parsing a generated ReAct answer (``Thought: ...\nAction: ...``) into a thought and an action."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass

__all__ = ["ParsedOutput", "action_line_complete", "parse_react"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParsedOutput:
    """A generated answer split into thought and action."""

    thought: str
    action: str
    ok: bool
    error: str = ""


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


def action_line_complete(text: str) -> bool:
    """Whether ``text`` already holds an ``Action:`` line with a command, ended by a newline."""
    for m in _MARKER.finditer(text):
        if m.group(1).lower() != "action":
            continue
        rest = text[m.end() :]
        line, newline, _ = rest.partition("\n")
        if newline and _clean_action(line):
            return True
    return False
