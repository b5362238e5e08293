"""Search visualisation: offline HTML viewer pages of trajectory trees, run index pages, static figures.

==========  ==========================================================================================
``data``    what a page shows: :class:`VizConfig`, :func:`tree_view_data` (values, best paths, pairs),
            :func:`find_tree_files`
``rows``    the pair and SFT rows written by ``w2s search``: :func:`read_pair_rows`, :func:`read_path_rows`
``pages``   the HTML pages: :func:`render_tree_html`, :func:`render_run_index`, :func:`embed_json`
``static``  SVG / PNG figures of a tree's top levels: :func:`export_static`
``assets``  the pages' script and style (package data, inlined into every page)
==========  ==========================================================================================
"""

from .data import VALUE_COLORS, VIZ_SCHEMA, VizConfig, find_tree_files, tree_view_data
from .pages import TreeIndexEntry, embed_json, render_run_index, render_tree_html
from .rows import read_pair_rows, read_path_rows
from .static import export_static

__all__ = [
    "VALUE_COLORS",
    "VIZ_SCHEMA",
    "TreeIndexEntry",
    "VizConfig",
    "embed_json",
    "export_static",
    "find_tree_files",
    "read_pair_rows",
    "read_path_rows",
    "render_run_index",
    "render_tree_html",
    "tree_view_data",
]
