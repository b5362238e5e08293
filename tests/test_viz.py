"""Search visualisation without a browser: the data a page embeds, its escaping and policy, bad inputs, the run
index, static figures and ``w2s viz``. (The pages' behaviour in Chromium is tested in test_viz_browser.py.)"""

from __future__ import annotations

import json
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from w2s_agents.cli import main
from w2s_agents.errors import DataFormatError, W2SError
from w2s_agents.search import (
    SearchConfig,
    best_path,
    loop_erase,
    node_values,
    search_tree,
    stitched_path,
    tree_pairs,
    write_rows,
)
from w2s_agents.tree import TrajectoryTree, build_trees
from w2s_agents.viz import (
    VizConfig,
    embed_json,
    export_static,
    find_tree_files,
    read_pair_rows,
    render_run_index,
    render_tree_html,
    tree_view_data,
)

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "w2s_agents" / "viz" / "assets"


@pytest.fixture
def tree(viz_trajectories) -> TrajectoryTree:
    t = build_trees(viz_trajectories)["house/0"]
    search_tree(t, SearchConfig(iterations=200, tie_break="order"))
    return t


def _embedded(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="w2s-data">(.*?)</script>', page, re.S)
    assert m, "no data element"
    return json.loads(m.group(1))


def test_view_data_matches_the_search_module(tree: TrajectoryTree) -> None:
    data = tree_view_data(tree)
    values = node_values(tree, "mcts")
    assert data["meta"]["value"] == "mcts" and data["meta"]["value_note"] == ""
    # the default stitched paths need state keys: this tree has none, so its greedy path stays
    assert data["best_paths"] == [best_path(tree, values)]
    assert (
        data["meta"]["best_origin"]
        == "computed: greedy by MCTS value (stitched paths: the tree has no state keys)"
    )
    assert data["state_group"] == [-1] * len(tree) and not data["meta"]["state_keys"]
    assert (data["meta"]["merged_nodes"], data["meta"]["merged_states"]) == (0, 0)
    expected = {(r.node, r.chosen_node, r.rejected_node) for r in tree_pairs(tree, values)}
    assert {tuple(p[:3]) for p in data["pairs"]} == expected and expected
    assert all(p[4] == "step+continuation" for p in data["pairs"])
    n = len(tree)
    assert data["n"] == n and data["parent"] == [tree.parent(i) for i in range(n)]
    strings = data["strings"]
    assert [strings[i] for i in data["action"]] == [tree.action(i) for i in range(n)]
    assert [strings[i] for i in data["thought"]] == [tree.thought(i) for i in range(n)]
    assert [strings[i] for i in data["obs"]] == [tree.observation(i) for i in range(n)]
    assert data["visits"] == [tree.visits(i) for i in range(n)]
    assert data["models"] == ["evil", "strong", "weak"]
    for i in range(n):
        counts = data["src"][i]
        got = {data["models"][counts]: tree.visits(i)} if isinstance(counts, int) else {
            data["models"][counts[k]]: counts[k + 1] for k in range(0, len(counts), 2)}  # fmt: skip
        assert got == tree.sources(i)
    assert data["terminal"] == {str(i): tree.terminal(i) for i in range(n) if tree.terminal(i)}
    for kind in ("mcts", "mean", "success", "max"):
        want = node_values(tree, kind).tolist()
        assert data["values"][kind] == pytest.approx([None if v != v else v for v in want], abs=1e-4)


def test_unsearched_tree_falls_back_to_mean_unless_mcts_is_asked_for(viz_trajectories) -> None:
    tree = build_trees(viz_trajectories)["house/0"]
    data = tree_view_data(tree)
    assert data["meta"]["value"] == "mean" and "no search values" in data["meta"]["value_note"]
    assert "mcts" not in data["values"] and data["search_visits"] is None
    assert data["best_paths"] == [best_path(tree, node_values(tree, "mean"))]
    with pytest.raises(W2SError, match="no search values"):
        tree_view_data(tree, value="mcts")
    assert tree_view_data(tree, search=SearchConfig(value="success"))["meta"]["value"] == "success"


def test_pairs_and_paths_from_the_files_of_w2s_search(tmp_path: Path, tree: TrajectoryTree) -> None:
    values = node_values(tree, "mcts")
    rows = [r.to_dict() for r in tree_pairs(tree, values, margin=0.3)]
    # an expert-vs-failed row (whole trajectories, no tree nodes) and a row of another task are left out
    rows.append(
        {**rows[0], "task_id": "house/0", "level": "trajectory", "chosen_node": -1, "rejected_node": -1}
    )
    rows.append({**rows[0], "task_id": "other/0"})
    write_rows(rows, tmp_path / "pairs.jsonl")
    leaf = len(tree) - 1
    agent_turn = {"role": "assistant", "content": "go"}
    sft = [{"messages": [agent_turn], "task_id": "house/0", "node": leaf, "steps": tree.depth(leaf)}]
    write_rows(sft, tmp_path / "sft.jsonl")
    data = tree_view_data(tree, pairs=tmp_path / "pairs.jsonl", paths=tmp_path / "sft.jsonl")
    assert {tuple(p[:3]) for p in data["pairs"]} == {
        (r["node"], r["chosen_node"], r["rejected_node"]) for r in rows[:-2]
    }
    assert data["meta"]["trajectory_pairs"] == 1 and data["meta"]["pairs_origin"] == "pair rows"
    assert data["best_paths"] == [tree.path(leaf)] and "SFT rows" in data["meta"]["best_origin"]

    # rows of another version of the tree are refused with file:line
    (tmp_path / "stale.jsonl").write_text(json.dumps({**rows[0], "chosen_node": 999}) + "\n")
    with pytest.raises(DataFormatError, match=r"stale\.jsonl:1: chosen_node 999 is not a node"):
        tree_view_data(tree, pairs=tmp_path / "stale.jsonl")
    a, b = tree.children(0)[:2]
    (tmp_path / "moved.jsonl").write_text(json.dumps({**rows[0], "node": a, "chosen_node": b}) + "\n")
    with pytest.raises(DataFormatError, match=r"moved\.jsonl:1: .* are not children of node"):
        tree_view_data(tree, pairs=tmp_path / "moved.jsonl")
    (tmp_path / "sft2.jsonl").write_text(json.dumps({**sft[0], "steps": 9}) + "\n")
    with pytest.raises(DataFormatError, match=r"sft2\.jsonl:1: the row has 9 steps"):
        tree_view_data(tree, paths=tmp_path / "sft2.jsonl")
    (tmp_path / "broken.jsonl").write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(DataFormatError, match=r"broken\.jsonl:2: invalid JSON"):
        read_pair_rows(tmp_path / "broken.jsonl")
    (tmp_path / "typed.jsonl").write_text(json.dumps({**rows[0], "node": "3"}) + "\n")
    with pytest.raises(DataFormatError, match=r"typed\.jsonl:1: field 'node' must be an integer"):
        read_pair_rows(tmp_path / "typed.jsonl")


def test_embedded_json_cannot_end_its_element() -> None:
    data = {"a": "</script><script>x()</script>", "b": "<!-- & \u2028\u2029 >", "c": [1.5, None]}
    text = embed_json(data)
    assert not re.search("[<>&\u2028\u2029]", text)
    assert json.loads(text) == data


def test_page_is_self_contained_and_escapes_planted_markup(tmp_path: Path, tree, planted) -> None:
    out = render_tree_html(tree, tmp_path / "t.html")
    page = out.read_text(encoding="utf-8")
    # exactly two script elements (data and viewer) and one style element, all inline
    assert page.count("<script") == 2 and page.count("</script>") == 2
    markup = page.replace(re.search(r'id="w2s-data">(.*?)</script>', page, re.S).group(1), "")
    assert markup.count("<style>") == 1 and "<link" not in markup and "src=" not in markup
    assert not re.search(r"https?://|url\(", markup)
    for text in planted.values():  # present only in escaped form
        assert text not in page
    data = _embedded(page)
    assert planted["action"] in data["strings"] and planted["thought"] in data["strings"]
    # the policy allows the inline script and style by hash only, and no network
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page).group(1)
    assert "default-src 'none'" in csp and "unsafe-inline" not in csp and "script-src 'sha256-" in csp
    assert out.stat().st_mode & 0o777 == 0o644


def test_viewer_scripts_never_parse_data_as_markup() -> None:
    for name in ("tree.js", "index.js"):
        code = (ASSETS / name).read_text(encoding="utf-8")
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "Function(",
                     "setAttribute(\"style\"", "srcdoc"):  # fmt: skip
            assert sink not in code, f"{name} uses {sink}"
        assert "textContent" in code


def test_bad_tree_file_is_one_line_error(tmp_path: Path, capsys) -> None:
    cases = {
        "notjson.json": ("{", "notjson.json:1: invalid JSON"),
        "schema.json": (
            json.dumps({"schema": "w2s.tree/9", "nodes": [], "edges": []}),
            "unsupported tree schema",
        ),
        "attr.json": (
            json.dumps(
                {
                    "schema": "w2s.tree/1",
                    "graph": {"task_id": "t"},
                    "nodes": [{"id": 0, "depth": 0}],
                    "edges": [],
                }
            ),
            "node 0: missing attribute",
        ),
    }
    for name, (text, msg) in cases.items():
        (tmp_path / name).write_text(text)
        assert main(["viz", str(tmp_path / name), "-o", str(tmp_path / "x.html")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("w2s: error: ") and err.count("\n") == 1, err
        assert str(tmp_path / name) in err and msg in err
    assert not (tmp_path / "x.html").exists()
    assert main(["viz", str(tmp_path / "missing.json")]) == 2
    assert "not found" in capsys.readouterr().err


def _run_dir(tmp_path: Path, viz_trajectories, make_traj) -> Path:
    run = tmp_path / "run"
    trees = build_trees(
        [*viz_trajectories, make_traj([("go up", "a roof")], 0.0, "lost", task="tw/other", seed=9)]
    )
    for i, t in enumerate(trees.values()):
        if i == 0:
            search_tree(t, SearchConfig(iterations=100))
        t.save(run / "trees" / f"tree{i}.json")
    return run


def test_run_index_links_a_page_per_tree_and_lists_bad_files(
    tmp_path, viz_trajectories, make_traj, capsys
) -> None:
    run = _run_dir(tmp_path, viz_trajectories, make_traj)
    (run / "trees" / "zbad.json").write_text('{"schema": "w2s.tree/1"}')
    index, entries = render_run_index(run)
    assert index == run / "viz" / "index.html"
    assert [e.file for e in entries] == ["trees/tree0.json", "trees/tree1.json", "trees/zbad.json"]
    good = [e for e in entries if not e.error]
    assert [e.page for e in good] == ["trees__tree0.html", "trees__tree1.html"]
    for e in good:
        page = (index.parent / e.page).read_text(encoding="utf-8")
        assert _embedded(page)["meta"]["index_href"] == "index.html"
    assert good[0].searched and good[0].iterations == 100 and good[0].value == "mcts"
    assert not good[1].searched and good[1].value == "mean"
    assert good[0].summary["task_id"] == "house/0" and good[0].pairs > 0
    bad = entries[2]
    assert bad.page is None and "zbad.json" in bad.error and "nodes" in bad.error
    listed = _embedded(index.read_text(encoding="utf-8"))["trees"]
    assert [t["file"] for t in listed] == [e.file for e in entries]

    # the CLI prints the bad file's error on one line and exits 1; pages of the good trees are written
    out = tmp_path / "pages"
    assert main(["viz", str(run), "-o", str(out)]) == 1
    cap = capsys.readouterr()
    assert cap.err.count("w2s: error: ") == 1 and "zbad.json" in cap.err
    assert sorted(p.name for p in out.iterdir()) == ["index.html", "trees__tree0.html", "trees__tree1.html"]

    # with the pair rows that `w2s search` wrote (one file for every task of the run)
    tree0 = TrajectoryTree.load(run / "trees" / "tree0.json")
    rows = tree_pairs(tree0, node_values(tree0, "mcts"), margin=0.5)
    write_rows(rows, tmp_path / "pairs.jsonl")
    assert main(["viz", str(run), "-o", str(out), "--pairs", str(tmp_path / "pairs.jsonl")]) == 1
    data = _embedded((out / "trees__tree0.html").read_text(encoding="utf-8"))
    assert {tuple(p[:3]) for p in data["pairs"]} == {(r.node, r.chosen_node, r.rejected_node) for r in rows}
    assert data["meta"]["pairs_origin"] == "pair rows"
    assert _embedded((out / "trees__tree1.html").read_text(encoding="utf-8"))["pairs"] == []

    # figures of every tree of the run
    capsys.readouterr()
    assert main(["viz", str(run), "--format", "svg", "-o", str(tmp_path / "figs"), "--depth", "1"]) == 1
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["trees__tree0.svg", "trees__tree1.svg"]
    assert capsys.readouterr().err.count("w2s: error: ") == 1


def test_trees_are_found_below_a_run_without_a_trees_folder(tmp_path: Path, tree) -> None:
    run = tmp_path / "run"
    tree.save(run / "stage" / "a.json")
    (run / "config.json").write_text('{"schema": "w2s.experiment/1"}')
    (run / "stage" / "search.json").write_text('{"trees": 1}')
    tree.save(run / "viz" / "old.json")  # inside the output folder: skipped
    assert find_tree_files(run, exclude=run / "viz") == [run / "stage" / "a.json"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(W2SError, match="no tree files"):
        render_run_index(tmp_path / "empty")


def test_svg_figure_of_the_top_levels(tmp_path: Path, tree, planted) -> None:
    out = export_static(tree, tmp_path / "fig.svg", depth=1)
    svg = out.read_text(encoding="utf-8")
    root = ET.fromstring(svg)  # well-formed: the planted markup is escaped
    ns = "{http://www.w3.org/2000/svg}"
    assert root.tag == f"{ns}svg"
    assert not list(root.iter(f"{ns}script")) and not list(root.iter(f"{ns}image"))
    texts = ["".join(t.itertext()) for t in root.iter(f"{ns}text")]
    assert any(planted["action"][:20] in t for t in texts)  # shown as text (cut to label_chars)
    # depth 1: the root and its children, nothing deeper
    labels = {" ".join(tree.action(c).split()) for c in tree.children(0)}
    drawn = [t for t in texts if any(t.startswith(a[:20]) for a in labels)]
    assert len(drawn) == len(labels)
    assert not any(t.startswith("open door") for t in texts)
    # the best path's first child has a bold label
    first = " ".join(tree.action(best_path(tree, node_values(tree, "mcts"))[1]).split())
    bold = [ts.text for ts in root.iter(f"{ns}tspan") if ts.get("font-weight") == "bold"]
    assert first in bold


def test_figures_cap_children_and_png_is_written(tmp_path: Path, make_traj) -> None:
    trajs = [make_traj([(f"action ${i}$ ^", "x")], i / 10, "lost", seed=i) for i in range(10)]
    tree = build_trees(trajs)["house/0"]
    cfg = VizConfig(max_children=3, depth=2)
    svg = export_static(tree, tmp_path / "cap.svg", config=cfg).read_text(encoding="utf-8")
    assert "+7 more (n=7)" in svg
    # the three most visited children are drawn (all have 1 visit: the first three in order) and the best
    # (highest mean return, action $9$) is kept in view
    assert "action $9$ ^" in svg and "action $0$ ^" in svg and "action $2$ ^" not in svg
    png = export_static(tree, tmp_path / "cap.png", config=cfg, dpi=60)  # mathtext-like text is shown as is
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", head[16:24])
    assert width > 300 and height > 100
    with pytest.raises(ValueError, match="unknown figure format"):
        export_static(tree, tmp_path / "fig.pdf")


def test_cli_writes_pages_and_figures(tmp_path: Path, tree, capsys) -> None:
    path = tree.save(tmp_path / "t.json")
    assert main(["viz", str(path)]) == 0
    assert (tmp_path / "t.html").is_file() and "t.html: html of task house/0" in capsys.readouterr().out
    assert main(["viz", str(path), "--format", "svg", "--depth", "1", "--max-children", "2"]) == 0
    assert "+1 more" in (tmp_path / "t.svg").read_text(encoding="utf-8")
    assert (
        main(["viz", str(path), "--value", "mean", "--set", "expand_depth=3", "-o", str(tmp_path / "m.html")])
        == 0
    )
    meta = _embedded((tmp_path / "m.html").read_text(encoding="utf-8"))["meta"]
    assert meta["value"] == "mean" and meta["expand_depth"] == 3
    capsys.readouterr()
    assert main(["viz", str(path), "--set", "expand_depth=-1"]) == 2
    assert "'expand_depth' must be >= 0" in capsys.readouterr().err
    (tmp_path / "figs").mkdir()
    assert main(["viz", str(path), "--format", "png", "--dpi", "40", "-o", str(tmp_path / "figs")]) == 0
    assert (tmp_path / "figs" / "t.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------- merged states and shortened best paths


@pytest.fixture
def vault_tree(vault_play) -> TrajectoryTree:
    """A wastes two moves (north, south) before walking east to the vault too late (lost, 0.5); B walks east
    and west until its step limit (0.0). Canonical ids, by hand (action: room reached):

    0 hall -+- 1 east: cellar - 2 west: hall - 3 east: cellar - 4 west: hall                    (B)
            +- 5 north: side - 6 south: hall - 7 east: cellar - 8 east: stairs - 9 east: vault   (A)
    """
    a = vault_play(["go north", "go south", "go east", "go east", "go east"], seed=1)
    b = vault_play(["go east", "go west", "go east", "go west"], seed=2)
    tree = build_trees([a, b])["vault/0"]
    tree.canonicalize()
    assert [tree.action(n) for n in (1, 5, 9)] == ["go east", "go north", "go east"] and len(tree) == 10
    return tree


def test_nodes_of_one_game_state_share_a_state_group(vault_tree: TrajectoryTree) -> None:
    data = tree_view_data(vault_tree)
    # hall (0, 2, 4, 6) is group 0, cellar (1, 3, 7) group 1: numbered by their first node; side, stairs and
    # vault were reached once each
    assert data["state_group"] == [0, 1, 0, 1, 0, -1, 0, 1, -1, -1]
    meta = data["meta"]
    assert meta["state_keys"] and (meta["merged_nodes"], meta["merged_states"]) == (7, 2)
    assert data["schema"] == "w2s.viz/2"


def test_the_computed_best_path_follows_the_search_paths_setting(
    vault_tree: TrajectoryTree, tmp_path
) -> None:
    tree = vault_tree
    raw = best_path(tree, node_values(tree, "mean"))  # unsearched: by mean return
    assert raw == [0, 5, 6, 7, 8, 9]
    # SearchConfig's default (stitched): B's first move, then A's suffix from the cellar; node 8 is a jump
    data = tree_view_data(tree)
    assert data["best_paths"] == [stitched_path(tree)] == [[0, 1, 8, 9]]
    assert data["meta"]["best_origin"] == (
        "computed: stitched over merged states (not replayed here), 3 steps; "
        "the greedy path by mean return has 5"
    )
    erased = tree_view_data(tree, search=SearchConfig(paths="loop-erased"))
    assert erased["best_paths"] == [loop_erase(tree, raw)] == [[0, 7, 8, 9]]
    assert (
        "loop-erased over merged states (not replayed here), 3 of its 5 steps"
        in erased["meta"]["best_origin"]
    )
    # the viewer's own setting overrides the search's
    plain = tree_view_data(tree, search=SearchConfig(paths="stitched"), config=VizConfig(paths="tree"))
    assert plain["best_paths"] == [raw] and plain["meta"]["best_origin"] == "computed: greedy by mean return"
    # and so does `--set paths=...` of w2s viz
    path = tree.save(tmp_path / "vault.json")
    assert main(["viz", str(path), "--set", "paths=loop-erased", "-o", str(tmp_path / "v.html")]) == 0
    assert _embedded((tmp_path / "v.html").read_text(encoding="utf-8"))["best_paths"] == [[0, 7, 8, 9]]
    with pytest.raises(Exception, match="'paths' must be"):
        VizConfig(paths="shortest")  # type: ignore[arg-type]


def test_path_rows_with_their_nodes_are_shown_and_broken_ones_refused(
    vault_tree: TrajectoryTree, tmp_path
) -> None:
    turn = {"messages": [{"role": "assistant", "content": "go east"}], "task_id": "vault/0"}
    stitched = {**turn, "node": 9, "steps": 3, "path": "stitched", "path_nodes": [0, 1, 8, 9]}
    erased = {**turn, "node": 9, "steps": 3, "path": "loop-erased", "path_nodes": [0, 7, 8, 9]}
    plain = {**turn, "node": 4, "steps": 4}  # a tree path: from the root to its node
    write_rows([stitched, erased, plain], tmp_path / "sft.jsonl")
    data = tree_view_data(vault_tree, paths=tmp_path / "sft.jsonl")
    assert data["best_paths"] == [[0, 1, 8, 9], [0, 7, 8, 9], [0, 1, 2, 3, 4]]
    assert data["meta"]["best_origin"] == "SFT rows (3 of task 'vault/0', 1 loop-erased, 1 stitched)"

    broken = {
        "not a node": ({"path_nodes": [0, 1, 8, 99]}, "path node 99 is not a node of the tree"),
        "not from the root": ({"path_nodes": [1, 8, 9], "steps": 2}, "path_nodes must start at the root"),
        "another end": ({"path_nodes": [0, 1, 8]}, "path_nodes end at node 8 but the row's node is 9"),
        # node 9's parent is the stairs (8), node 1 the cellar: no move of the tree goes from one to the other
        "no such move": ({"path_nodes": [0, 1, 9], "steps": 2}, "path node 9 does not follow node 1"),
        "other length": ({"steps": 5}, "the row has 5 steps but its path_nodes hold 3 actions"),
    }
    for name, (change, message) in broken.items():
        write_rows([plain, {**stitched, **change}], tmp_path / "bad.jsonl")
        with pytest.raises(DataFormatError, match=rf"bad\.jsonl:2: {re.escape(message)}"):
            tree_view_data(vault_tree, paths=tmp_path / "bad.jsonl")
        assert name
    (tmp_path / "typed.jsonl").write_text(json.dumps({**stitched, "path_nodes": "0 1 8 9"}) + "\n")
    with pytest.raises(DataFormatError, match=r"typed\.jsonl:1: field 'path_nodes' must be a list"):
        tree_view_data(vault_tree, paths=tmp_path / "typed.jsonl")


def test_figures_outline_the_nodes_of_merged_states(vault_tree: TrajectoryTree, tree, tmp_path) -> None:
    svg = export_static(vault_tree, tmp_path / "vault.svg", depth=3).read_text(encoding="utf-8")
    ns = "{http://www.w3.org/2000/svg}"
    rings = [c for c in ET.fromstring(svg).iter(f"{ns}circle") if c.get("stroke") == "#7b3294"]
    # drawn (depth <= 3): 0-3 and 5-7, all but the side room (5) in merged states; and the legend's
    assert len(rings) == 6 + 1 and "same state as another node" in svg
    plain = export_static(tree, tmp_path / "plain.svg").read_text(encoding="utf-8")
    assert "#7b3294" not in plain and "same state" not in plain
