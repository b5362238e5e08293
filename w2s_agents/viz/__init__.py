"""Search visualisation: offline HTML viewer pages of trajectory trees, run index pages, static figures."""

from .page import (
    VALUE_COLORS,
    VIZ_SCHEMA,
    TreeIndexEntry,
    VizConfig,
    embed_json,
    export_static,
    find_tree_files,
    read_pair_rows,
    read_path_rows,
    render_run_index,
    render_tree_html,
    tree_view_data,
)

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
