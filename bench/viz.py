"""Benchmark of the tree viewer in headless Chromium against a straightforward viewer, side by side in one run.

Data: a synthetic text game (rooms with ~300-character descriptions, 5 actions per room; the room is the state
key, so the nodes that reach one room by different histories are a merged state); a biased random weak agent
plays 12 steps per episode (three models) until the merged tree has at least ``--nodes`` nodes (20,000 by
default); the tree is searched (offline MCTS, 1,000 simulations) and written as a viewer page by
``render_tree_html`` (its best path stitched over the merged states, as ``SearchConfig`` does by default).

Baseline: the same embedded data drawn the obvious way, every node at once as nested ``<details>`` elements
(collapsed; the browser lays out what is open), search by scanning every row's text. Ours: rows for expanded
nodes only, and of those only the rows in view (a recycled pool).

Measured in one headless Chromium (Debian's ``chromium``, the flags of the tests), median of ``--repeat`` page
loads each:

* first render: from navigation start to the viewer's first complete render (``performance.now()`` at the end
  of its start-up; the page's DOM is built entirely by its script), and the first contentful paint;
* expand all: the click handler plus the next two animation frames (layout and paint);
* search: typing a frequent word and pressing Enter (matches found, their ancestors expanded, first selected),
  plus two frames;
* page size in bytes (and gzipped).

Run ``python bench/viz.py`` (``--nodes 20000 --repeat 5``), or ``--quick`` (5,000 nodes, 3 loads).
"""

from __future__ import annotations

import argparse
import gzip
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from w2s_agents.search import SearchConfig, search_tree
from w2s_agents.tree import TrajectoryTree
from w2s_agents.types import Source, Step, Trajectory
from w2s_agents.viz import render_tree_html, tree_view_data
from w2s_agents.viz.pages import html_page

CHROMIUM = os.environ.get("W2S_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TARGET_MS = 2000.0
QUERY = "open"  # an action word of many nodes: a search that expands much of the tree
WORDS = ["old", "wooden", "dusty", "narrow", "bright", "dark", "cold", "damp", "quiet", "large", "small", "broken", "shiny", "heavy", "red", "green", "blue", "table", "chair", "shelf", "lamp", "rug", "window", "door", "chest", "bottle", "book", "key", "coin", "knife", "box", "candle", "painting", "mirror"]  # fmt: skip
ACTIONS = ["go north", "go south", "go east", "go west", "take key", "take coin", "open chest", "open door",
           "look", "inventory", "examine table", "examine shelf", "put key in box", "light candle", "read book",
           "drop knife", "unlock door with key"]  # fmt: skip

# The straightforward viewer: every node as nested <details> built at once from the same data.
BASELINE_JS = r"""
(function () {
  var t0 = performance.now();
  var D = JSON.parse(document.getElementById("w2s-data").textContent);
  var N = D.n, S = D.strings, kids = [];
  for (var i = 0; i < N; i++) kids.push([]);
  for (i = 1; i < N; i++) kids[D.parent[i]].push(i);
  var nodes = new Array(N);
  function build(n) {
    var label = (n ? S[D.action[n]] : D.meta.task_id) + "  n=" + D.visits[n];
    if (!kids[n].length) { var d = document.createElement("div"); d.className = "leaf"; d.textContent = label; nodes[n] = d; return d; }
    var det = document.createElement("details"), sum = document.createElement("summary");
    sum.textContent = label; det.appendChild(sum); nodes[n] = det;
    return det;
  }
  // iterative preorder build (deep trees would overflow a recursive one)
  var root = build(0), stack = [0];
  while (stack.length) {
    var n = stack.pop();
    for (var k = 0; k < kids[n].length; k++) { var c = kids[n][k]; nodes[n].appendChild(build(c)); stack.push(c); }
  }
  root.open = true;
  document.body.appendChild(root);
  document.body.offsetHeight;
  var q = document.createElement("input"); q.id = "search"; document.body.insertBefore(q, root);
  q.addEventListener("keydown", function (ev) {
    if (ev.key !== "Enter") return;
    var needle = q.value.toLowerCase(), first = -1;
    for (var m = 1; m < N; m++) {
      var hit = S[D.action[m]].toLowerCase().indexOf(needle) >= 0;
      var el = nodes[m].tagName === "DETAILS" ? nodes[m].firstChild : nodes[m];
      el.classList.toggle("match", hit);
      if (hit) { if (first < 0) first = m; for (var p = D.parent[m]; p >= 0; p = D.parent[p]) nodes[p].open = true; }
    }
    if (first >= 0) nodes[first].scrollIntoView();
  });
  window.__expandAll = function () { for (var m = 0; m < N; m++) if (nodes[m].tagName === "DETAILS") nodes[m].open = true; };
  window.__w2s = { ready: true, readyAt: performance.now(), firstRenderMs: performance.now() - t0 };
  document.body.dataset.ready = "1";
})();
"""

FRAMES = (
    "() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r(performance.now()))))"
)


def make_tree(min_nodes: int, seed: int = 0) -> TrajectoryTree:
    """A searched tree of one synthetic game with at least ``min_nodes`` nodes."""
    rng = random.Random(seed)
    n_states = 60
    obs = []
    for s in range(n_states):
        words = []
        while sum(len(w) + 1 for w in words) < 280:
            words.append(rng.choice(WORDS))
        obs.append(f"-= Room {s} =- You are in a " + " ".join(words) + ".")
    trans = [
        [(a, rng.randrange(n_states), rng.random()) for a in rng.sample(ACTIONS, 5)] for _ in range(n_states)
    ]
    tree = TrajectoryTree("bench-viz/0", env_id="w2s/Bench-v0", instruction="Find the treasure.")
    episode = 0
    while len(tree) < min_nodes:
        for _ in range(200):
            state, steps, reached, won = 0, [], 0, False
            for t in range(12):
                action, state, _ = rng.choices(trans[state], [0.2 + w * w for _, _, w in trans[state]])[0]
                reached += state % 7 == 0
                won = state == n_states - 1
                steps.append(Step(action=action, observation=obs[state],
                                  thought=f"Step {t}: {action} looks promising in room {state}.",
                                  state_key=f"room {state}"))  # fmt: skip
                if won:
                    break
            ret = 1.0 if won else min(reached, 4) / 5
            source = Source(model=f"weak-{episode % 3}", role="weak", sampler=f"s{episode % 6}", seed=episode)
            tree.add(Trajectory("bench-viz/0", "w2s/Bench-v0", source, "Find the treasure.", obs[0], tuple(steps),
                                ret, won, "won" if won else "truncated", initial_state_key="room 0"))  # fmt: skip
            episode += 1
    tree.canonicalize()
    search_tree(tree, SearchConfig(iterations=1000))
    return tree


def measure(browser, path: Path, kind: str, query: str, repeat: int) -> dict[str, float]:
    """Median timings (ms) of ``repeat`` fresh loads of the page at ``path``."""
    loads, fcps, walls, expands, searches = [], [], [], [], []
    for _ in range(repeat):
        ctx = browser.new_context(viewport={"width": 1280, "height": 800})
        ctx.route(
            "**/*",
            lambda route: route.continue_() if route.request.url.startswith("file:") else route.abort(),
        )
        page = ctx.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e, errors=errors: errors.append(str(e)))
        t = time.perf_counter()
        page.goto(path.as_uri())
        page.wait_for_function("window.__w2s && window.__w2s.ready", timeout=120_000, polling=10)
        walls.append((time.perf_counter() - t) * 1000)
        ready_at = page.evaluate("window.__w2s.readyAt")
        loads.append(ready_at)
        page.evaluate(FRAMES)
        fcp = page.evaluate(
            "(performance.getEntriesByName('first-contentful-paint')[0] || {}).startTime || null"
        )
        fcps.append(fcp if fcp is not None else float("nan"))
        # search first (the tree is as it opened), then expand all, in fresh states of the same load
        searches.append(
            page.evaluate(
                """async ([q, frames]) => {
                    const input = document.getElementById('search');
                    const t = performance.now();
                    input.value = q;
                    input.dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter', bubbles: true}));
                    document.body.offsetHeight;
                    await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
                    return performance.now() - t;
                }""",
                [query, None],
            )
        )
        expands.append(
            page.evaluate(
                """async (ours) => {
                    const t = performance.now();
                    if (ours) document.getElementById('expand-all').click(); else window.__expandAll();
                    document.body.offsetHeight;
                    await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
                    return performance.now() - t;
                }""",
                kind == "ours",
            )
        )
        if errors:
            raise RuntimeError(f"{kind}: page errors: {errors}")
        ctx.close()
    med = statistics.median
    return {"first_render": med(loads), "fcp": med(fcps), "wall": med(walls), "expand_all": med(expands),
            "search": med(searches)}  # fmt: skip


def machine() -> str:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    try:
        chromium = subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True).stdout.strip()
    except OSError:
        chromium = "?"
    load = os.getloadavg()
    return (f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, load average {load[0]:.2f} / {load[1]:.2f} "
            f"(1 / 5 min), Python {platform.python_version()}, {chromium}, {platform.system()}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=20_000, help="smallest tree size")
    ap.add_argument("--repeat", type=int, default=5, help="page loads per viewer (median reported)")
    ap.add_argument("--quick", action="store_true", help="5,000 nodes, 3 loads")
    ap.add_argument("--keep", default=None, help="folder to keep the pages in")
    args = ap.parse_args(argv)
    if args.quick:
        args.nodes, args.repeat = 5_000, 3
    if not Path(CHROMIUM).exists():
        print(
            f"Chromium not found at {CHROMIUM} (run scripts/setup-chromium.sh or set W2S_CHROMIUM)",
            file=sys.stderr,
        )
        return 1
    from playwright.sync_api import sync_playwright

    print(f"machine: {machine()}")
    t = time.perf_counter()
    tree = make_tree(args.nodes)
    build_s = time.perf_counter() - t
    s = tree.summary()
    print(f"tree: {s.nodes:,} nodes, {s.trajectories:,} trajectories, depth {s.depth}, {s.leaves:,} leaves, "
          f"{s.branch_points:,} branch points (built and searched in {build_s:.1f} s)")  # fmt: skip
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="w2s-bench-viz-"))
    folder.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    ours = render_tree_html(tree, folder / "ours.html")
    render_s = time.perf_counter() - t
    t = time.perf_counter()
    data = tree_view_data(tree)
    data_s = time.perf_counter() - t
    meta = data["meta"]
    print(f"view data: {meta['merged_nodes']:,} nodes in {meta['merged_states']} merged states; best path "
          f"{meta['best_origin']}; computed in {data_s:.2f} s")  # fmt: skip
    base = folder / "baseline.html"
    page = html_page("baseline", ["viewer.css"], "tree.js", data, "baseline")
    page = page[: page.rindex("<script>") + 8] + BASELINE_JS + page[page.rindex("</script>") :]
    page = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>\n', "", page)  # its script is not hashed
    base.write_text(page, encoding="utf-8")
    size = ours.stat().st_size
    gz = len(gzip.compress(ours.read_bytes(), 6))
    print(f"page: {size:,} bytes ({size / s.nodes:.0f} per node), {gz:,} gzipped; written by render_tree_html "
          f"in {render_s:.2f} s")  # fmt: skip

    query = QUERY
    hits = sum(query in tree.action(n).lower() for n in range(1, len(tree)))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            # alternate the viewers so that load changes on the machine hit both
            ours_runs, base_runs = [], []
            for _ in range(args.repeat):
                ours_runs.append(measure(browser, ours, "ours", query, 1))
                base_runs.append(measure(browser, base, "baseline", query, 1))
        finally:
            browser.close()
    med = statistics.median
    o = {k: med(r[k] for r in ours_runs) for k in ours_runs[0]}
    b = {k: med(r[k] for r in base_runs) for k in base_runs[0]}
    print(f"\nmedian of {args.repeat} loads each; search for {query!r} matches {hits:,} nodes")
    print(f"{'measure':<44}{'ours':>12}{'baseline':>12}{'ratio':>9}")
    rows = [
        ("first render (navigation start -> rendered)", "first_render"),
        ("first contentful paint", "fcp"),
        ("goto() -> ready, seen from Python", "wall"),
        ("expand all (+ 2 frames)", "expand_all"),
        ("search + expand to matches (+ 2 frames)", "search"),
    ]
    for label, key in rows:
        print(f"{label:<44}{o[key]:>10.0f}ms{b[key]:>10.0f}ms{b[key] / o[key]:>8.1f}x")
    met = o["first_render"] < TARGET_MS
    print(f"\ntarget: first render of a {s.nodes:,}-node tree under {TARGET_MS / 1000:.0f} s: "
          f"{'met' if met else 'NOT met'} ({o['first_render'] / 1000:.2f} s)")  # fmt: skip
    if not args.keep:
        for p in (ours, base):
            p.unlink()
        folder.rmdir()
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
