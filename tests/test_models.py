"""Local model loading and tiny models: save/reload identity, presets, tokenizer, chat template, fast failure."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from w2s_agents.agents.models import (
    TINY_PRESETS,
    TOKENIZER_FILES,
    build_tiny_model,
    count_parameters,
    create_tiny_model,
    load_model,
    resolve_dtype,
    train_tokenizer,
)
from w2s_agents.errors import ModelLoadError


@pytest.fixture(scope="module")
def tokenizer(game_texts: list[str]):
    return train_tokenizer(game_texts, vocab_size=2048)


@pytest.fixture(scope="module")
def nano_dir(tmp_path_factory: pytest.TempPathFactory, game_texts: list[str]) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("models") / "nano", game_texts, preset="nano", seed=1)


def test_tiny_model_saved_and_reloaded_gives_identical_logits(nano_dir: Path, game_texts: list[str]) -> None:
    lm = load_model(nano_dir)
    assert lm.device.type == "cpu" and lm.dtype == torch.float32
    batch = lm.tokenizer(game_texts[:4], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = lm.model(**batch).logits
    again = load_model(nano_dir)
    with torch.no_grad():
        logits2 = again.model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape
    assert torch.equal(logits, logits2)
    assert not lm.model.training


def test_tiny_model_build_is_deterministic_for_a_seed(tokenizer) -> None:
    rng_state = torch.random.get_rng_state()
    a = build_tiny_model("nano", tokenizer, seed=3)
    b = build_tiny_model("nano", tokenizer, seed=3)
    c = build_tiny_model("nano", tokenizer, seed=4)
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # global RNG untouched
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def _llama_parameters(vocab: int, h: int, layers: int, inter: int) -> int:
    # tied embedding + per layer (q, k, v, o projections; gate, up, down MLP; two RMSNorms) + final norm
    return vocab * h + layers * (4 * h * h + 3 * h * inter + 2 * h) + h


@pytest.mark.parametrize(
    ("preset", "low", "high"),
    [("nano", 0.08e6, 0.1e6), ("weak", 0.2e6, 0.22e6), ("small", 0.9e6, 0.95e6), ("strong", 3.8e6, 4.0e6),
     ("base", 7.2e6, 7.5e6)],
)  # fmt: skip
def test_presets_have_their_documented_size(tokenizer, preset: str, low: float, high: float) -> None:
    p = TINY_PRESETS[preset]
    n = count_parameters(build_tiny_model(preset, tokenizer))
    assert n == _llama_parameters(len(tokenizer), p.hidden_size, p.num_layers, p.intermediate_size)
    at_full_vocab = _llama_parameters(2048, p.hidden_size, p.num_layers, p.intermediate_size)
    assert low <= at_full_vocab <= high, f"{preset}: {at_full_vocab} parameters at a 2,048-token vocabulary"


def test_tokenizer_round_trips_any_text_and_has_special_tokens(tokenizer) -> None:
    for text in [
        "open the fridge",
        "ünïcødé 🙂 \t\n  spaces",
        "\x00\x07 control",
        "<script>alert(1)</script>",
        "",
    ]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    for tok in ("<|user|>", "<|assistant|>", "<|system|>"):
        assert len(tokenizer(tok, add_special_tokens=False)["input_ids"]) == 1


def test_chat_template_marks_agent_tokens(tokenizer) -> None:
    msgs = [
        {"role": "system", "content": "Play the game."},
        {"role": "user", "content": "You see a key."},
        {"role": "assistant", "content": "Thought: I need it.\nAction: take key"},
        {"role": "user", "content": "Taken."},
        {"role": "assistant", "content": "Action: go north"},
    ]
    out = tokenizer.apply_chat_template(
        msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    agent = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert agent == "Thought: I need it.\nAction: take key<|end|>Action: go north<|end|>"
    prompt = tokenizer.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|user|>\nYou see a key.<|end|>\n<|assistant|>\n")
    with pytest.raises(Exception, match="unknown chat role"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_non_local_name_fails_fast_without_download() -> None:
    code = (
        "import time, sys; t=time.perf_counter()\n"
        "from w2s_agents.agents.models import load_model\n"
        "from w2s_agents.errors import ModelLoadError\n"
        "try:\n    load_model('meta-llama/Llama-2-7b-hf')\nexcept ModelLoadError as e:\n"
        "    print(round(time.perf_counter()-t, 3)); print(e); sys.exit(0)\nsys.exit(1)\n"
    )
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    wall = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr
    inside, message = out.stdout.splitlines()[:2]
    assert float(inside) < 2.0, f"import + failure took {inside}s"
    assert wall < 10  # the whole interpreter start included
    assert "'meta-llama/Llama-2-7b-hf' is not a local directory" in message
    assert "downloads nothing" in message


def test_directory_without_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=re.escape(str(tmp_path))):
        load_model(tmp_path)


def test_folder_without_tokenizer_names_the_files_looked_for(nano_dir: Path, tmp_path: Path) -> None:
    from w2s_agents.trainers.model import load_tokenizer

    folder = tmp_path / "no-tokenizer"
    shutil.copytree(nano_dir, folder)
    for name in (*TOKENIZER_FILES, "special_tokens_map.json", "chat_template.jinja"):
        (folder / name).unlink(missing_ok=True)
    for load in (load_model, load_tokenizer):
        with pytest.raises(ModelLoadError) as info:
            load(folder)
        message = str(info.value)
        assert message.startswith(
            f"{folder}: no tokenizer here (looked for tokenizer.json, tokenizer_config.json"
        )
        assert "\n" not in message
    # a tokenizer config without a vocabulary: the loader's whole message, on one line (it spans several)
    (folder / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ModelLoadError) as info:
        load_model(folder)
    message = str(info.value)
    assert message.startswith(f"{folder}: cannot load the tokenizer: ")
    assert "\n" not in message and not message.rstrip().endswith(":")


def test_unavailable_cuda_is_refused(nano_dir: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    with pytest.raises(ModelLoadError, match="no CUDA device is available"):
        load_model(nano_dir, device="cuda")


def test_dtype_resolution() -> None:
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        resolve_dtype("int3", torch.device("cpu"))


def test_create_refuses_to_overwrite_and_replaces_atomically(nano_dir: Path, game_texts: list[str]) -> None:
    with pytest.raises(FileExistsError):
        create_tiny_model(nano_dir, game_texts, preset="nano")
    other = nano_dir.parent / "copy"
    create_tiny_model(other, game_texts, preset="nano", seed=5)
    before = load_model(other).model.model.embed_tokens.weight.clone()
    create_tiny_model(other, game_texts, preset="nano", seed=6, overwrite=True)
    after = load_model(other).model.model.embed_tokens.weight
    assert not torch.equal(before, after)
    assert sorted(p.name for p in nano_dir.parent.iterdir() if p.name.startswith(".")) == []


def test_tokenizer_without_pad_gets_eos_as_pad(tmp_path: Path, game_texts: list[str]) -> None:
    tok = train_tokenizer(game_texts, vocab_size=512)
    model = build_tiny_model("nano", tok)
    tok.pad_token = None
    model.config.pad_token_id = None
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    lm = load_model(tmp_path)
    assert lm.tokenizer.pad_token == lm.tokenizer.eos_token == "<|end|>"
    assert lm.model.config.pad_token_id == lm.tokenizer.eos_token_id


def test_train_tokenizer_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="at least one non-empty text"):
        train_tokenizer(["", ""])
    with pytest.raises(ValueError, match="vocab_size must be at least"):
        train_tokenizer(["abc"], vocab_size=100)
    with pytest.raises(ValueError, match="unknown tiny preset 'huge'"):
        build_tiny_model("huge", train_tokenizer(["abc abc"], vocab_size=300))
    assert set(TINY_PRESETS) >= {"nano", "weak", "strong"}
