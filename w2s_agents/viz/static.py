"""Static figures of a tree's top levels for papers and reports: SVG written directly, PNG drawn with matplotlib
(imported only when a PNG is asked for). :func:`export_static` lays the nodes out left to right and colours
them on the viewer's scale (:data:`~w2s_agents.viz.VALUE_COLORS`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal
from xml.sax.saxutils import escape as _xml_escape

import numpy as np

from w2s_agents.atomic import atomic_write
from w2s_agents.search import SearchConfig, ValueKind
from w2s_agents.tree import ROOT, TrajectoryTree
from w2s_agents.viz.data import NO_VALUE_COLOR, VALUE_COLORS, VizConfig, tree_and_file, tree_view_data
from w2s_agents.viz.pages import write_text_file

__all__ = ["export_static"]

logger = logging.getLogger(__name__)

StaticFormat = Literal["svg", "png"]


@dataclass
class _Box:
    """A node of a static figure: a tree node, or the ``+N more`` stand-in for children left out."""

    node: int  # tree node id; -1 for a stand-in
    parent: int  # index of the parent box, -1 for the root
    depth: int
    label: str
    visits: int
    value: float  # NaN when unknown
    outcome: str = ""  # "", "won", "failed" or "mixed" (how the trajectories that ended here ended)
    best: bool = False
    chosen: bool = False
    rejected: bool = False
    merged: bool = False  # its game state was reached by another node too (a merged state)
    below: int = 0  # children not drawn because of the depth limit
    inner: bool = False  # has drawn children (its label goes above it, clear of the edges)
    x: float = 0.0
    y: float = 0.0
    r: float = 0.0


def _color(v: float) -> str:
    """Colour of value ``v`` on :data:`VALUE_COLORS` (clamped to [0, 1]; grey for NaN)."""
    if v != v:
        return NO_VALUE_COLOR
    v = min(max(v, 0.0), 1.0)
    lo, hi, t = (0, 1, v * 2) if v <= 0.5 else (1, 2, v * 2 - 1)
    a = [int(VALUE_COLORS[lo][i : i + 2], 16) for i in (1, 3, 5)]
    b = [int(VALUE_COLORS[hi][i : i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(x + (y - x) * t):02x}" for x, y in zip(a, b, strict=True))


def _cut(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _outcome(ends: Mapping[str, int]) -> str:
    if not ends:
        return ""
    won = ends.get("won", 0)
    if won == sum(ends.values()):
        return "won"
    return "mixed" if won else "failed"


@dataclass(frozen=True)
class _Figure:
    boxes: list[_Box]
    width: float
    height: float
    title: str
    subtitle: str
    legend_y: float
    merged: bool = False  # some drawn node is in a merged state (the legend explains the outline)


_ROW = 22.0  # pixels per leaf row
_TOP = 56.0
_LEFT = 16.0
_CHAR = 6.4  # approximate width of a label character at 11 px


def _static_figure(tree: TrajectoryTree, data: Mapping[str, Any], cfg: VizConfig) -> _Figure:
    """Boxes of the top ``cfg.depth`` levels (preorder) placed left to right: one row per leaf box, a parent
    centred on its drawn children."""
    color = data["meta"]["color"]
    values = data["values"][color]
    best = {n for p in data["best_paths"] for n in p}
    chosen = {p[1] for p in data["pairs"]}
    rejected = {p[2] for p in data["pairs"]}
    groups = data["state_group"]
    boxes: list[_Box] = []
    kids_of: list[list[int]] = []

    def visit(node: int, parent: int) -> None:
        depth = tree.depth(node)
        v = values[node]
        box = _Box(
            node, parent, depth, _cut(tree.task_id if node == ROOT else tree.action(node), cfg.label_chars),
            tree.visits(node), math.nan if v is None else float(v), _outcome(tree.terminal(node)),
            node in best, node in chosen, node in rejected, groups[node] >= 0,
        )  # fmt: skip
        i = len(boxes)
        boxes.append(box)
        kids_of.append([])
        if parent >= 0:
            kids_of[parent].append(i)
        children = tree.children(node)
        if depth >= cfg.depth:
            box.below = len(children)
            return
        ranked = sorted(children, key=lambda c: (-tree.visits(c), c))
        shown = ranked[: cfg.max_children]
        extra_best = [c for c in ranked[cfg.max_children :] if c in best]
        if extra_best:  # the best path stays in view even through a rarely visited child
            shown = [*shown[: cfg.max_children - 1], extra_best[0]]
        rest = [c for c in children if c not in shown]
        for c in sorted(shown):
            visit(c, i)
        if rest:
            j = len(boxes)
            boxes.append(
                _Box(-1, i, depth + 1, f"+{len(rest)} more", sum(tree.visits(c) for c in rest), math.nan)
            )
            kids_of.append([])
            kids_of[i].append(j)

    visit(ROOT, -1)
    row = 0
    for i, box in enumerate(boxes):
        if not kids_of[i]:
            box.y = _TOP + row * _ROW
            row += 1
    for i in range(len(boxes) - 1, -1, -1):
        if kids_of[i]:
            boxes[i].inner = True
            boxes[i].y = (boxes[kids_of[i][0]].y + boxes[kids_of[i][-1]].y) / 2
    level = cfg.label_chars * _CHAR + 120
    root_visits = max(tree.visits(ROOT), 1)
    for box in boxes:
        box.x = _LEFT + 10 + box.depth * level
        box.r = 3.0 + 6.0 * math.sqrt(min(box.visits / root_visits, 1.0))
    max_depth = max(b.depth for b in boxes)
    width = _LEFT + 10 + max_depth * level + cfg.label_chars * _CHAR + 140
    legend_y = _TOP + max(row - 1, 0) * _ROW + 30
    label = data["meta"]["value_labels"][color]
    subtitle = (
        f"{tree.summary().nodes} nodes, {tree.visits(ROOT)} trajectories; top {cfg.depth} levels, at most "
        f"{cfg.max_children} children each; colour: {label}; thick edges: best path"
    )
    merged = any(b.merged for b in boxes)
    return _Figure(boxes, max(width, 640.0), legend_y + 40, tree.task_id, subtitle, legend_y, merged)


_MARK = {"won": ("\u2713", "#1a9850"), "failed": ("\u2717", "#d73027"), "mixed": ("\u25d0", "#e08214")}
_CHOSEN_RING = "#2166ac"
_HALO = 'stroke="#ffffff" stroke-width="3" stroke-linejoin="round" paint-order="stroke"'
_REJECTED_RING = "#c51b7d"
_MERGED_OUTLINE = "#7b3294"  # a thin ring just outside the circle: the node's game state is a merged one


def _svg(fig: _Figure) -> str:
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{fig.width:.0f}" height="{fig.height:.0f}" '
        f'viewBox="0 0 {fig.width:.0f} {fig.height:.0f}" font-family="DejaVu Sans, Arial, sans-serif">',
        '<rect width="100%" height="100%" fill="#ffffff"/>',
        f'<text x="{_LEFT}" y="22" font-size="15" font-weight="bold">{_xml_escape(fig.title)}</text>',
        f'<text x="{_LEFT}" y="40" font-size="11" fill="#555555">{_xml_escape(fig.subtitle)}</text>',
        '<g fill="none">',
    ]
    boxes = fig.boxes
    for b in boxes:
        if b.parent < 0:
            continue
        p = boxes[b.parent]
        mx = (p.x + b.x) / 2
        on_best = p.best and b.best
        stroke, width = ("#222222", 3.0) if on_best else ("#a0a0a0", 1.0)
        out.append(
            f'<path d="M{p.x + p.r:.1f},{p.y:.1f} C{mx:.1f},{p.y:.1f} {mx:.1f},{b.y:.1f} {b.x - b.r:.1f},{b.y:.1f}" '
            f'stroke="{stroke}" stroke-width="{width}"/>'
        )
    out.append("</g>")
    for b in boxes:
        if b.node < 0:
            out.append(
                f'<text x="{b.x - 4:.1f}" y="{b.y + 4:.1f}" font-size="11" fill="#777777" font-style="italic">'
                f"{_xml_escape(b.label)} (n={b.visits})</text>"
            )
            continue
        stroke = ' stroke="#222222" stroke-width="2"' if b.best else ' stroke="#555555" stroke-width="0.6"'
        out.append(f'<circle cx="{b.x:.1f}" cy="{b.y:.1f}" r="{b.r:.1f}" fill="{_color(b.value)}"{stroke}/>')
        if b.merged:
            out.append(f'<circle cx="{b.x:.1f}" cy="{b.y:.1f}" r="{b.r + 1.6:.1f}" fill="none" '
                       f'stroke="{_MERGED_OUTLINE}" stroke-width="0.9"/>')  # fmt: skip
        if b.chosen:
            out.append(f'<circle cx="{b.x:.1f}" cy="{b.y:.1f}" r="{b.r + 3:.1f}" fill="none" '
                       f'stroke="{_CHOSEN_RING}" stroke-width="1.8"/>')  # fmt: skip
        if b.rejected:
            out.append(f'<circle cx="{b.x:.1f}" cy="{b.y:.1f}" r="{b.r + 5.5:.1f}" fill="none" '
                       f'stroke="{_REJECTED_RING}" stroke-width="1.5" stroke-dasharray="3,2"/>')  # fmt: skip
        x, y = (b.x - b.r, b.y - b.r - 4) if b.inner else (b.x + b.r + 7, b.y + 4)
        weight = ' font-weight="bold"' if b.best else ""
        stats = f"n={b.visits}" + ("" if b.value != b.value else f" v={b.value:.2f}")
        parts = [f"<tspan{weight}>{_xml_escape(b.label)}</tspan>"]
        if b.outcome:
            sym, col = _MARK[b.outcome]
            parts.append(f' <tspan fill="{col}" font-weight="bold">{sym}</tspan>')
        parts.append(
            f' <tspan fill="#777777" font-size="9">{stats}{f" +{b.below} below" if b.below else ""}</tspan>'
        )
        out.append(f'<text x="{x:.1f}" y="{y:.1f}" font-size="11" {_HALO}>{"".join(parts)}</text>')
    # legend
    y = fig.legend_y
    out.append('<defs><linearGradient id="w2s-scale">'
               + "".join(f'<stop offset="{i * 50}%" stop-color="{c}"/>' for i, c in enumerate(VALUE_COLORS))
               + "</linearGradient></defs>")  # fmt: skip
    out.append(
        f'<rect x="{_LEFT}" y="{y:.1f}" width="160" height="10" fill="url(#w2s-scale)" stroke="#555555" stroke-width="0.5"/>'
    )
    for i, lab in enumerate(("0", "0.5", "1")):
        out.append(
            f'<text x="{_LEFT + i * 80:.1f}" y="{y + 24:.1f}" font-size="10" text-anchor="middle">{lab}</text>'
        )
    x0 = _LEFT + 190
    out.append(
        f'<circle cx="{x0}" cy="{y + 5:.1f}" r="5" fill="{NO_VALUE_COLOR}" stroke="#555555" stroke-width="0.6"/>'
    )
    out.append(f'<text x="{x0 + 9}" y="{y + 9:.1f}" font-size="10">no value</text>')
    x0 += 70
    out.append(
        f'<circle cx="{x0}" cy="{y + 5:.1f}" r="5" fill="#ffffff" stroke="{_CHOSEN_RING}" stroke-width="1.8"/>'
    )
    out.append(f'<text x="{x0 + 9}" y="{y + 9:.1f}" font-size="10">chosen (TreeDPO)</text>')
    x0 += 110
    out.append(
        f'<circle cx="{x0}" cy="{y + 5:.1f}" r="5" fill="#ffffff" stroke="{_REJECTED_RING}" stroke-width="1.5" stroke-dasharray="3,2"/>'
    )
    out.append(f'<text x="{x0 + 9}" y="{y + 9:.1f}" font-size="10">rejected</text>')
    x0 += 70
    if fig.merged:
        out.append(
            f'<circle cx="{x0}" cy="{y + 5:.1f}" r="5" fill="#ffffff" '
            f'stroke="{_MERGED_OUTLINE}" stroke-width="0.9"/>'
        )
        out.append(f'<text x="{x0 + 9}" y="{y + 9:.1f}" font-size="10">same state as another node</text>')
        x0 += 150
    out.append(f'<text x="{x0}" y="{y + 9:.1f}" font-size="10"><tspan fill="#1a9850" font-weight="bold">\u2713</tspan> won '
               f'<tspan fill="#d73027" font-weight="bold">\u2717</tspan> failed '
               f'<tspan fill="#e08214" font-weight="bold">\u25d0</tspan> mixed (trajectories ending there); '
               "size: visits; n: visits, v: value</text>")  # fmt: skip
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _png(fig: _Figure, path: Path, dpi: int) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle, PathPatch
    from matplotlib.path import Path as MPath
    from matplotlib.patheffects import withStroke

    w, h = fig.width, fig.height
    figure = Figure(figsize=(w / 100, h / 100), dpi=dpi)
    FigureCanvasAgg(figure)
    ax = figure.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.axis("off")
    pt = 0.72  # points per pixel of the layout (100 layout pixels = 1 inch = 72 points)
    halo = [withStroke(linewidth=3 * pt, foreground="white")]

    def text(x: float, y: float, s: str, size: float, **kw: Any) -> None:
        ax.text(x, y, s, fontsize=size * pt, va="center", parse_math=False, **kw)

    text(_LEFT, 18, fig.title, 15, fontweight="bold")
    text(_LEFT, 37, fig.subtitle, 11, color="#555555")
    boxes = fig.boxes
    for b in boxes:
        if b.parent < 0:
            continue
        p = boxes[b.parent]
        mx = (p.x + b.x) / 2
        verts = [(p.x + p.r, p.y), (mx, p.y), (mx, b.y), (b.x - b.r, b.y)]
        best = p.best and b.best
        ax.add_patch(PathPatch(MPath(verts, [MPath.MOVETO, MPath.CURVE4, MPath.CURVE4, MPath.CURVE4]),
                               fill=False, edgecolor="#222222" if best else "#a0a0a0",
                               linewidth=(3.0 if best else 1.0) * pt))  # fmt: skip
    for b in boxes:
        if b.node < 0:
            text(b.x - 4, b.y, f"{b.label} (n={b.visits})", 11, color="#777777", style="italic")
            continue
        ax.add_patch(Circle((b.x, b.y), b.r, facecolor=_color(b.value),
                            edgecolor="#222222" if b.best else "#555555",
                            linewidth=(2.0 if b.best else 0.6) * pt))  # fmt: skip
        if b.merged:
            ax.add_patch(
                Circle((b.x, b.y), b.r + 1.6, fill=False, edgecolor=_MERGED_OUTLINE, linewidth=0.9 * pt)
            )
        if b.chosen:
            ax.add_patch(Circle((b.x, b.y), b.r + 3, fill=False, edgecolor=_CHOSEN_RING, linewidth=1.8 * pt))
        if b.rejected:
            ax.add_patch(Circle((b.x, b.y), b.r + 5.5, fill=False, edgecolor=_REJECTED_RING,
                                linewidth=1.5 * pt, linestyle=(0, (3, 2))))  # fmt: skip
        stats = f"n={b.visits}" + ("" if b.value != b.value else f" v={b.value:.2f}")
        if b.below:
            stats += f" +{b.below} below"
        x, y = (b.x - b.r, b.y - b.r - 8) if b.inner else (b.x + b.r + 7, b.y)
        t = ax.text(x, y, b.label, fontsize=11 * pt, va="center", parse_math=False, path_effects=halo,
                    fontweight="bold" if b.best else "normal")  # fmt: skip
        if b.outcome:
            sym, col = _MARK[b.outcome]
            t = ax.annotate(" " + sym, xycoords=t, xy=(1, 0.5), va="center", fontsize=11 * pt, color=col,
                            fontweight="bold", annotation_clip=False, path_effects=halo)  # fmt: skip
        ax.annotate(" " + stats, xycoords=t, xy=(1, 0.5), va="center", fontsize=9 * pt, color="#777777",
                    annotation_clip=False, path_effects=halo)  # fmt: skip
    y = fig.legend_y
    cmap = LinearSegmentedColormap.from_list("w2s", list(VALUE_COLORS))
    ax.imshow(
        np.linspace(0, 1, 256)[None, :], cmap=cmap, extent=(_LEFT, _LEFT + 160, y + 10, y), aspect="auto"
    )
    for i, lab in enumerate(("0", "0.5", "1")):
        text(_LEFT + i * 80, y + 20, lab, 10, ha="center")
    x0 = _LEFT + 190
    ax.add_patch(Circle((x0, y + 5), 5, facecolor=NO_VALUE_COLOR, edgecolor="#555555", linewidth=0.6 * pt))
    text(x0 + 9, y + 5, "no value", 10)
    x0 += 70
    ax.add_patch(Circle((x0, y + 5), 5, fill=False, edgecolor=_CHOSEN_RING, linewidth=1.8 * pt))
    text(x0 + 9, y + 5, "chosen (TreeDPO)", 10)
    x0 += 110
    ax.add_patch(Circle((x0, y + 5), 5, fill=False, edgecolor=_REJECTED_RING, linewidth=1.5 * pt,
                        linestyle=(0, (3, 2))))  # fmt: skip
    text(x0 + 9, y + 5, "rejected", 10)
    x0 += 70
    if fig.merged:
        ax.add_patch(Circle((x0, y + 5), 5, fill=False, edgecolor=_MERGED_OUTLINE, linewidth=0.9 * pt))
        text(x0 + 9, y + 5, "same state as another node", 10)
        x0 += 150
    text(x0, y + 5, "\u2713 won  \u2717 failed  \u25d0 mixed (trajectories ending there); size: visits; "
         "n: visits, v: value", 10)  # fmt: skip
    with atomic_write(path) as fh:  # a text handle: write the bytes through its buffer
        figure.savefig(fh.buffer, format="png", dpi=dpi, facecolor="white")
        fh.buffer.flush()
    path.chmod(0o644)


def export_static(
    tree: TrajectoryTree | str | os.PathLike[str],
    path: str | os.PathLike[str],
    format: StaticFormat | None = None,
    depth: int | None = None,
    *,
    search: SearchConfig | None = None,
    value: ValueKind | None = None,
    pairs: str | os.PathLike[str] | Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    paths: str | os.PathLike[str] | Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    config: VizConfig | None = None,
    dpi: int = 200,
) -> Path:
    """Draw the top levels of a tree as a static figure (for papers and reports); returns the path written.

    The root is on the left, each level to the right of its parent; a node's circle is coloured by the value
    of ``config.color`` and sized by visits, the best path is drawn with thick edges and bold labels, chosen
    and rejected children of TreeDPO pairs are ringed, and the outcomes of trajectories ending at a node are
    marked; a node whose game state another node reached too (a merged state) has a thin purple outline. Per
    node at most ``config.max_children`` children are drawn (most visited first, the best path's child always);
    the rest are one ``+N more`` node.

    Args:
        format: ``"svg"`` (written directly) or ``"png"`` (matplotlib); default from ``path``'s suffix.
        depth: levels below the root to draw (default ``config.depth``).
        dpi: resolution of a PNG.
        search, value, pairs, paths: as :func:`tree_view_data`.

    Raises:
        DataFormatError: the tree file, or a pair / SFT row, is invalid.
        ValueError: an unknown format.
    """
    cfg = config or VizConfig()
    if depth is not None:
        cfg = replace(cfg, depth=depth)
    out = Path(path)
    fmt = format or out.suffix.lstrip(".").lower()
    if fmt not in ("svg", "png"):
        raise ValueError(f"unknown figure format {fmt!r} (expected svg or png)")
    if dpi < 10:
        raise ValueError(f"dpi must be at least 10, got {dpi}")
    tree, _ = tree_and_file(tree)
    data = tree_view_data(tree, search=search, value=value, pairs=pairs, paths=paths, config=cfg)
    fig = _static_figure(tree, data, cfg)
    if fmt == "svg":
        write_text_file(out, _svg(fig))
    else:
        _png(fig, out, dpi)
    logger.debug("wrote %s (%d nodes drawn)", out, len(fig.boxes))
    return out
