"""The viewer pages in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

These tests fail, not skip, when Chromium is missing: ``make test`` installs it (scripts/setup-chromium.sh).
One browser serves the whole module; each test opens its own page, which records console messages, page errors
and any request that leaves the file system (every one is refused: the pages must work offline).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from w2s_agents.search import SearchConfig, best_path, node_values, search_tree, stitched_path
from w2s_agents.tree import TrajectoryTree, build_trees
from w2s_agents.viz import render_run_index, render_tree_html

pytestmark = pytest.mark.slow  # a real browser (Debian's chromium, driven by Playwright)

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


@pytest.fixture(scope="module")
def browser() -> Iterator:
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"Chromium not found at {CHROMIUM}; the browser tests need it: run `make test` (it installs it) or "
            "`sudo apt-get install -y chromium`, or set W2S_CHROMIUM to a Chromium executable"
        )
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    except Exception:
        pw.stop()
        raise
    yield b
    b.close()
    pw.stop()


class Page:
    """A page of the browser with the problems it reported: console errors, page errors, network requests."""

    def __init__(self, browser, path: Path, fragment: str = "") -> None:
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.context = browser.new_context(viewport={"width": 1280, "height": 720})
        self.context.set_default_timeout(5_000)
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on(
            "console", lambda m: m.type in ("error", "warning") and self.errors.append(f"{m.type}: {m.text}")
        )
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.goto(path, fragment)

    def _route(self, route) -> None:
        if route.request.url.startswith("file://"):
            route.continue_()
        else:
            self.requests.append(route.request.url)
            route.abort()

    def goto(self, path: Path, fragment: str = "") -> None:
        self.page.goto(path.as_uri() + fragment)
        self.page.wait_for_function("document.body.dataset.ready === '1'", timeout=10_000)

    def rows(self) -> list[int]:
        """Node ids of the rows in the DOM (rendered), top to bottom."""
        return self.page.eval_on_selector_all(
            "#tree .row:not([hidden])",
            "rs => rs.sort((a, b) => parseFloat(a.style.top) - parseFloat(b.style.top)).map(r => +r.dataset.node)",
        )

    def rows_with(self, cls: str) -> set[int]:
        return set(
            self.page.eval_on_selector_all(
                f"#tree .row.{cls}:not([hidden])", "rs => rs.map(r => +r.dataset.node)"
            )
        )

    def selected(self) -> int:
        return int(self.page.get_attribute("#panel", "data-node"))

    def close(self) -> None:
        assert not self.errors, self.errors
        assert not self.requests, f"the page made network requests: {self.requests}"
        self.context.close()


@pytest.fixture(scope="module")
def tree(viz_trajectories) -> TrajectoryTree:
    t = build_trees(viz_trajectories)["house/0"]
    search_tree(t, SearchConfig(iterations=200, tie_break="order"))
    return t


@pytest.fixture(scope="module")
def page_path(tree, tmp_path_factory) -> Path:
    return render_tree_html(tree, tmp_path_factory.mktemp("viz") / "tree.html")


@pytest.fixture
def page(browser, page_path) -> Iterator[Page]:
    p = Page(browser, page_path)
    yield p
    p.close()


def _visible(tree: TrajectoryTree, expanded: set[int], shown=lambda n: True) -> list[int]:
    out, stack = [], [0]
    while stack:
        n = stack.pop()
        out.append(n)
        if n in expanded:
            stack.extend(c for c in reversed(tree.children(n)) if shown(c))
    return out


def _node(tree: TrajectoryTree, action: str) -> int:
    return next(n for n in range(1, len(tree)) if tree.action(n) == action)


def test_page_loads_without_errors(page: Page, tree, artifact_dir, keep_artifact) -> None:
    best = best_path(tree, node_values(tree, "mcts"))
    opened = {n for n in range(len(tree)) if tree.depth(n) < 1} | set(best[:-1])
    assert page.rows() == _visible(tree, opened)  # root level and the best path expanded
    assert page.selected() == 0
    assert page.page.title() == "house/0 - w2s tree"
    assert page.page.text_content("header .summary").startswith(f"{len(tree)} nodes")
    page.page.click("#expand-all")
    page.page.click(f'#tree .row[data-node="{best[-1]}"]')
    shot = artifact_dir / "viz-tree.png"
    page.page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    keep_artifact("tree viewer screenshot", shot)


def test_click_opens_the_node_panel(page: Page, tree) -> None:
    n = _node(tree, "go north")
    page.page.click(f'#tree .row[data-node="{n}"] .act')
    assert page.selected() == n
    panel = page.page.locator("#panel")
    assert panel.locator("h2").text_content() == f"Node {n}"
    assert panel.locator(".sec.action pre").text_content() == "go north"
    assert panel.locator(".sec.thought").text_content() == "Thought" + (tree.thought(n) or "(none)")
    assert panel.locator(".sec.observation pre").text_content() == tree.observation(n)
    text = panel.text_content()
    for model, count in tree.sources(n).items():
        assert f"{model}{count}" in text  # sources table: model, count
    assert f"search visits N (c_M){tree.search_visits(n)}" in text
    # a link in the panel (the breadcrumb of the path) selects that node
    parent = tree.parent(n)
    panel.locator(f'.crumbs [data-goto="{parent}"]').click()
    assert page.selected() == parent
    # the URL fragment names the selection, and opening it selects the node again
    assert page.page.evaluate("location.hash") == f"#node={parent}"


def test_fragment_selects_a_node(browser, page_path, tree) -> None:
    n = _node(tree, "go west")
    p = Page(browser, page_path, f"#node={n}")
    assert p.selected() == n and n in p.rows()
    p.close()


def test_best_path_is_highlighted_exactly(page: Page, tree) -> None:
    best = set(best_path(tree, node_values(tree, "mcts")))
    page.page.click("#expand-all")
    assert set(page.rows()) == set(range(len(tree)))
    assert page.rows_with("best") == best
    styles = page.page.eval_on_selector_all(
        "#tree .row", "rs => rs.map(r => [+r.dataset.node, getComputedStyle(r).borderLeftColor])"
    )
    marked = {n for n, color in styles if color == "rgb(34, 34, 34)"}
    assert marked == best
    assert all(color == "rgba(0, 0, 0, 0)" for n, color in styles if n not in best)


def test_pairs_and_outcomes_are_marked(page: Page, tree) -> None:
    values = node_values(tree, "mcts")
    from w2s_agents.search import tree_pairs

    pairs = tree_pairs(tree, values)
    page.page.click("#expand-all")
    assert page.rows_with("chosen") == {r.chosen_node for r in pairs}
    assert page.rows_with("rejected") == {r.rejected_node for r in pairs}
    badges = page.page.eval_on_selector_all(
        "#tree .row", "rs => rs.map(r => [+r.dataset.node, r.querySelector('.bd').textContent])"
    )
    for n, text in badges:
        chosen = any(r.chosen_node == n for r in pairs)
        rejected = any(r.rejected_node == n for r in pairs)
        at = any(r.node == n for r in pairs)
        assert text == "\u25b2" * chosen + "\u25bc" * rejected + "\u25c6" * at, n
    won = {n for n in range(len(tree)) if tree.terminal(n) and set(tree.terminal(n)) == {"won"}}
    assert page.rows_with("end-won") == won
    failed = {n for n in range(len(tree)) if tree.terminal(n) and "won" not in tree.terminal(n)}
    assert page.rows_with("end-failed") == failed


def test_planted_markup_is_shown_as_text_and_never_runs(page: Page, tree, planted) -> None:
    n = _node(tree, planted["action"])
    page.page.click("#expand-all")
    row = page.page.locator(f'#tree .row[data-node="{n}"] .act')
    assert row.text_content() == planted["action"]
    row.click()
    panel = page.page.locator("#panel")
    assert panel.locator(".sec.action pre").text_content() == planted["action"]
    assert panel.locator(".sec.thought pre").text_content() == planted["thought"]
    assert panel.locator(".sec.observation pre").text_content() == planted["observation"]
    page.page.click("#panel details.before summary")
    page.page.fill("#search", "script")
    page.page.press("#search", "Enter")
    assert page.selected() == n
    assert page.page.evaluate("window.__pwned") is None
    # no element was made from the text: two scripts (data, viewer), no img or b
    assert page.page.evaluate("document.scripts.length") == 2
    assert page.page.evaluate("document.querySelectorAll('img, b, iframe, object, embed').length") == 0


def test_keyboard_navigation(page: Page, tree) -> None:
    page.page.click("#collapse-all")
    page.page.click('#tree .row[data-node="0"] .act')
    rows = page.rows()
    assert rows == [0, *tree.children(0)]
    page.page.keyboard.press("ArrowDown")
    assert page.selected() == rows[1]
    page.page.keyboard.press("ArrowDown")
    assert page.selected() == rows[2]
    page.page.keyboard.press("ArrowUp")
    assert page.selected() == rows[1]
    page.page.keyboard.press("End")
    assert page.selected() == rows[-1]
    page.page.keyboard.press("Home")
    assert page.selected() == 0
    # ArrowLeft on the root collapses nothing; Enter toggles the selected node
    page.page.keyboard.press("Enter")
    assert page.rows() == [0]
    page.page.keyboard.press("Enter")
    assert page.rows() == rows
    # Right expands a collapsed node, Right again goes to its first child, Left goes back up and collapses
    collapsed = next(n for n in rows if n and tree.children(n))
    page.page.click(f'#tree .row[data-node="{collapsed}"] .act')
    page.page.keyboard.press("ArrowRight")
    assert page.page.get_attribute(f'#tree .row[data-node="{collapsed}"]', "aria-expanded") == "true"
    page.page.keyboard.press("ArrowRight")
    assert page.selected() == tree.children(collapsed)[0]
    page.page.keyboard.press("ArrowLeft")
    assert page.selected() == collapsed
    page.page.keyboard.press("ArrowLeft")
    assert page.page.get_attribute(f'#tree .row[data-node="{collapsed}"]', "aria-expanded") == "false"
    assert page.rows() == rows


def test_filter_by_source(page: Page, tree) -> None:
    page.page.click("#expand-all")
    page.page.uncheck('#sources input[data-model="evil"]')
    evil_only = {n for n in range(1, len(tree)) if set(tree.sources(n)) == {"evil"}}
    assert evil_only and set(page.rows()) == set(range(len(tree))) - evil_only
    page.page.uncheck('#sources input[data-model="weak"]')
    strong = {n for n in range(len(tree)) if n == 0 or "strong" in tree.sources(n)}
    assert set(page.rows()) == strong
    page.page.check('#sources input[data-model="evil"]')
    page.page.check('#sources input[data-model="weak"]')
    assert set(page.rows()) == set(range(len(tree)))


def test_search_expands_to_matches(page: Page, tree) -> None:
    page.page.click("#collapse-all")
    assert page.rows() == [0, *tree.children(0)]
    page.page.fill("#search", " GO ")  # trimmed, case and spacing ignored
    page.page.press("#search", "Enter")
    hits = [n for n in range(1, len(tree)) if "go" in tree.action(n).lower()]
    assert len(hits) >= 3
    assert page.rows_with("match") == set(hits)  # every match is rendered: its ancestors were expanded
    assert page.page.text_content("#match-count") == f"1 / {len(hits)}"
    assert page.selected() == hits[0]
    page.page.press("#search", "Enter")
    assert page.selected() == hits[1] and page.page.text_content("#match-count") == f"2 / {len(hits)}"
    page.page.press("#search", "Shift+Enter")
    assert page.selected() == hits[0]
    # in all text: observations match too
    page.page.select_option("#scope", "all")
    texts = [
        " ".join(f(n) for f in (tree.action, tree.thought, tree.observation)).lower()
        for n in range(len(tree))
    ]
    in_all = [n for n in range(1, len(tree)) if "go" in texts[n]]
    assert len(in_all) > len(hits)  # "got key" is an observation
    assert page.page.text_content("#match-count") == f"1 / {len(in_all)}"
    page.page.fill("#search", "no such action")
    page.page.press("#search", "Enter")
    assert page.page.text_content("#match-count") == "no match" and not page.rows_with("match")


def test_colour_switch(page: Page, tree) -> None:
    def swatch(n: int) -> str:
        return page.page.eval_on_selector(f'#tree .row[data-node="{n}"] .sw', "e => e.style.background")

    page.page.click("#expand-all")
    mcts = node_values(tree, "mcts")
    top = next(n for n in range(len(tree)) if mcts[n] == 1.0)
    low = next(n for n in range(len(tree)) if mcts[n] == 0.0)
    assert swatch(top) == "rgb(26, 152, 80)" and swatch(low) == "rgb(215, 48, 39)"
    success = node_values(tree, "success")
    changed = next(n for n in range(len(tree)) if success[n] == 0.0 and mcts[n] > 0.2)
    page.page.select_option("#color", "success")
    assert swatch(changed) == "rgb(215, 48, 39)"
    assert page.page.text_content("#legend .legend-kind") == "success rate:"


def _vault_tree() -> TrajectoryTree:
    """Two failed episodes of a corridor game (hall - cellar - stairs - vault, a side room north of the hall)
    with the room as state key, as in test_viz.py: A goes north and back, then east three times (ids 5-9); B
    goes east and west twice (ids 1-4). Hall: 0, 2, 4, 6; cellar: 1, 3, 7; the stitched best path is B's first
    move, then A's last two (0, 1, 8, 9: node 8 is reached from node 1's state, its parent 7 is the cellar)."""
    from w2s_agents.types import Source, Step, Trajectory

    def episode(rooms: list[tuple[str, str]], ret: float, end: str, seed: int) -> Trajectory:
        steps = tuple(Step(a, f"You are in the {room}.", state_key=room) for a, room in rooms)
        return Trajectory("vault/0", "w2s/Vault-v0", Source("weak", "weak", seed=seed), "Reach the vault.",
                          "You are in the hall.", steps, ret, False, end, initial_state_key="hall")  # fmt: skip

    a = episode([("go north", "side"), ("go south", "hall"), ("go east", "cellar"), ("go east", "stairs"),
                 ("go east", "vault")], 0.5, "lost", 1)  # fmt: skip
    b = episode([("go east", "cellar"), ("go west", "hall"), ("go east", "cellar"), ("go west", "hall")],
                0.0, "truncated", 2)  # fmt: skip
    tree = build_trees([a, b])["vault/0"]
    tree.canonicalize()
    return tree


@pytest.fixture(scope="module")
def vault_page(tmp_path_factory) -> tuple[TrajectoryTree, Path]:
    tree = _vault_tree()
    return tree, render_tree_html(tree, tmp_path_factory.mktemp("vault") / "vault.html")


def test_a_stitched_best_path_is_shown_whole_with_its_jump(browser, vault_page) -> None:
    tree, path = vault_page
    best = stitched_path(tree)
    assert best == [0, 1, 8, 9]
    p = Page(browser, path)
    # every ancestor of every best-path node is expanded: B's first node and all of A's branch down to the vault
    assert p.rows() == _visible(tree, {0, 5, 6, 7, 8}) == [0, 1, 5, 6, 7, 8, 9]
    assert p.rows_with("best") == set(best)
    assert p.rows_with("jump") == {8}
    assert p.page.text_content('#tree .row[data-node="8"] .jm') == "\u21b7"
    assert all(p.page.text_content(f'#tree .row[data-node="{n}"] .jm') == "" for n in (0, 1, 9))
    # merged-state badges on the rows shown: hall (group 0) and cellar (group 1); none on side, stairs, vault
    assert p.rows_with("merged") == {0, 1, 6, 7}
    badges = {n: p.page.text_content(f'#tree .row[data-node="{n}"] .sg') for n in p.rows()}
    assert badges == {0: "\u22610", 1: "\u22611", 5: "", 6: "\u22610", 7: "\u22611", 8: "", 9: ""}
    assert "same game state as other nodes" in p.page.text_content("#legend")
    assert "7 nodes in 2 merged game states" in p.page.text_content("header .notes")
    # the jump's panel says where the path came from, with a link to that node
    p.page.click('#tree .row[data-node="8"] .act')
    flag = p.page.locator("#panel .flag.jump")
    assert flag.text_content() == "\u21b7 best path jumps here: reached from node 1's state"
    flag.locator('[data-goto="1"]').click()
    assert p.selected() == 1
    # the "best path" button reveals the whole path again after a collapse and selects its last node
    p.page.click("#collapse-all")
    assert p.rows() == [0, 1, 5]
    p.page.click("#show-best")
    assert p.selected() == 9 and set(best) <= set(p.rows()) and p.rows_with("best") == set(best)
    p.close()


def test_same_state_links_reveal_each_node(browser, vault_page) -> None:
    _, path = vault_page
    p = Page(browser, path)
    p.page.click('#tree .row[data-node="1"] .act')
    panel = p.page.locator("#panel")
    assert panel.locator(".flag.merged").text_content() == "\u22611 same state as 2 other nodes"
    section = panel.locator(".sec.same-state")
    assert section.locator("h3").text_content() == "Same state as 2 other nodes (state group 1)"
    links = section.locator("[data-goto]")
    assert [int(links.nth(k).get_attribute("data-goto")) for k in range(links.count())] == [3, 7]
    # node 3 lies under B's collapsed second move: following the link expands its ancestors and selects it
    assert 3 not in p.rows()
    links.nth(0).click()
    assert p.selected() == 3 and 3 in p.rows() and p.rows_with("sel") == {3}
    assert panel.locator(".flag.merged").text_content() == "\u22611 same state as 2 other nodes"
    assert [int(x) for x in panel.locator(".sec.same-state [data-goto]").evaluate_all(
        "bs => bs.map(b => b.dataset.goto)")] == [1, 7]  # fmt: skip
    # a node whose state no other node reached has neither the flag nor the list
    p.page.click('#tree .row[data-node="9"] .act')
    assert panel.locator(".flag.merged").count() == 0 and panel.locator(".sec.same-state").count() == 0
    p.close()


def _big_tree(n_traj: int = 700) -> TrajectoryTree:
    from w2s_agents.types import Source, Step, Trajectory

    rng = random.Random(3)
    trajs = []
    for i in range(n_traj):
        steps = []
        for d in range(8):
            a = f"step{d} {rng.choice('abcdef')}"
            steps.append(Step(action=a, observation=f"room {d} {a}"))
        won = rng.random() < 0.2
        trajs.append(Trajectory("big/0", "w2s/Fake-v0", Source(rng.choice(["weak", "weak2"]), "weak", seed=i),
                                "Find it.", "start", tuple(steps), 1.0 if won else 0.0, won,
                                "won" if won else "lost"))  # fmt: skip
    tree = build_trees(trajs)["big/0"]
    search_tree(tree, SearchConfig(iterations=300))
    return tree


def test_large_tree_renders_only_the_rows_in_view(browser, tmp_path) -> None:
    tree = _big_tree()
    n = len(tree)
    assert n > 3000
    p = Page(browser, render_tree_html(tree, tmp_path / "big.html"))
    p.page.click("#expand-all")
    rendered = p.rows()
    assert len(rendered) < 80  # the viewport holds ~27 rows, plus a margin: not thousands
    preorder = tree.canonical_order()
    assert rendered == preorder[: len(rendered)]
    assert p.page.eval_on_selector(".spacer", "e => e.style.height") == f"{n * 22}px"
    p.page.click('#tree .row[data-node="0"] .act')
    p.page.keyboard.press("End")
    assert p.selected() == preorder[-1] and preorder[-1] in p.rows()
    p.page.keyboard.press("PageUp")
    assert p.selected() in p.rows()
    # search: the first match in preorder is selected and in view, the others are expanded to
    p.page.click("#collapse-all")
    p.page.fill("#search", "step7 f")
    p.page.press("#search", "Enter")
    hits = [m for m in preorder if tree.action(m) == "step7 f"]
    assert p.selected() == hits[0] and hits[0] in p.rows()
    assert p.page.text_content("#match-count") == f"1 / {len(hits)}"
    p.page.keyboard.press("End")  # the search box has the focus: the tree did not move
    assert p.selected() == hits[0]
    p.close()


def test_run_index_links_to_tree_pages(browser, tmp_path, viz_trajectories, make_traj) -> None:
    run = tmp_path / "run"
    trees = build_trees(
        [*viz_trajectories, make_traj([("go up", "a roof")], 0.0, "lost", task="tw/<b>x</b>", seed=9)]
    )
    for i, t in enumerate(trees.values()):
        t.save(run / "trees" / f"t{i}.json")
    (run / "trees" / "t9.json").write_text("{broken")
    index, _ = render_run_index(run)
    p = Page(browser, index)
    rows = p.page.eval_on_selector_all("#trees tbody tr", "rs => rs.map(r => r.dataset.file)")
    assert rows == ["trees/t0.json", "trees/t1.json", "trees/t9.json"]
    assert p.page.text_content('#trees tr[data-file="trees/t1.json"] a') == "tw/<b>x</b>"
    assert "t9.json" in p.page.text_content('#trees tr[data-file="trees/t9.json"] .err')
    p.page.click('#trees th[data-col="2"]')  # nodes, ascending (an unreadable tree has none)
    files = p.page.eval_on_selector_all("#trees tbody tr", "rs => rs.map(r => r.dataset.file)")
    assert files == ["trees/t9.json", "trees/t1.json", "trees/t0.json"]
    p.page.fill("#filter", "house")
    assert p.page.eval_on_selector_all("#trees tbody tr", "rs => rs.length") == 1
    p.page.click('#trees tr[data-file="trees/t0.json"] a')
    p.page.wait_for_function("document.body.dataset.ready === '1' && !!document.querySelector('#tree')")
    assert p.page.text_content("header h1") == "house/0"
    p.page.click("header a.back")
    p.page.wait_for_function("document.body.dataset.ready === '1' && !!document.querySelector('#trees')")
    p.close()
