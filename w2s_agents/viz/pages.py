"""The viewer's HTML pages: one self-contained page per tree (:func:`render_tree_html`) and an index page over
the trees of a run (:func:`render_run_index`).

A page holds its data as JSON in a ``<script type="application/json">`` element (``<``, ``>``, ``&`` and
U+2028/U+2029 escaped by :func:`embed_json`, so no text can close the element); its script and style are
inlined from the package data files under ``w2s_agents/viz/assets/`` and allowed by a Content-Security-Policy
of their hashes only (no network, no other script). The script puts every text from envs and models into the
page with ``textContent``, never as markup.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from w2s_agents import __version__
from w2s_agents.atomic import atomic_write
from w2s_agents.errors import W2SError
from w2s_agents.log import progress
from w2s_agents.search import SearchConfig, ValueKind
from w2s_agents.tree import ROOT, TrajectoryTree
from w2s_agents.viz.data import VALUE_COLORS, VIZ_SCHEMA, VizConfig, find_tree_files, tree_view_data
from w2s_agents.viz.rows import read_pair_rows, read_path_rows

__all__ = [
    "TreeIndexEntry",
    "embed_json",
    "html_page",
    "render_run_index",
    "render_tree_html",
    "write_text_file",
]

logger = logging.getLogger(__name__)

_ASSETS = "assets"


def _asset(name: str) -> str:
    return (resources.files("w2s_agents.viz") / _ASSETS / name).read_text(encoding="utf-8")


_JSON_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_JSON_UNSAFE = re.compile("[<>&\u2028\u2029]")


def embed_json(data: Any) -> str:
    """``data`` as JSON safe to place inside a ``<script type="application/json">`` element: ``<``, ``>``,
    ``&``, U+2028 and U+2029 are written as ``\\uXXXX`` escapes, so no text can end the element."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return _JSON_UNSAFE.sub(lambda m: _JSON_ESCAPES[m.group()], text)


def write_text_file(path: Path, text: str) -> None:
    """Write atomically, readable by all (pages and figures are meant to be shared)."""
    with atomic_write(path) as fh:
        fh.write(text)
    path.chmod(0o644)


def _sha256(text: str) -> str:
    return base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")


def html_page(title: str, css_names: Sequence[str], js_name: str, data: Any, page_class: str) -> str:
    """The text of one self-contained page: the style assets ``css_names`` and the script asset ``js_name``
    (files under ``w2s_agents/viz/assets/``) inlined, ``data`` embedded as JSON (:func:`embed_json`), and a
    Content-Security-Policy that allows exactly that script and style (by hash) and nothing from the network.

    Raises:
        RuntimeError: an asset holds a sequence that would end its element (``</script``, ``<!--``, ...).
    """
    css = "\n".join(_asset(name) for name in css_names)
    js = _asset(js_name)
    for name, code in ((js_name, js), ("css", css)):
        if re.search(r"</?(script|style)|<!--", code, re.IGNORECASE):
            raise RuntimeError(f"viewer asset {name} contains a sequence that would end its element")
    csp = (
        "default-src 'none'; "
        f"script-src 'sha256-{_sha256(js)}'; "
        f"style-src 'sha256-{_sha256(css)}'; "
        "img-src data:; base-uri 'none'; form-action 'none'"
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{html.escape(csp, quote=False)}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f'<meta name="generator" content="w2s-agents {__version__}">\n'
        f"<title>{html.escape(title)}</title>\n"
        f"<style>{css}</style>\n</head>\n"
        f'<body class="{page_class}">\n'
        '<noscript><p class="noscript">This page needs JavaScript (it runs offline; nothing is fetched).</p></noscript>\n'
        f'<script type="application/json" id="w2s-data">{embed_json(data)}</script>\n'
        f"<script>{js}</script>\n"
        "</body>\n</html>\n"
    )


def render_tree_html(
    tree: TrajectoryTree | str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    search: SearchConfig | None = None,
    value: ValueKind | None = None,
    pairs: str | os.PathLike[str] | Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    paths: str | os.PathLike[str] | Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    config: VizConfig | None = None,
    title: str | None = None,
    index_href: str | None = None,
    file: str | None = None,
) -> Path:
    """Write the interactive viewer of one tree as one self-contained HTML file (atomically); returns its path.

    Arguments as :func:`tree_view_data`. The page works offline (no network access at all: its policy
    forbids it) and shows every text of the tree as text.

    Raises:
        DataFormatError: the tree file, or a pair / SFT row, is invalid or does not match the tree.
        W2SError: ``value="mcts"`` on a tree without search values.
    """
    data = tree_view_data(
        tree, search=search, value=value, pairs=pairs, paths=paths, config=config, title=title,
        index_href=index_href, file=file,
    )  # fmt: skip
    page = html_page(f"{data['meta']['title']} - w2s tree", ["viewer.css"], "tree.js", data, "w2s-tree")
    out = Path(out_path)
    write_text_file(out, page)
    logger.debug("wrote %s (%d nodes, %d bytes)", out, data["n"], len(page.encode("utf-8")))
    return out


@dataclass(frozen=True)
class TreeIndexEntry:
    """One tree of a run index: its file, page and summary, or the error that kept it out."""

    file: str
    """Tree file, relative to the run folder."""
    page: str | None
    """Viewer page, relative to the index page (None when the tree could not be read)."""
    error: str | None = None
    summary: Mapping[str, Any] | None = None
    """:class:`~w2s_agents.tree.TreeSummary` fields."""
    value: str = ""
    """Value kind of the best path and pairs."""
    best_steps: int = 0
    """Actions on the best path."""
    best_value: float | None = None
    """Value of the best path's last node."""
    best_return: float | None = None
    """Mean return of the trajectories through the best path's last node."""
    pairs: int = 0
    """TreeDPO pairs (chosen, rejected) shown on the page."""
    searched: bool = False
    """Whether the tree holds MCTS values."""
    iterations: int | None = None
    """MCTS simulations of the last search."""


_PAGE_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _page_name(rel: Path, taken: set[str]) -> str:
    stem = "__".join(rel.with_suffix("").parts)
    name = _PAGE_UNSAFE.sub("_", stem).strip("._")[:100] or "tree"
    if name.lower() in taken or name.lower() == "index":
        name = f"{name}-{hashlib.sha1(str(rel).encode()).hexdigest()[:8]}"
    taken.add(name.lower())
    return name + ".html"


def render_run_index(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    search: SearchConfig | None = None,
    value: ValueKind | None = None,
    pairs: str | os.PathLike[str] | Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    paths: str | os.PathLike[str] | Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    config: VizConfig | None = None,
) -> tuple[Path, list[TreeIndexEntry]]:
    """Write a viewer page for every tree of a run and an index page over them; returns the index's path and
    one entry per tree file found (see :func:`find_tree_files`).

    Pages go to ``out_dir`` (default ``run_dir/viz``), the index as ``out_dir/index.html`` and each tree's page
    beside it, linked from it. A tree that cannot be shown (its file is invalid, rows of ``pairs`` / ``paths``
    do not fit it, or ``value="mcts"`` on a tree without search values) is listed on the index with its error
    (one line naming the file and the problem) and gets no page; the caller decides whether that is a failure.
    ``pairs`` / ``paths`` (files, or what :func:`read_pair_rows` / :func:`read_path_rows` return) hold the rows
    of all the run's tasks; each page shows those of its own.

    Raises:
        W2SError: ``run_dir`` is not a folder or holds no tree file.
        DataFormatError: a ``pairs`` / ``paths`` file is invalid.
    """
    root = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else root / "viz"
    files = find_tree_files(root, exclude=out)
    if not files:
        raise W2SError(
            f"no tree files in run folder {root} (looked for trees/*.json, then w2s.tree files below it)"
        )
    pair_rows = read_pair_rows(pairs) if isinstance(pairs, (str, os.PathLike)) else pairs
    path_rows = read_path_rows(paths) if isinstance(paths, (str, os.PathLike)) else paths
    entries: list[TreeIndexEntry] = []
    taken: set[str] = set()
    for f in progress(files, desc="tree pages", unit="tree"):
        rel = f.relative_to(root)
        try:
            tree = TrajectoryTree.load(f)
            page = _page_name(rel, taken)
            data = tree_view_data(
                tree, search=search, value=value, pairs=pair_rows, paths=path_rows, config=config,
                index_href="index.html", file=str(rel),
            )  # fmt: skip
            write_text_file(
                out / page,
                html_page(f"{tree.task_id} - w2s tree", ["viewer.css"], "tree.js", data, "w2s-tree"),
            )
        except W2SError as exc:  # the tree file, or rows of the pairs / paths files that do not fit it
            logger.debug("%s", exc)
            entries.append(TreeIndexEntry(file=str(rel), page=None, error=str(exc)))
            continue
        values = data["values"][data["meta"]["value"]]
        best = data["best_paths"][0] if data["best_paths"] else [ROOT]
        leaf = best[-1]
        entries.append(
            TreeIndexEntry(
                file=str(rel),
                page=page,
                summary=data["meta"]["summary"],
                value=data["meta"]["value"],
                best_steps=len(best) - 1,
                best_value=values[leaf],
                best_return=round(tree.mean_return(leaf), 4),
                pairs=len(data["pairs"]),
                searched=tree.search_arrays() is not None,
                iterations=tree.search_info.get("iterations"),
            )
        )
    index_data = {
        "schema": VIZ_SCHEMA,
        "meta": {"title": f"w2s trees: {root.resolve().name}", "run_dir": str(root), "version": __version__,
                 "scale": list(VALUE_COLORS)},
        "trees": [
            {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in e.__dict__.items()} for e in entries
        ],
    }  # fmt: skip
    index = out / "index.html"
    write_text_file(
        index, html_page(index_data["meta"]["title"], ["viewer.css"], "index.js", index_data, "w2s-index")
    )
    logger.debug("wrote %s (%d trees)", index, len(entries))
    return index, entries
