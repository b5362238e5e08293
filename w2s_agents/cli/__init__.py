"""The ``w2s`` command line.

Only commands that work are listed by ``w2s --help``. Every error caused by input (a bad config key, a
malformed file, a model path that is not a local directory, an unknown option) is printed as one line
``w2s: error: ...`` with exit status 2; no traceback. Commands that take ``KEY=VALUE`` overrides accept them
anywhere after the command, options included (``w2s run CONFIG --until trees run.seed=3``).

Each command group is a module that declares its subcommands and their handlers (``add_commands``); a handler
imports what it needs when it runs, so that ``w2s --help`` starts without the ML stack:

===========  ====================================================================================
``run``      ``w2s config show|keys``, ``w2s run`` (the whole pipeline), ``w2s report``
``sweep``    ``w2s sweep`` (a grid of runs: ablations, one table and plot)
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
from typing import NoReturn

from w2s_agents import __version__
from w2s_agents.cli import envs, model, rollout, run, search, store, sweep, train, tree, viz
from w2s_agents.errors import W2SError

__all__ = ["build_parser", "main"]

# in the order `w2s --help` lists them
_GROUPS = (run, sweep, model, envs, rollout, store, tree, search, viz, train)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line ``w2s: error: ...`` (exit status 2), like every
    other error of the command line; ``--help`` shows the usage."""

    def error(self, message: str) -> NoReturn:
        """Print ``message`` as one line naming the command, and exit with status 2."""
        command = "" if self.prog == "w2s" else f"{self.prog}: "
        self.exit(2, f"w2s: error: {command}{message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``w2s`` argument parser (exposed for documentation and tests).

    A command that takes ``KEY=VALUE`` overrides names the list that receives them with
    ``set_defaults(overrides_dest=...)``; :func:`main` adds the overrides written after its options there.
    """
    parser = _Parser(
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
    ns, extra = parser.parse_known_args(argv)
    if extra:
        # KEY=VALUE overrides after an option (`w2s run CONFIG --until trees run.seed=3`) are left over by
        # argparse, which gives a positional list only the arguments before the first option
        dest = getattr(ns, "overrides_dest", None)
        if dest is None or any("=" not in a or a.startswith("-") for a in extra):
            unknown = [a for a in extra if dest is None or "=" not in a or a.startswith("-")]
            parser_of = _command_parser(parser, ns)
            parser_of.error(f"unrecognized arguments: {' '.join(unknown)}")
        getattr(ns, dest).extend(extra)
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


def _command_parser(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)parser of the command that ``ns`` holds, for an error message naming the command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            name = getattr(ns, action.dest, None)
            if name in action.choices:
                return _command_parser(action.choices[name], ns)
    return parser
