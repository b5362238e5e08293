"""The tree merge by observation similarity: the numpy TF-IDF, the merge rule, node counts both ways, the local-model
embedder, the ``tree`` config section, the trees stage and ``w2s tree build --merge similarity``."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from w2s_agents.errors import ConfigError, ModelLoadError
from w2s_agents.store import TrajectoryStore
from w2s_agents.tree import (
    SimilarityMerge,
    TfidfEmbedder,
    build_trees,
    merge_similar_observations,
    normalize_text,
)
from w2s_agents.types import Source, Step, Trajectory

# ------------------------------------------------------------------------------------------------ TF-IDF

M64 = (1 << 64) - 1


def _ref_feature(gram: str, bits: int) -> int:
    """The feature of one n-gram, computed with Python integers (the embedder does it with numpy arrays)."""
    h = 0
    for ch in gram:
        h = (h * 0x100000001B3 + ord(ch)) & M64
    z = (h + len(gram) * 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    z ^= z >> 31
    return z >> (64 - bits)


def _ref_tfidf(texts: list[str], lo: int = 3, hi: int = 5, bits: int = 20) -> list[dict[int, float]]:
    """TF-IDF written out the plain way: n-grams of each padded text, sublinear tf, smoothed idf, L2 norm."""
    counts = []
    for t in texts:
        p = f" {t} "
        counts.append(
            Counter(
                _ref_feature(p[i : i + n], bits) for n in range(lo, hi + 1) for i in range(len(p) - n + 1)
            )
        )
    df = Counter(f for c in counts for f in c)
    rows = []
    for c in counts:
        w = {f: (1 + math.log(k)) * (math.log((1 + len(texts)) / (1 + df[f])) + 1) for f, k in c.items()}
        norm = math.sqrt(sum(v * v for v in w.values()))
        rows.append({f: v / norm for f, v in w.items()} if norm else {})
    return rows


def test_tfidf_matches_the_plain_computation() -> None:
    texts = [
        "you are in the hall. moves: 3",
        "you are in the hall. moves: 4",
        "ab",
        "",
        "café au lait ☕",
        "zz",
    ]
    vec = TfidfEmbedder().embed(texts)
    ref = _ref_tfidf(texts)
    assert len(vec) == len(texts)
    for i, row in enumerate(ref):
        ids, weights = vec.row(i)
        assert dict(zip(ids.tolist(), weights.tolist(), strict=True)) == pytest.approx(row, rel=1e-12)
    # no n-gram crosses from one text into the next: " ab", "ab ", " ab " only; nothing in the empty text
    assert len(vec.row(2)[0]) == 3 and len(vec.row(3)[0]) == 0


def test_tfidf_cosines_identical_disjoint_and_close() -> None:
    texts = [
        "You are in the hall. A door leads east. Moves: 3",
        "You are in the hall. A door leads east. Moves: 3",
        "qqqq wwww",
        "You are in the hall. A door leads east. Moves: 4",
        "",
    ]
    vec = TfidfEmbedder().embed([normalize_text(t) for t in texts])
    sims = vec.cosine(0, [1, 2, 3, 4])
    assert sims[0] == pytest.approx(1.0, abs=1e-12)
    assert sims[1] == pytest.approx(0.0, abs=1e-12)  # no character 3-gram in common
    assert 0.9 < sims[2] < 1.0  # one digit differs
    assert sims[3] == 0.0  # an empty text has no n-gram
    assert vec.cosine(4, [4])[0] == 0.0


def _tfidf_digest(texts: list[str]) -> str:
    vec = TfidfEmbedder().embed(texts)
    h = hashlib.sha256()
    for a in (vec.indptr, vec.indices, vec.data):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


DIGEST_TEXTS = ["the kitchen, moves: 1", "the hall", "a red door is open", "ünïcödé text ✓"]


def test_tfidf_is_the_same_in_every_process() -> None:
    code = (
        "import sys, json; sys.path.insert(0, sys.argv[1]); from test_tree_similarity import _tfidf_digest, "
        "DIGEST_TEXTS; print(_tfidf_digest(DIGEST_TEXTS))"
    )
    here = os.path.dirname(__file__)
    out = set()
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        run = subprocess.run(
            [sys.executable, "-c", code, here],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        out.add(run.stdout.strip())
    assert out == {_tfidf_digest(DIGEST_TEXTS)}


# ------------------------------------------------------------------------------------------- the merge rule

HALL = "You are in the hall. A long corridor runs north; a red door leads east. Moves: {}"
KITCHEN = "You are in the kitchen. Moves: 0"


def _traj(steps: list[tuple[str, str]], ret: float, *, seed: int, initial: str = KITCHEN, task: str = "t/0"):
    return Trajectory(
        task_id=task,
        env_id="w2s/Fake-v0",
        source=Source(model="weak", role="weak", seed=seed),
        instruction="open the door",
        initial_observation=initial,
        steps=tuple(Step(action=a, observation=o) for a, o in steps),
        return_=ret,
        success=ret == 1.0,
        end="won" if ret == 1.0 else "lost",
    )


def _pair(second_action: str = "open door") -> list[Trajectory]:
    """Two episodes that reach the hall with different move counters, then act there."""
    a = _traj([("go north", HALL.format(1)), ("open door", "The door is open. Moves: 2")], 1.0, seed=0)
    b = _traj([("go north", HALL.format(7)), (second_action, "The door is open. Moves: 8")], 0.0, seed=1)
    return [a, b]


def _task_cosine(trajs: list[Trajectory], a: str, b: str) -> float:
    """The cosine of two observations as the merge sees them: TF-IDF fitted on every observation of the task."""
    texts = sorted(
        {normalize_text(o) for t in trajs for o in (t.initial_observation, *(s.observation for s in t.steps))}
    )
    vec = TfidfEmbedder().embed(texts)
    return float(vec.cosine(texts.index(normalize_text(a)), [texts.index(normalize_text(b))])[0])


def test_observations_differing_by_a_counter_merge_by_similarity_not_exactly() -> None:
    trajs = _pair()
    exact = build_trees(trajs)["t/0"]
    # root, go north, then "open door" twice: acted on two different hall texts
    assert len(exact) == 4
    tree = build_trees(trajs, similarity=SimilarityMerge(0.9))["t/0"]
    assert len(tree) == 3  # root, go north, open door
    (north,) = tree.children(0)
    (door,) = tree.children(north)
    assert tree.action(door) == "open door" and tree.visits(door) == 2 and tree.successes(door) == 1
    # the merged node shows its representative: the first of the sorted trajectories (counter 1)
    assert tree.observation_before(door) == HALL.format(1)
    assert tree.observation(north) == HALL.format(1)
    # the input order does not matter
    again = build_trees(trajs[::-1], similarity=SimilarityMerge(0.9))["t/0"]
    assert again.to_json() == tree.to_json()


def test_no_merge_when_the_actions_differ() -> None:
    tree = build_trees(_pair("close door"), similarity=SimilarityMerge(0.9))["t/0"]
    (north,) = tree.children(0)
    assert sorted(tree.action(c) for c in tree.children(north)) == ["close door", "open door"]
    assert len(tree) == 4


def test_no_merge_below_the_threshold() -> None:
    cos = _task_cosine(_pair(), HALL.format(1), HALL.format(7))
    assert 0.9 < cos < 1.0
    above = min(1.0, cos + 1e-6)
    assert len(build_trees(_pair(), similarity=SimilarityMerge(above))["t/0"]) == 4
    assert len(build_trees(_pair(), similarity=SimilarityMerge(cos - 1e-6))["t/0"]) == 3


def test_the_most_similar_child_is_joined() -> None:
    # two children of "go north" under "open door", made from texts a and b that are not similar enough; c, walked
    # after both (the trajectories are walked sorted by their texts), is similar enough to both and closer to a
    words = [
        "alpha",
        "bravo",
        "charlie",
        "delta",
        "echo",
        "foxtrot",
        "golf",
        "hotel",
        "india",
        "juliet",
        "kilo",
        "lima",
        "mike",
        "november",
        "oscar",
    ]
    a = "a: " + " ".join(words[:10])
    b = "b: " + " ".join(words[5:15])
    c = "c: " + " ".join(words[:11])
    trajs = [
        _traj([("go north", text), ("open door", f"end {i}")], float(i == 2), seed=i)
        for i, text in enumerate((a, b, c))
    ]
    ca, cb, ab = _task_cosine(trajs, c, a), _task_cosine(trajs, c, b), _task_cosine(trajs, a, b)
    assert ca > cb > ab
    tree = build_trees(trajs, similarity=SimilarityMerge((cb + ab) / 2))["t/0"]
    (north,) = tree.children(0)
    by_text = {tree.observation_before(k): k for k in tree.children(north)}
    assert set(by_text) == {a, b}
    assert (tree.visits(by_text[a]), tree.successes(by_text[a]), tree.visits(by_text[b])) == (2, 1, 1)


def test_nothing_similar_enough_gives_the_exact_tree_byte_for_byte(golden_trajectories) -> None:
    exact = build_trees(golden_trajectories)
    sim = build_trees(golden_trajectories, similarity=SimilarityMerge(1.0))
    assert [t.to_json() for t in sim.values()] == [t.to_json() for t in exact.values()]
    out = merge_similar_observations(golden_trajectories, SimilarityMerge(1.0))
    assert all(a is b for a, b in zip(out, golden_trajectories, strict=True))  # nothing rewritten


def test_merge_checks_its_input() -> None:
    with pytest.raises(ValueError, match="one task"):
        merge_similar_observations([*_pair(), _traj([("go", "x")], 0.0, seed=3, task="t/1")])
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"xi_sim must be a number in \(0, 1\]"):
            SimilarityMerge(bad)
    with pytest.raises(ValueError, match="obs_key or similarity"):
        build_trees(_pair(), obs_key=str.lower, similarity=SimilarityMerge())


# ------------------------------------------------------------------------------------ node counts both ways

WORDS = [
    "amber",
    "basalt",
    "cedar",
    "dune",
    "ember",
    "fjord",
    "grove",
    "harbor",
    "iris",
    "jade",
    "kelp",
    "lagoon",
    "meadow",
    "nectar",
    "onyx",
    "pine",
    "quartz",
]


def _noisy_set(n: int, seed: int) -> list[Trajectory]:
    """Episodes in a small maze whose rooms (one per action path) have distinct random descriptions, each
    observation ending with a move counter that differs between episodes (some waited before starting)."""
    rng = random.Random(seed)
    rooms: dict[tuple[str, ...], str] = {}

    def room(path: tuple[str, ...]) -> str:
        if path not in rooms:
            rooms[path] = " ".join(rng.sample(WORDS, 8)) + f" room {len(rooms)}"
        return rooms[path]

    trajs = []
    for i in range(n):
        wait = rng.randrange(4)
        path: tuple[str, ...] = ()
        steps = []
        for t in range(rng.randint(1, 4)):
            a = rng.choice(["go north", "go east", "Go  North"])  # two spellings of one action
            path = (*path, normalize_text(a))
            steps.append((a, f"{room(path)}. Moves: {wait + t + 1}"))
        trajs.append(_traj(steps, float(rng.random() < 0.3), seed=i, initial=f"{room(())}. Moves: {wait}"))
    return trajs


def test_node_counts_both_ways_on_a_small_set() -> None:
    trajs = _noisy_set(60, seed=3)
    # by hand: the exact merge keys each step on (actions so far, observations acted on so far); the rooms'
    # texts are far apart and the counters close, so the similarity merge keys each step on the actions alone
    exact_keys, sim_keys = set(), set()
    for t in trajs:
        acted_on = [t.initial_observation, *(s.observation for s in t.steps)]
        for k in range(1, len(t.steps) + 1):
            actions = tuple(normalize_text(s.action) for s in t.steps[:k])
            sim_keys.add(actions)
            exact_keys.add((actions, tuple(normalize_text(o) for o in acted_on[:k])))
    assert len(exact_keys) > len(sim_keys)

    from w2s_agents.pipeline.experiment import TreeConfig
    from w2s_agents.pipeline.tree_merge import merge_trees

    merged = merge_trees(trajs, TreeConfig(merge="similarity"), device="cpu")
    assert merged.nodes_exact == {"t/0": 1 + len(exact_keys)}
    assert merged.counts("t/0") == {"nodes_exact": 1 + len(exact_keys), "nodes_similarity": 1 + len(sim_keys)}
    assert merged.info == {
        "xi_sim": 0.9,
        "embedder": "tfidf-char3-5",
        "nodes_exact": 1 + len(exact_keys),
        "nodes_similarity": 1 + len(sim_keys),
    }
    assert merge_trees(trajs).counts("t/0") == {} and merge_trees(trajs).info == {}
    # every statistic is kept: the similarity tree has the trajectories, wins and returns of the exact one
    tree, exact = merged.trees["t/0"], build_trees(trajs)["t/0"]
    assert tree.summary().trajectories == exact.summary().trajectories == 60
    assert tree.successes(0) == exact.successes(0) and tree.return_sum(0) == exact.return_sum(0)
    shuffled = trajs[:]
    random.Random(1).shuffle(shuffled)
    assert merge_trees(shuffled, TreeConfig(merge="similarity")).trees["t/0"].to_json() == tree.to_json()


# --------------------------------------------------------------------------------- local embedding model


@pytest.fixture
def tiny_encoder(tmp_path):
    """A random two-layer BERT with a word-piece vocabulary, saved into a local folder (nothing downloaded)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    words = ["you", "are", "in", "the", "hall", "kitchen", "door", "is", "open", "red", "moves"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *"abcdefghijklmnopqrstuvwxyz0123456789.:;"]
    folder = tmp_path / "encoder"
    folder.mkdir()
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizer(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    return folder


def test_model_embedder_mean_pools_and_normalises(tiny_encoder) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    from w2s_agents.agents.embedding import ModelEmbedder, load_embedder

    emb = load_embedder(tiny_encoder, device="cpu")
    assert isinstance(emb, ModelEmbedder) and emb.name == f"model:{tiny_encoder}"
    texts = ["you are in the hall. moves: 3", "you are in the hall. moves: 3", "red door", "kitchen"]
    vec = emb.embed(texts)
    assert np.allclose(np.linalg.norm(vec.matrix, axis=1), 1.0)
    assert vec.cosine(0, [1])[0] == pytest.approx(1.0)
    # a text's embedding does not depend on the longer texts padded beside it: the mean is over its own tokens
    alone = emb.embed(["kitchen"]).matrix[0]
    assert np.allclose(alone, vec.matrix[3], atol=1e-6)
    # and it is the mean of the last hidden state, L2-normalised
    tok = AutoTokenizer.from_pretrained(tiny_encoder)
    model = AutoModel.from_pretrained(tiny_encoder).eval()
    with torch.no_grad():
        hidden = model(**tok(["kitchen"], return_tensors="pt")).last_hidden_state[0].mean(dim=0)
    assert np.allclose(alone, (hidden / hidden.norm()).numpy(), atol=1e-6)
    # the merge takes it in place of the TF-IDF embedding
    trajs = _pair()
    tree = build_trees(trajs, similarity=SimilarityMerge(0.5, emb))["t/0"]
    cos = emb.embed([normalize_text(HALL.format(1)), normalize_text(HALL.format(7))]).cosine(0, [1])[0]
    assert len(tree) == (3 if cos >= 0.5 else 4)


def test_model_embedder_refuses_what_is_not_a_local_model(tmp_path) -> None:
    from w2s_agents.agents.embedding import load_embedder

    assert isinstance(load_embedder(None), TfidfEmbedder)
    with pytest.raises(ModelLoadError, match="is not a local directory"):
        load_embedder(tmp_path / "sentence-transformers/all-MiniLM-L6-v2")
    with pytest.raises(ModelLoadError, match=r"no config\.json here"):
        load_embedder(tmp_path)


# ---------------------------------------------------------------------------------- config, stage, CLI


def test_tree_config_checks_xi_sim() -> None:
    from w2s_agents.pipeline.experiment import load_experiment

    for bad in ("0", "-0.5", "1.5", ".nan"):
        with pytest.raises(ConfigError, match=r"'xi_sim' must be a number in \(0, 1\]"):
            load_experiment(None, [f"tree.xi_sim={bad}"])
    with pytest.raises(ConfigError, match="merge"):
        load_experiment(None, ["tree.merge=fuzzy"])
    cfg = load_experiment(None, ["tree.merge=similarity", "tree.xi_sim=1"])
    assert (cfg.tree.merge, cfg.tree.xi_sim, cfg.tree.embedder) == ("similarity", 1, None)


def test_exact_merge_keeps_every_stage_key() -> None:
    from w2s_agents.pipeline.cache import stage_keys
    from w2s_agents.pipeline.experiment import load_experiment
    from w2s_agents.pipeline.runner import build_stages

    def keys(*overrides: str) -> dict[str, str]:
        return stage_keys(build_stages(load_experiment(None, list(overrides)), 0))

    base = keys()
    trees_stage = next(s for s in build_stages(load_experiment(None), 0) if s.name == "trees")
    assert trees_stage.config is None  # the trees stage hashes no config part with the exact merge
    assert keys("tree.xi_sim=0.5", "tree.embedder=/some/model") == base
    sim = keys("tree.merge=similarity")
    changed = {name for name in base if sim[name] != base[name]}
    assert "trees" in changed and "explore" not in changed and "tasks" not in changed


def _write_store(path, trajs) -> None:
    with TrajectoryStore(path, fsync=False) as st:
        for t in trajs:
            st.append(t)


def test_trees_stage_records_node_counts_both_ways(tmp_path) -> None:
    from w2s_agents.pipeline.cache import StageContext
    from w2s_agents.pipeline.experiment import TreeConfig
    from w2s_agents.pipeline.stages.explore import run_trees

    _write_store(tmp_path / "explore" / "trajectories.jsonl", _noisy_set(20, seed=5))

    def stage(name: str, tree: TreeConfig | None) -> tuple[dict, list]:
        ctx = StageContext(name, tmp_path / name, tmp_path, "key", {"explore": tmp_path / "explore"})
        summary = run_trees(ctx, tree=tree, device="cpu")
        return summary, json.loads((tmp_path / name / "trees.json").read_text())

    summary, rows = stage("exact", None)
    assert set(summary) == {"trees", "nodes"} and all("nodes_exact" not in r for r in rows)
    sim_summary, sim_rows = stage("sim", TreeConfig(merge="similarity"))
    assert [r["task_id"] for r in sim_rows] == [r["task_id"] for r in rows] == ["t/0"]
    (row,) = sim_rows
    assert (
        row["nodes_exact"] == rows[0]["nodes"]
        and row["nodes_similarity"] == row["nodes"] < row["nodes_exact"]
    )
    assert sim_summary["nodes_exact"] == summary["nodes"] and sim_summary["nodes_similarity"] == row["nodes"]
    assert sim_summary["xi_sim"] == 0.9 and sim_summary["embedder"] == "tfidf-char3-5"


def test_metrics_and_report_show_both_counts(tmp_path) -> None:
    from w2s_agents.pipeline.experiment import load_experiment
    from w2s_agents.pipeline.metrics import aggregate
    from w2s_agents.pipeline.report import write_report

    seed_dir = tmp_path / "seed-0"
    for name, data in {
        "eval/eval.json": {"models": {}},
        "explore/explore.json": {"episodes": 8, "env_steps": 30, "tokens": 0},
        "trees/trees.json": [
            {
                "task_id": "a",
                "nodes": 7,
                "depth": 3,
                "success_leaves": 1,
                "nodes_exact": 9,
                "nodes_similarity": 7,
            },
            {
                "task_id": "b",
                "nodes": 5,
                "depth": 2,
                "success_leaves": 0,
                "nodes_exact": 5,
                "nodes_similarity": 5,
            },
        ],
    }.items():
        (seed_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (seed_dir / name).write_text(json.dumps(data))
    cfg = load_experiment(None, ["tree.merge=similarity", "tree.xi_sim=0.85"])
    trees = aggregate(tmp_path, [0], cfg)["trees"]
    assert (trees["merge"], trees["xi_sim"], trees["nodes_exact"], trees["nodes_similarity"]) == (
        "similarity",
        0.85,
        14,
        12,
    )
    text = write_report({"schema": "w2s.metrics/1", "trees": trees}, tmp_path, plots=False).read_text()
    assert "| nodes_exact | 14 |" in text and "| nodes_similarity | 12 |" in text
    assert (
        "(cosine >= 0.85): 12 nodes (14.3% fewer); the exact merge of the same trajectories gives 14." in text
    )


def test_cli_tree_build_merges_by_similarity(tmp_path, capsys) -> None:
    from w2s_agents.cli import main

    store = tmp_path / "trajectories.jsonl"
    _write_store(store, _pair())
    assert main(["tree", "build", str(store), "-o", str(tmp_path / "exact")]) == 0
    assert "task t/0, 4 nodes" in capsys.readouterr().out
    assert main(["tree", "build", str(store), "-o", str(tmp_path / "sim"), "--merge", "similarity"]) == 0
    out = capsys.readouterr().out
    assert "task t/0, 3 nodes" in out and "4 nodes by the exact merge" in out
    assert "similarity merge (xi_sim 0.9, tfidf-char3-5): 3 nodes in 1 trees; the exact merge gives 4" in out
    args = [
        "tree",
        "build",
        str(store),
        "-o",
        str(tmp_path / "high"),
        "--merge",
        "similarity",
        "--xi-sim",
        "1",
    ]
    assert main(args) == 0 and "task t/0, 4 nodes" in capsys.readouterr().out
    for bad, message in (
        (
            ["--merge", "similarity", "--xi-sim", "1.5"],
            "w2s: error: --xi-sim 1.5: must be a number in (0, 1]",
        ),
        (["--xi-sim", "0.8"], "w2s: error: --xi-sim and --embedder set the similarity merge"),
        (["--merge", "similarity", "--embedder", str(tmp_path / "none")], "is not a local directory"),
    ):
        assert main(["tree", "build", str(store), "-o", str(tmp_path / "bad"), *bad]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()
