"""Import paths of modules that moved into subpackages, kept working for scripts written against them.

``import w2s_agents.models`` (and ``from w2s_agents.models import load_model``) gives the module at its new place,
``w2s_agents.agents.models``, the same module object, with a :class:`DeprecationWarning` naming the new path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType

__all__ = ["MOVED", "install"]

MOVED = {
    "w2s_agents.agent": "w2s_agents.agents.agent",
    "w2s_agents.decoding": "w2s_agents.agents.decoding",
    "w2s_agents.models": "w2s_agents.agents.models",
    "w2s_agents.search_policy": "w2s_agents.agents.policy",
    "w2s_agents.distributed": "w2s_agents.rollout.ray",
    "w2s_agents.experiment": "w2s_agents.pipeline.experiment",
    "w2s_agents.stages": "w2s_agents.pipeline.cache",
    "w2s_agents.report": "w2s_agents.pipeline.report",
    "w2s_agents.stats": "w2s_agents.pipeline.stats",
}
"""Old module path -> where the module lives now."""


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old paths of :data:`MOVED` and loads them as the modules at their new paths."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; import it from there", DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module was imported at its new path."""


def install() -> None:
    """Put the finder of moved modules on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
        sys.meta_path.append(_MovedModules())
