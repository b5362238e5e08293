"""Registering text envs with gymnasium: the built-in ones and third-party plugins.

The built-in envs are registered by versioned id with a lazy ``"module:Class"`` entry point, so registering
imports neither TextWorld nor ScienceWorld:

============================  ======================================================================
``w2s/TextWorld-v0``          :class:`w2s_agents.envs.textworld_env.TextWorldEnv`
``w2s/ScienceWorld-v0``       :class:`w2s_agents.envs.scienceworld_env.ScienceWorldEnv`
``w2s/TextWorldExpress-v0``   :class:`w2s_agents.envs.textworld_express_env.TextWorldExpressEnv`
============================  ======================================================================

A third-party package adds an env by declaring an entry point in the ``w2s_agents.envs`` group, named by the
env id, whose value is the env class::

    [project.entry-points."w2s_agents.envs"]
    "acme/Lab-v0" = "acme_envs.lab:LabEnv"

:func:`register_envs` (run when ``w2s_agents.envs`` is imported) registers every such entry point with gymnasium,
after which ``gymnasium.make("acme/Lab-v0")``, :func:`make_env` and ``w2s envs`` know it. A plugin that fails to
register is skipped with a warning.

A plugin class implements the engine hooks and may override the names in :data:`OVERRIDABLE`; every other name
of :class:`~w2s_agents.envs.base.TextEnv` (its methods and the attributes its constructor sets, e.g.
``_status``) is reserved (:func:`reserved_names`): a plugin class that defines one is refused with a
:class:`~w2s_agents.errors.W2SError` when it is registered with :func:`register_env` or first made (an entry
point's class is imported only then).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Generic

import gymnasium as gym

from w2s_agents.errors import W2SError

__all__ = [
    "BUILTIN_ENVS",
    "ENTRY_POINT_GROUP",
    "OVERRIDABLE",
    "EnvEntry",
    "check_env_class",
    "env_class",
    "make_env",
    "register_env",
    "register_envs",
    "registered_envs",
    "reserved_names",
]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "w2s_agents.envs"
"""Package entry-point group through which third-party envs plug in."""

BUILTIN_ENVS: dict[str, str] = {
    "w2s/TextWorld-v0": "w2s_agents.envs.textworld_env:TextWorldEnv",
    "w2s/ScienceWorld-v0": "w2s_agents.envs.scienceworld_env:ScienceWorldEnv",
    "w2s/TextWorldExpress-v0": "w2s_agents.envs.textworld_express_env:TextWorldExpressEnv",
}


OVERRIDABLE: frozenset[str] = frozenset(
    {
        "__init__",
        "_load_task",
        "_engine_reset",
        "_engine_step",
        "_engine_snapshot",
        "_engine_restore",
        "_engine_state_key",
        "task_ids",
        "default_task",
        "prepare",
        "close",
        "render",
        "metadata",
        "env_id",
        "command_grammar",
    }
)
"""Names of :class:`~w2s_agents.envs.base.TextEnv` that an env class defines or overrides: the engine hooks, the
task listing, ``prepare``, ``close``, ``render`` and the class attributes."""


@functools.cache
def reserved_names() -> frozenset[str]:
    """Names an env class must not define: every attribute of :class:`~w2s_agents.envs.base.TextEnv` (methods,
    properties, and the attributes its constructor sets, such as ``_status`` and ``_actions``) that is not in
    :data:`OVERRIDABLE`. Dunder names are left to Python."""
    from w2s_agents.envs.base import TextEnv

    class _Probe(TextEnv):  # the attributes TextEnv's constructor sets, read from an instance
        _load_task = _engine_reset = _engine_step = task_ids = default_task = None  # type: ignore[assignment]

    instance_attrs = set(vars(_Probe()))
    bases = [cls for cls in TextEnv.__mro__ if cls not in (object, Generic)]
    names = {n for cls in bases for n in vars(cls)} | instance_attrs
    return frozenset(
        n for n in names if not (n.startswith("__") and n.endswith("__")) and n not in OVERRIDABLE
    )


def check_env_class(env_class: type, env_id: str) -> None:
    """Refuse an env class that defines a reserved name of :class:`~w2s_agents.envs.base.TextEnv`.

    Raises:
        W2SError: ``env_class`` or one of its bases below ``TextEnv`` defines a name of :func:`reserved_names`
            (the message names the class, its module and the names).
    """
    from w2s_agents.envs.base import TextEnv

    reserved = reserved_names()
    for cls in env_class.__mro__:
        if cls is TextEnv or not issubclass(cls, TextEnv):
            break
        clash = sorted(reserved & set(vars(cls)))
        if clash:
            raise W2SError(
                f"env {env_id}: {cls.__module__}.{cls.__qualname__} defines {', '.join(clash)}, reserved by "
                "TextEnv (an env implements _load_task / _engine_* hooks; docs/envs.md, Plugins); rename it"
            )


@dataclass(frozen=True)
class EnvEntry:
    """A text env known to w2s-agents."""

    env_id: str
    entry_point: str
    """``"module:Class"`` of the env."""
    source: str
    """``builtin`` or the distribution that declared the plugin (``name version``)."""


_ENTRIES: dict[str, EnvEntry] = {}


def _register(entry: EnvEntry) -> None:
    existing = gym.registry.get(entry.env_id)
    if existing is not None and existing.entry_point != entry.entry_point:
        logger.warning(
            "env id %s is already registered with gymnasium as %s; %s (%s) is ignored",
            entry.env_id,
            existing.entry_point,
            entry.entry_point,
            entry.source,
        )
        return
    if existing is None:
        # the envs enforce their own step limit (truncated at max_steps), so no TimeLimit wrapper
        gym.register(id=entry.env_id, entry_point=entry.entry_point)
    _ENTRIES[entry.env_id] = entry


def register_envs() -> list[EnvEntry]:
    """Register the built-in envs and every plugin of the ``w2s_agents.envs`` entry-point group with gymnasium.

    Idempotent; safe to call again after installing a plugin. Returns the known envs (see
    :func:`registered_envs`).
    """
    for env_id, entry_point in BUILTIN_ENVS.items():
        _register(EnvEntry(env_id, entry_point, "builtin"))
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in BUILTIN_ENVS:
            continue  # this package's own declaration of a built-in env
        dist = getattr(ep, "dist", None)
        source = f"{dist.name} {dist.version}" if dist is not None else "plugin"
        if ":" not in ep.value:
            logger.warning(
                "plugin env %s from %s: entry point %r is not 'module:Class'", ep.name, source, ep.value
            )
            continue
        try:
            _register(EnvEntry(ep.name, ep.value, source))
        except Exception as exc:  # a malformed id must not break the other envs
            logger.warning("plugin env %s from %s could not be registered: %s", ep.name, source, exc)
    return registered_envs()


def register_env(env_id: str, env_class: type, *, source: str = "this process") -> EnvEntry:
    """Register ``env_class`` (a :class:`~w2s_agents.envs.base.TextEnv` subclass) as ``env_id`` in this
    process: what a plugin's entry point does for an installed package, for scripts, notebooks and tests.

    Worker processes (Ray rollouts) find the class by its module, so define it in an importable module for
    those; a class defined in a script's ``__main__`` serves this process.

    Raises:
        W2SError: ``env_class`` is not a ``TextEnv``, defines a reserved name (:func:`check_env_class`), or
            ``env_id`` is already taken by another env.
    """
    from w2s_agents.envs.base import TextEnv

    if not (isinstance(env_class, type) and issubclass(env_class, TextEnv)):
        raise W2SError(f"register_env({env_id!r}): {env_class!r} is not a TextEnv subclass")
    check_env_class(env_class, env_id)
    entry_point = f"{env_class.__module__}:{env_class.__qualname__}"
    existing = gym.registry.get(env_id)
    if existing is not None and existing.entry_point not in (entry_point, env_class):
        raise W2SError(f"env id {env_id} is already registered as {existing.entry_point}")
    if existing is None:
        gym.register(id=env_id, entry_point=env_class)
    entry = EnvEntry(env_id, entry_point, source)
    _ENTRIES[env_id] = entry
    return entry


def registered_envs() -> list[EnvEntry]:
    """The text envs registered by :func:`register_envs`, sorted by id."""
    return [_ENTRIES[k] for k in sorted(_ENTRIES)]


def make_env(env_id: str, **kwargs: Any) -> Any:
    """Create the text env ``env_id`` with gymnasium (``kwargs`` go to the env's constructor).

    Returns the gymnasium-wrapped env; ``env.unwrapped`` is the :class:`~w2s_agents.envs.base.TextEnv` with
    ``clone_state`` / ``restore_state``.

    Raises:
        W2SError: ``env_id`` is not a registered text env (the message lists the known ids), its plugin
            cannot be imported, or its class defines a reserved name (:func:`check_env_class`).
    """
    if env_id not in _ENTRIES:
        register_envs()
    if env_id not in _ENTRIES:
        known = ", ".join(e.env_id for e in registered_envs())
        raise W2SError(f"unknown env id {env_id!r}; registered text envs: {known}")
    if env_id not in BUILTIN_ENVS:
        env_class(env_id)  # imports a plugin's class and refuses one that defines a reserved name
    try:
        return gym.make(env_id, **kwargs)
    except (
        ImportError,
        AttributeError,
        TypeError,
        gym.error.Error,
    ) as exc:  # TypeError: a bad constructor argument
        raise W2SError(f"cannot create env {env_id} ({_ENTRIES[env_id].entry_point}): {exc}") from exc


def env_class(env_id: str) -> Any:
    """The class (or creator function) registered as ``env_id``, imported without making an env.

    Raises:
        W2SError: ``env_id`` is not a registered text env, its module cannot be imported, or (a plugin) it
            defines a reserved name (:func:`check_env_class`).
    """
    if env_id not in _ENTRIES:
        register_envs()
    if env_id not in _ENTRIES:
        known = ", ".join(e.env_id for e in registered_envs())
        raise W2SError(f"unknown env id {env_id!r}; registered text envs: {known}")
    entry_point = gym.spec(env_id).entry_point
    try:
        if isinstance(entry_point, str):
            cls = gym.envs.registration.load_env_creator(entry_point)
        else:
            cls = entry_point
    except (ImportError, AttributeError) as exc:
        raise W2SError(f"cannot create env {env_id} ({_ENTRIES[env_id].entry_point}): {exc}") from exc
    if env_id not in BUILTIN_ENVS and env_id not in _CHECKED and isinstance(cls, type):
        check_env_class(cls, env_id)
        _CHECKED.add(env_id)
    return cls


_CHECKED: set[str] = set()
"""Plugin env ids whose class passed :func:`check_env_class` in this process."""
