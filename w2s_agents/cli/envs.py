"""``w2s envs``: list the registered text envs and task suites, play a task, export expert demos."""

from __future__ import annotations

import argparse
import contextlib
import sys

from w2s_agents.errors import W2SError

__all__ = ["add_commands"]


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Declare ``w2s envs [list|suites|tasks|play|demos]`` (no subcommand lists the envs)."""
    p_envs = sub.add_parser(
        "envs",
        help="list, play and export demos of text environments",
        description="Without a subcommand: list the registered text envs, one a line (built-in and plugins).",
    )
    p_envs.set_defaults(func=_cmd_envs_list)
    envs_sub = p_envs.add_subparsers(dest="envs_command", metavar="SUBCOMMAND")
    p = envs_sub.add_parser("list", help="list the registered text envs, one a line")
    p.set_defaults(func=_cmd_envs_list)
    p = envs_sub.add_parser("suites", help="list the task suites, one a line")
    p.set_defaults(func=_cmd_envs_suites)
    p = envs_sub.add_parser("tasks", help="list the task ids of a suite split")
    p.add_argument("suite")
    p.add_argument("--split", default="train", choices=["train", "valid", "test"])
    p.set_defaults(func=_cmd_envs_tasks)
    p = envs_sub.add_parser(
        "play",
        help="play a task in the terminal (commands from stdin, with line editing and history in a terminal; "
        "'quit' or end of input stops)",
    )
    p.add_argument("env_id", metavar="ID", help="env id, e.g. w2s/TextWorld-v0")
    p.add_argument("--task", default=None, help="task id, e.g. tw-simple/train/0 or boil/0")
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--show-admissible", action="store_true", help="print the admissible commands each turn")
    p.add_argument("--no-admissible", action="store_true", help="do not compute admissible commands")
    p.add_argument("--cache-dir", default=None, help="game cache folder (TextWorld)")
    p.set_defaults(func=_cmd_envs_play)
    p = envs_sub.add_parser(
        "demos",
        help="write the expert trajectories of a suite split to a .jsonl file (exit 1 if one fails to win)",
    )
    p.add_argument("suite", help="task suite, e.g. tw-simple (see `w2s envs suites`)")
    p.add_argument("--split", default="train", choices=["train", "valid", "test"])
    p.add_argument("-o", "--out", required=True, metavar="FILE", help="trajectory .jsonl file (appended)")
    p.add_argument("--limit", type=int, default=None, help="only the first N tasks")
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--no-admissible", action="store_true", help="do not record admissible commands")
    p.add_argument("--cache-dir", default=None, help="TextWorld game cache folder")
    p.set_defaults(func=_cmd_envs_demos)


def _env_kwargs(ns: argparse.Namespace) -> dict:
    """Constructor arguments from the command line: only those given, so plugin envs need not accept them."""
    kwargs: dict = {"max_steps": ns.max_steps}
    if ns.no_admissible:
        kwargs["admissible_commands"] = False
    if ns.cache_dir:
        kwargs["cache_dir"] = ns.cache_dir
    return kwargs


def _cmd_envs_list(ns: argparse.Namespace) -> int:
    from w2s_agents.envs import registered_envs

    for entry in registered_envs():
        print(f"{entry.env_id}  {entry.entry_point}  ({entry.source})")
    return 0


def _cmd_envs_suites(ns: argparse.Namespace) -> int:
    from w2s_agents.envs.suites import EnvSuite, TextWorldExpressSuite, TextWorldSuite, get_suite, suite_names

    for name in suite_names():
        try:
            suite = get_suite(name)
        except W2SError as exc:  # a broken plugin suite: the others are still listed
            print(f"w2s: warning: {exc}", file=sys.stderr)
            continue
        if isinstance(suite, (TextWorldSuite, TextWorldExpressSuite)):
            sizes = " / ".join(f"{suite.sizes.get(s, 0)} {s}" for s in ("train", "valid", "test"))
        elif isinstance(suite, EnvSuite):
            sizes = " / ".join(
                f"{len(suite.tasks[s]) if s in suite.tasks else 'env'} {s}"
                for s in ("train", "valid", "test")
            )
        else:
            sizes = (
                " / ".join(
                    f"{'all' if suite.sizes.get(s) is None else suite.sizes[s]} {s}"
                    for s in ("train", "valid", "test")
                )
                + " variations per task"
            )
        print(f"{name}  {suite.env_id}  {sizes}  {suite.description}")
    return 0


def _cmd_envs_tasks(ns: argparse.Namespace) -> int:
    from w2s_agents.envs.demos import suite_task_ids

    for task_id in suite_task_ids(ns.suite, ns.split):
        print(task_id)
    return 0


def _read_command() -> str | None:
    """The next command typed at the ``> `` prompt, ``None`` at the end of input."""
    try:
        return input("> ")
    except EOFError:
        return None


def _cmd_envs_play(ns: argparse.Namespace) -> int:
    from w2s_agents.envs import make_env

    if sys.stdin.isatty():
        # input() then edits the line and keeps the session's history (arrows, Ctrl-R); absent on some builds
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401
    env = make_env(ns.env_id, **_env_kwargs(ns))
    try:
        obs, info = env.reset(options={"task": ns.task} if ns.task else None)
        instruction = str(info.get("instruction") or "").strip()
        # most games state their goal in the first observation already: print it once
        header = f"# {info['task_id']}"
        print(header if not instruction or instruction in obs else f"{header}: {instruction}")
        print(obs.rstrip())
        total = 0.0
        while True:
            if info.get("admissible_commands") and ns.show_admissible:
                print(f"[admissible: {' | '.join(info['admissible_commands'])}]")
            line = _read_command()
            if line is None or line.strip().lower() in ("quit", "exit", "q"):
                print()
                break
            obs, reward, terminated, truncated, info = env.step(line)
            total += reward
            print(obs.rstrip())
            if reward:
                print(f"[reward {reward:+.3f}, score {info['score']:.3f}]")
            if terminated or truncated:
                end = "won" if info["won"] else "lost" if info["lost"] else "step limit reached"
                print(f"[{end} after {info['moves']} steps, return {total:.3f}]")
                break
    finally:
        env.close()
    return 0


def _cmd_envs_demos(ns: argparse.Namespace) -> int:
    from w2s_agents.envs.demos import export_demos

    kwargs = {"cache_dir": ns.cache_dir} if ns.cache_dir else {}
    written, won = export_demos(
        ns.suite,
        ns.split,
        ns.out,
        limit=ns.limit,
        max_steps=ns.max_steps,
        admissible_commands=not ns.no_admissible,
        **kwargs,
    )
    print(f"{ns.out}: wrote {written} expert trajectories of {ns.suite}/{ns.split} ({won} won)")
    return 0 if won == written else 1
