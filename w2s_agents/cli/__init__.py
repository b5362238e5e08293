"""The ``w2s`` command line.

Only commands that work are listed by ``w2s --help``. Every error caused by input (a bad config key, a
malformed file, a model path that is not a local directory) is printed as one line ``w2s: error: ...`` with
exit status 2; no traceback.

Each command group is a module that declares its subcommands and their handlers (``add_commands``); a handler
imports what it needs when it runs, so that ``w2s --help`` starts without the ML stack:

===========  ====================================================================================
``run``      ``w2s config show|keys``, ``w2s run`` (the whole pipeline), ``w2s report``
``model``    ``w2s model tiny|info``
``envs``     ``w2s envs [list|suites|tasks|play|demos]``
``rollout``  ``w2s rollout``
``store``    ``w2s store check``
``tree``     ``w2s tree build|summary``
``search``   ``w2s search``
``viz``      ``w2s viz``
``train``    ``w2s train sft|dpo|mcts-sft``
``args``     what arguments name: a config file with overrides, tree files and folders
===========  ====================================================================================
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from w2s_agents import __version__
from w2s_agents.cli import envs, model, rollout, run, search, store, train, tree, viz
from w2s_agents.errors import W2SError

__all__ = ["build_parser", "main"]

# in the order `w2s --help` lists them
_GROUPS = (run, model, envs, rollout, store, tree, search, viz, train)


def build_parser() -> argparse.ArgumentParser:
    """The ``w2s`` argument parser (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(
        prog="w2s",
        description="Train a strong LLM agent from a weak agent's trajectory trees.",
    )
    parser.add_argument("--version", action="version", version=f"w2s-agents {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in _GROUPS:
        group.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``w2s`` console script; returns the exit status."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    from w2s_agents.log import setup_logging

    setup_logging(ns.log_level)
    try:
        return int(ns.func(ns) or 0)
    except W2SError as exc:
        print(f"w2s: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("w2s: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `w2s config keys | head`
        return 0
