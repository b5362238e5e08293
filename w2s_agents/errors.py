"""Exceptions raised by w2s-agents.

Every error a user can cause (a bad config key, a malformed data file, a model path that is not a local
directory) is a :class:`W2SError` whose message is one line naming what is wrong and where. The CLI prints
that line and exits with status 2 instead of showing a traceback.
"""

from __future__ import annotations

__all__ = ["ConfigError", "DataFormatError", "DuplicateEpisodeError", "ModelLoadError", "W2SError"]


class W2SError(Exception):
    """Base class of every error caused by user input (files, configs, paths)."""


class ConfigError(W2SError, ValueError):
    """A config file, key or value is invalid; the message names the key (and file:line when known)."""


class DataFormatError(W2SError, ValueError):
    """A persisted file (trajectories, trees, datasets) is malformed; the message names file:line."""


class DuplicateEpisodeError(W2SError):
    """An episode whose key is already in a trajectory store was appended again."""


class ModelLoadError(W2SError, OSError):
    """A model or tokenizer cannot be loaded from the given local path."""
