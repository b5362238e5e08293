"""The one place where an environment's answers become a :class:`~w2s_agents.types.Trajectory`.

Rollouts (:mod:`w2s_agents.rollout`), expert demonstrations (:mod:`w2s_agents.envs.demos`) and online tree
search (:mod:`w2s_agents.search.online`) all play episodes; each records them with an :class:`EpisodeRecorder`::

    rec, info = EpisodeRecorder.reset(env, task_id, source)
    while True:
        action = policy(rec.state())
        obs, reward, terminated, truncated, info = env.step(action)
        rec.step(action, obs, reward, info)
        if terminated or truncated:
            break
    trajectory = rec.finish(info, terminated)

The outcome rule (DESIGN section 7, :func:`episode_outcome`): ``info["score"]`` is the env's *normalised*
score, so the return is that score clipped to [0, 1] (the sum of the rewards when the env reports no score;
``info["max_score"]`` is the engine's raw maximum and is never divided by again); the episode is ``won`` when
``info["won"]``, ``lost`` when ``info["lost"]`` or the env terminated it without a win, and ``truncated``
otherwise (a step limit, the caller's or the env's).

State keys: the reset's ``info["state_key"]`` becomes the trajectory's ``initial_state_key`` and every step's
``info["state_key"]`` its step's ``state_key`` (``None`` when the env reports none).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from w2s_agents.types import EndReason, EpisodeState, Source, Step, Trajectory

__all__ = ["EpisodeRecorder", "Outcome", "admissible_of", "episode_outcome", "state_key_of"]


@dataclass(frozen=True)
class Outcome:
    """How an episode ended, as stored in its trajectory."""

    return_: float
    """Final normalised score in [0, 1]."""
    success: bool
    end: EndReason


def admissible_of(info: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The admissible commands an env's ``info`` reports, None when it reports none."""
    cmds = info.get("admissible_commands")
    return tuple(cmds) if cmds is not None else None


def state_key_of(info: Mapping[str, Any]) -> str | None:
    """The state key an env's ``info`` reports, None when it reports none (or an empty or non-string one)."""
    key = info.get("state_key")
    return key if isinstance(key, str) and key else None


def episode_outcome(info: Mapping[str, Any], terminated: bool, reward_sum: float = 0.0) -> Outcome:
    """The outcome of an episode from its last ``info`` (see the module docstring for the rule).

    Args:
        info: the ``info`` of the episode's last step (or of its reset, for an episode without steps).
        terminated: whether the env ended the episode (won or lost), as opposed to a step limit.
        reward_sum: the sum of the episode's rewards, the return of an env that reports no ``score``.
    """
    score = info.get("score")
    ret = float(reward_sum if score is None else score)
    ret = min(1.0, max(0.0, ret)) if ret == ret else 0.0  # NaN -> 0
    if info.get("won"):
        return Outcome(ret, True, "won")
    if info.get("lost") or terminated:
        return Outcome(ret, False, "lost")
    return Outcome(ret, False, "truncated")


class EpisodeRecorder:
    """Records one episode step by step and turns it into a :class:`Trajectory`.

    It also gives the agent's view of the episode so far (:meth:`state`): the task, the turns and the commands
    admissible now, so that whoever plays (a rollout, a search) hands the policy exactly what was recorded.

    Args:
        task_id: the task.
        env_id: the registered env id.
        source: who acts (model, role, sampler, seed).
        instruction: the task's goal.
        initial_observation: the env's first observation.
        admissible: the commands admissible in the first state, None when the env reports none.
        grammar: the env's command language (``TextEnv.command_grammar``), None when unknown.
        initial_state_key: the key of the first state (``info["state_key"]`` of the reset), None when unknown.
    """

    def __init__(
        self,
        task_id: str,
        env_id: str,
        source: Source,
        *,
        instruction: str = "",
        initial_observation: str = "",
        admissible: tuple[str, ...] | None = None,
        grammar: str | None = None,
        initial_state_key: str | None = None,
    ) -> None:
        self.task_id = task_id
        self.env_id = env_id
        self.source = source
        self.instruction = instruction
        self.initial_observation = initial_observation
        self.admissible = admissible
        self.grammar = grammar
        self.initial_state_key = initial_state_key
        self.steps: list[Step] = []
        self.reward_sum = 0.0
        self._turns: list[tuple[str, str, str]] = []
        self._last_info: Mapping[str, Any] = {}

    @classmethod
    def start(
        cls,
        task_id: str,
        env_id: str,
        source: Source,
        observation: str,
        info: Mapping[str, Any],
        *,
        instruction: str | None = None,
        grammar: str | None = None,
    ) -> EpisodeRecorder:
        """A recorder of an episode whose reset returned ``(observation, info)``.

        The instruction is ``instruction`` when given, else ``info["instruction"]`` (else empty).
        """
        if instruction is None:
            instruction = str(info.get("instruction", ""))
        rec = cls(
            task_id,
            env_id,
            source,
            instruction=instruction,
            initial_observation=observation,
            admissible=admissible_of(info),
            grammar=grammar,
            initial_state_key=state_key_of(info),
        )
        rec._last_info = info
        return rec

    @classmethod
    def reset(
        cls,
        env: Any,
        task_id: str,
        source: Source,
        *,
        seed: int | None = None,
        env_id: str = "",
    ) -> tuple[EpisodeRecorder, dict[str, Any]]:
        """Reset ``env`` to ``task_id`` and start recording; returns the recorder and the reset's ``info``.

        The env id, instruction and command grammar are read from the env (its ``unwrapped`` env): ``env_id``
        (else the gymnasium spec's id, else the ``env_id`` argument), ``info["instruction"]`` (else
        ``instruction``) and ``command_grammar``.

        Raises:
            Whatever ``env.reset`` raises.
        """
        observation, info = env.reset(seed=seed, options={"task": task_id})
        base = getattr(env, "unwrapped", env)
        env_id = (
            getattr(base, "env_id", "")
            or getattr(getattr(env, "spec", None), "id", "")
            or env_id
            or "unknown"
        )
        instruction = str(info.get("instruction", getattr(base, "instruction", "")))
        grammar = getattr(base, "command_grammar", "") or None
        recorder = cls.start(
            task_id, env_id, source, observation, info, instruction=instruction, grammar=grammar
        )
        return recorder, info

    @property
    def num_steps(self) -> int:
        """Actions recorded so far."""
        return len(self.steps)

    @property
    def observation(self) -> str:
        """The current observation (what the next action acts on)."""
        return self.steps[-1].observation if self.steps else self.initial_observation

    def state(self) -> EpisodeState:
        """What the agent sees now: the task, every turn so far and the admissible commands."""
        return EpisodeState(
            self.instruction, self.initial_observation, tuple(self._turns), self.admissible, self.grammar
        )

    def step(
        self,
        action: str,
        observation: str,
        reward: float,
        info: Mapping[str, Any],
        *,
        thought: str = "",
        tokens_in: int = 0,
        tokens_out: int = 0,
        latency_s: float = 0.0,
        extra: Mapping[str, Any] | None = None,
        token_ids: Sequence[int] | None = None,
        logprobs: Sequence[float] | None = None,
        tokenizer: str | None = None,
    ) -> Step:
        """Record one action and the env's answer; returns the recorded step.

        The step keeps the commands that were admissible when the action was chosen; ``info``'s commands
        become the admissible commands of the new state, and ``info``'s state key is the step's. ``token_ids``,
        ``logprobs`` and ``tokenizer`` are the answer's tokens as its model produced them, when recorded.
        """
        step = Step(
            action=action,
            observation=observation,
            reward=float(reward),
            score=float(info.get("score", 0.0)),
            thought=thought,
            admissible=self.admissible,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            latency_s=latency_s,
            state_key=state_key_of(info),
            extra=dict(extra or {}),
            token_ids=tuple(token_ids) if token_ids is not None else None,
            logprobs=tuple(logprobs) if logprobs is not None else None,
            tokenizer=tokenizer,
        )
        self.steps.append(step)
        self._turns.append((thought, action, observation))
        self.reward_sum += float(reward)
        self.admissible = admissible_of(info)
        self._last_info = info
        return step

    def restore(self, steps: list[Step], admissible: tuple[str, ...] | None) -> None:
        """Replace the recorded steps by ``steps`` (a search that restored the env to a known state).

        ``admissible`` are the commands admissible in the state after the last of ``steps``.
        """
        self.steps = list(steps)
        self._turns = [(s.thought, s.action, s.observation) for s in self.steps]
        self.reward_sum = sum(s.reward for s in self.steps)
        self.admissible = admissible
        self._last_info = {"score": self.steps[-1].score} if self.steps else {}

    def finish(
        self,
        info: Mapping[str, Any] | None = None,
        terminated: bool = False,
        *,
        error: str = "",
        extra: Mapping[str, Any] | None = None,
    ) -> Trajectory:
        """The trajectory of the episode, ended with the env's last ``info`` (default: the last one recorded).

        Args:
            info: the ``info`` of the last step; None uses the one recorded last.
            terminated: whether the env ended the episode (won or lost) rather than a step limit.
            error: the episode failed (an env or agent error): it ends ``error`` with the score reached, and the
                message is kept in ``extra["error"]``.
            extra: further trajectory metadata.
        """
        last = self._last_info if info is None else info
        meta = dict(extra or {})
        if error:
            meta["error"] = error
            score = self.steps[-1].score if self.steps else 0.0
            outcome = Outcome(min(1.0, max(0.0, float(score))), False, "error")
        else:
            outcome = episode_outcome(last, terminated, self.reward_sum)
        return Trajectory(
            task_id=self.task_id,
            env_id=self.env_id,
            source=self.source,
            instruction=self.instruction,
            initial_observation=self.initial_observation,
            steps=tuple(self.steps),
            return_=outcome.return_,
            success=outcome.success,
            end=outcome.end,
            extra=meta,
            initial_state_key=self.initial_state_key,
        )
