"""``w2s viz``: viewer pages, run index pages and static figures of trees."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from w2s_agents.errors import W2SError

__all__ = ["add_commands"]


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Declare ``w2s viz``."""
    p = sub.add_parser(
        "viz",
        help="look at trees: an interactive offline HTML viewer, a run index, or static SVG/PNG figures",
        description="TREE.json: write one self-contained HTML viewer of the tree (default TREE.html beside it), or "
        "with --format svg|png a figure of its top levels. RUN_DIR: a viewer page for every tree of the run "
        "(RUN_DIR/trees/*.json, else any w2s.tree file below it) and an index page over them (default "
        "RUN_DIR/viz/index.html), or one figure per tree. The best path and the TreeDPO pairs are computed from "
        "the tree's values as `w2s search` does (SearchConfig: --search-config, --value, --margin) unless "
        "--paths / --pairs give the rows that `w2s search` wrote. Exit status 1 when a tree of a run could not "
        "be read (its error is printed and listed on the index).",
    )
    p.add_argument("target", metavar="TREE.json|RUN_DIR")
    p.add_argument(
        "-o", "--out", default=None, metavar="PATH",
        help="output file (a tree) or folder (a run); default beside the tree, or RUN_DIR/viz",
    )  # fmt: skip
    p.add_argument("--format", default="html", choices=["html", "svg", "png"], help="default html")
    p.add_argument("--pairs", default=None, metavar="pairs.jsonl", help="show these TreeDPO pair rows")
    p.add_argument(
        "--paths", default=None, metavar="sft.jsonl", help="show the paths of these SFT rows as best"
    )
    p.add_argument("--value", default=None, choices=["mcts", "mean", "max", "success"],
                   help="value of the computed best path and pairs (default: SearchConfig value, mcts; mean on "
                   "a tree without search values)")  # fmt: skip
    p.add_argument("--margin", type=float, default=None, help="smallest value gap of a computed pair")
    p.add_argument(
        "--search-config", default=None, metavar="YAML", help="SearchConfig values (as w2s search)"
    )
    p.add_argument("--color", default=None, choices=["mcts", "mean", "success", "max"], help="initial colour")
    p.add_argument("--expand-depth", type=int, default=None, help="levels expanded when the page opens")
    p.add_argument("--depth", type=int, default=None, help="figures: levels below the root drawn")
    p.add_argument("--max-children", type=int, default=None, help="figures: most children drawn per node")
    p.add_argument("--dpi", type=int, default=200, help="PNG resolution")
    p.add_argument("--title", default=None, help="page title (default: the task id)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a VizConfig setting")
    p.set_defaults(func=_cmd_viz)


def _cmd_viz(ns: argparse.Namespace) -> int:
    from w2s_agents.config import load_config
    from w2s_agents.search import SearchConfig
    from w2s_agents.tree import TrajectoryTree
    from w2s_agents.viz import (
        VizConfig,
        export_static,
        find_tree_files,
        read_pair_rows,
        read_path_rows,
        render_run_index,
        render_tree_html,
    )

    viz_over = list(ns.set)
    for key in ("depth", "max_children", "color", "expand_depth"):
        if getattr(ns, key) is not None:
            viz_over.append(f"{key}={getattr(ns, key)}")
    viz_cfg = load_config(VizConfig, None, viz_over)
    search_over = [f"{key}={getattr(ns, key)}" for key in ("margin",) if getattr(ns, key) is not None]
    search_cfg = load_config(SearchConfig, ns.search_config, search_over)
    target = Path(ns.target)
    fmt = ns.format
    if ns.dpi < 10:
        raise W2SError(f"--dpi must be at least 10, got {ns.dpi}")
    pairs = read_pair_rows(ns.pairs) if ns.pairs else None
    paths = read_path_rows(ns.paths) if ns.paths else None
    common = {"search": search_cfg, "value": ns.value, "pairs": pairs, "paths": paths, "config": viz_cfg}

    if target.is_file():
        tree = TrajectoryTree.load(target)
        out = Path(ns.out) if ns.out else target.with_suffix(f".{fmt}")
        if out.is_dir():
            out = out / target.with_suffix(f".{fmt}").name
        if fmt == "html":
            render_tree_html(tree, out, title=ns.title, file=str(target), **common)
        else:
            export_static(tree, out, fmt, dpi=ns.dpi, **common)
        print(f"{out}: {fmt} of task {tree.task_id} ({len(tree)} nodes, {out.stat().st_size:,} bytes)")
        return 0
    if not target.is_dir():
        raise W2SError(f"tree file or run folder not found: {target}")
    out_dir = Path(ns.out) if ns.out else target / "viz"
    if fmt == "html":
        index, entries = render_run_index(target, out_dir, **common)
        bad = [e for e in entries if e.error]
        for e in bad:
            print(f"w2s: error: {e.error}", file=sys.stderr)
        print(
            f"{index}: index of {len(entries) - len(bad)} tree pages"
            + (f" ({len(bad)} unreadable)" if bad else "")
        )
        return 1 if bad else 0
    status = 0
    files = find_tree_files(target, exclude=out_dir)
    if not files:
        raise W2SError(f"no tree files in run folder {target}")
    for f in files:
        try:
            tree = TrajectoryTree.load(f)
        except W2SError as exc:
            print(f"w2s: error: {exc}", file=sys.stderr)
            status = 1
            continue
        name = "__".join(f.relative_to(target).with_suffix("").parts)
        out = export_static(tree, out_dir / f"{name}.{fmt}", fmt, dpi=ns.dpi, **common)
        print(f"{out}: {fmt} of task {tree.task_id} ({len(tree)} nodes)")
    return status
