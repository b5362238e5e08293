"""Chat messages of an agent episode: the one place where a history becomes a conversation.

The trainers, the search (best-path and pair extraction) and the rollout agent all render an episode as the
same list of chat messages, so that a model is trained on exactly the prompt format it is run with::

    [{"role": "system", "content": SYSTEM_PROMPT},
     {"role": "user", "content": "Task: <instruction>\\n\\n<first observation>"},
     {"role": "assistant", "content": "Thought: <thought>\\nAction: <action>"},   # or just the action
     {"role": "user", "content": "<observation after the action>"},
     ...]

User turns are observations, assistant turns are the agent's thought and action. The system instruction may
also describe the env's command language and list the commands admissible in the current state
(:func:`system_prompt`); whoever renders a conversation for training and whoever runs the trained model must
make the same choice, so both call :func:`system_prompt` with the same arguments.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = [
    "SYSTEM_PROMPT",
    "Message",
    "agent_message",
    "episode_messages",
    "system_prompt",
    "task_messages",
]

Message = dict[str, str]
"""One chat message: ``{"role": "system" | "user" | "assistant", "content": text}``."""

SYSTEM_PROMPT = (
    "You are an agent acting in a text environment. Each turn you see an observation and answer with one "
    "command. You may first reason in a line starting with 'Thought:', then give the command in a line "
    "starting with 'Action:'."
)
"""Default system instruction of every conversation."""


def system_prompt(
    admissible: Sequence[str] | None = None, grammar: str | None = None, *, max_admissible: int | None = None
) -> str:
    """The system instruction, extended with the env's command language and the admissible commands.

    Without ``admissible`` and ``grammar`` it is exactly :data:`SYSTEM_PROMPT`. Otherwise a ``Commands:``
    paragraph (``grammar``) and an ``Admissible commands now:`` list (one command a line, in the given order)
    follow it.

    Args:
        admissible: the commands the env accepts in the current state, or None when unknown or not shown.
        grammar: a short description of the command language (``TextEnv.command_grammar``), or None / empty.
        max_admissible: show at most this many commands, followed by a line ``(N more)``; None shows all.
    """
    parts = [SYSTEM_PROMPT]
    if grammar:
        parts.append(f"Commands: {grammar}")
    if admissible is not None:
        shown = list(admissible)
        more = 0
        if max_admissible is not None and len(shown) > max_admissible:
            more = len(shown) - max_admissible
            shown = shown[:max_admissible]
        lines = ["Admissible commands now:", *shown]
        if more:
            lines.append(f"({more} more)")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def task_messages(instruction: str, observation: str, *, system: str | None = SYSTEM_PROMPT) -> list[Message]:
    """The opening of a conversation: the system instruction (unless ``system`` is None) and the task turn.

    Envs whose first observation opens with the instruction itself (TextWorld's intro states the objective)
    would repeat it; the task turn states it once, after ``Task:``, and the observation follows without it.
    """
    out: list[Message] = []
    if system is not None:
        out.append({"role": "system", "content": system})
    goal = instruction.strip()
    head = observation.lstrip()
    if goal and head.startswith(goal):
        observation = head[len(goal) :].lstrip()
    out.append({"role": "user", "content": f"Task: {instruction}\n\n{observation}"})
    return out


def agent_message(action: str, thought: str = "") -> Message:
    """The assistant turn of one step: ``"Thought: ...\\nAction: ..."``, or the action alone without a thought."""
    content = f"Thought: {thought}\nAction: {action}" if thought else action
    return {"role": "assistant", "content": content}


def episode_messages(
    instruction: str,
    initial_observation: str,
    turns: Iterable[tuple[str, str, str]],
    *,
    system: str | None = SYSTEM_PROMPT,
) -> list[Message]:
    """A whole conversation from the task and ``(thought, action, observation_after)`` turns.

    Every turn adds an assistant message and, when ``observation_after`` is not None, a user message with it;
    pass None as the last observation to end on the agent's action (the form of an SFT row or a prompt
    followed by a completion).
    """
    out = task_messages(instruction, initial_observation, system=system)
    for thought, action, observation in turns:
        out.append(agent_message(action, thought))
        if observation is not None:
            out.append({"role": "user", "content": observation})
    return out
