"""``w2s store``: check and repair trajectory files."""

from __future__ import annotations

import argparse
import statistics
from collections import Counter
from pathlib import Path

from w2s_agents.errors import W2SError

__all__ = ["add_commands"]


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Declare ``w2s store check``."""
    p_store = sub.add_parser("store", help="check trajectory files")
    store_sub = p_store.add_subparsers(dest="store_command", metavar="SUBCOMMAND", required=True)
    p = store_sub.add_parser(
        "check",
        help="validate trajectory .jsonl files and summarise them (exit 1 on a torn record or duplicates)",
    )
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--repair", action="store_true", help="remove a torn last record left by a killed writer")
    p.set_defaults(func=_cmd_store_check)


def _cmd_store_check(ns: argparse.Namespace) -> int:
    from w2s_agents.store import TrajectoryStore, read_trajectories, scan_store

    status = 0
    for name in ns.files:
        path = Path(name)
        if not path.is_file():
            raise W2SError(f"trajectory file not found: {path}")
        scan = scan_store(path)
        if scan.torn_bytes:
            if ns.repair:
                TrajectoryStore(path, fsync=True, allow_duplicates=True).close()
                print(f"{path}: removed a torn last record ({scan.torn_bytes} bytes)")
            else:
                print(f"{path}: torn last record ({scan.torn_bytes} bytes); run with --repair to remove it")
                status = 1
        trajs = list(read_trajectories(path))
        n = len(trajs)
        if n == 0:
            print(f"{path}: 0 trajectories")
            continue
        roles = Counter(t.source.role for t in trajs)
        ends = Counter(t.end for t in trajs)
        print(
            f"{path}: {n} trajectories, {len({t.task_id for t in trajs})} tasks, "
            f"success {sum(t.success for t in trajs) / n:.3f}, "
            f"mean return {statistics.fmean(t.return_ for t in trajs):.3f}, "
            f"mean steps {statistics.fmean(t.num_steps for t in trajs):.1f}"
        )
        print(f"  roles: {dict(roles)}  ends: {dict(ends)}")
        if scan.duplicates:
            print(f"  {len(scan.duplicates)} duplicated episode keys, e.g. {scan.duplicates[0]}")
            status = 1
    return status
