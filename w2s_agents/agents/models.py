"""Loading causal LMs from local directories, and building tiny ones for CPU runs and tests.

Every model goes through one path: :func:`load_model` reads a Hugging Face causal LM and its tokenizer from a
local directory (``save_pretrained`` layout). Nothing is downloaded: a name that is not a local directory fails
at once. Devices: CUDA with bf16 when present, CPU fp32 otherwise (both overridable).

Tiny models are real Llama-architecture models built from a size preset (:data:`TINY_PRESETS`) with a
byte-level BPE tokenizer trained locally on given texts (typically the env's own observations and commands)
and a chat template; :func:`create_tiny_model` saves them with ``save_pretrained`` so they load exactly like a
real checkpoint::

    path = create_tiny_model("models/weak", texts, preset="weak", seed=0)
    lm = load_model(path)            # LoadedModel(model=..., tokenizer=..., device=cpu, dtype=float32)
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from w2s_agents.atomic import replace_dir
from w2s_agents.config import check, option
from w2s_agents.errors import ModelLoadError

if TYPE_CHECKING:  # heavy imports stay lazy: `w2s --help` and the core must not load torch
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "TINY_PRESETS",
    "LoadedModel",
    "ModelConfig",
    "TinyPreset",
    "build_tiny_model",
    "check_model_dir",
    "count_parameters",
    "create_tiny_model",
    "load_model",
    "load_tokenizer",
    "resolve_device",
    "resolve_dtype",
    "train_tokenizer",
]

logger = logging.getLogger(__name__)

TINY_MODEL_META = "w2s_model.json"
"""File written beside a tiny model recording how it was built (preset, seed, corpus size, parameters)."""


# --------------------------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class TinyPreset:
    """Shape of a tiny Llama model. Parameter counts below are for the default 2,048-token vocabulary."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    description: str = ""


TINY_PRESETS: dict[str, TinyPreset] = {
    "nano": TinyPreset(
        32, 2, 2, 64, description="~0.09M parameters, two layers: the weak agent of the CPU quickstart"
    ),
    "weak": TinyPreset(64, 2, 2, 128, description="~0.21M parameters, two layers"),
    "small": TinyPreset(128, 4, 4, 256, description="~0.92M parameters"),
    "strong": TinyPreset(
        256, 4, 8, 768, description="~3.9M parameters, four layers: the strong agent of the CPU quickstart"
    ),
    "base": TinyPreset(256, 8, 8, 768, description="~7.3M parameters"),
}

Device = str  # "auto", "cpu", "cuda", "cuda:N", "mps"
DType = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class ModelConfig:
    """Where a model comes from: a local checkpoint directory, or a tiny model built from a preset."""

    path: str | None = option(
        None, "local directory of a saved Hugging Face causal LM; null builds a tiny model from 'tiny_preset'"
    )
    tiny_preset: Literal["nano", "weak", "small", "strong", "base"] = option(
        "weak", "size preset of the tiny model (path: null)"
    )
    vocab_size: int = option(2048, "vocabulary size of the tiny model's locally trained BPE tokenizer")
    device: str = option("auto", "'auto' (CUDA when present, else CPU), 'cpu', 'cuda', 'cuda:N' or 'mps'")
    dtype: DType = option("auto", "'auto' (bf16 on CUDA, fp32 on CPU), 'float32', 'bfloat16' or 'float16'")

    def __post_init__(self) -> None:
        check(self.path is None or bool(self.path.strip()), "path", "must be a directory or null")
        check(
            256 <= self.vocab_size <= 65536, "vocab_size", f"must be in [256, 65536], got {self.vocab_size}"
        )
        check(
            re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device) is not None,
            "device",
            f"must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}",
        )


# ------------------------------------------------------------------------------------------- tokenizer

SPECIAL_TOKENS: dict[str, str] = {
    "pad": "<|pad|>",
    "bos": "<|begin|>",
    "eos": "<|end|>",
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
}
"""Special tokens of tiny tokenizers; ``eos`` ends every chat turn."""

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% elif message['role'] in ['system', 'user'] %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% else %}{{ raise_exception('unknown chat role: ' + message['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
"""Chat template of tiny tokenizers. Assistant turns are wrapped in ``{% generation %}`` so that
``return_assistant_tokens_mask`` (and TRL's assistant-only loss) can find the agent's tokens."""


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 2048, *, min_frequency: int = 2
) -> PreTrainedTokenizerBase:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a Hugging Face fast tokenizer.

    Byte-level means every string (any Unicode, control characters) encodes and decodes back exactly, with
    no unknown token. The result has bos/eos/pad and the role tokens of :data:`SPECIAL_TOKENS` as single ids
    and the :data:`CHAT_TEMPLATE`.

    Args:
        texts: training corpus, e.g. the observations and commands of an env's games.
        vocab_size: target vocabulary size including the 256 byte symbols and the special tokens (a small
            corpus may yield fewer merges).
        min_frequency: minimum pair count for a merge.

    Raises:
        ValueError: ``texts`` is empty or ``vocab_size`` is too small to hold the byte alphabet.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [t for t in texts if t]
    if not corpus:
        raise ValueError("train_tokenizer needs at least one non-empty text")
    specials = list(SPECIAL_TOKENS.values())
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size must be at least {256 + len(specials)}, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        extra_special_tokens=[SPECIAL_TOKENS[r] for r in ("system", "user", "assistant")],
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
    )


# ------------------------------------------------------------------------------------------- tiny models


def _preset(preset: str | TinyPreset) -> TinyPreset:
    if isinstance(preset, TinyPreset):
        return preset
    try:
        return TINY_PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown tiny preset {preset!r}; choose one of {', '.join(TINY_PRESETS)}") from None


def build_tiny_model(
    preset: str | TinyPreset, tokenizer: PreTrainedTokenizerBase, *, seed: int = 0
) -> PreTrainedModel:
    """A randomly initialised ``LlamaForCausalLM`` of the preset's shape, sized to ``tokenizer``'s vocabulary.

    Initialisation is deterministic for a seed (the global torch RNG state is left untouched).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from w2s_agents.log import progress_enabled

    if not progress_enabled():  # transformers' bar when saving shards follows the project's progress switch
        hf_logging.disable_progress_bar()
    p = _preset(preset)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_layers,
        num_attention_heads=p.num_heads,
        num_key_value_heads=p.num_heads,
        max_position_embeddings=p.max_position_embeddings,
        tie_word_embeddings=p.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def count_parameters(model: torch.nn.Module, *, trainable_only: bool = False) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if id(param) in seen or (trainable_only and not param.requires_grad):
            continue
        seen.add(id(param))
        total += param.numel()
    return total


def create_tiny_model(
    out_dir: str | os.PathLike[str],
    texts: Iterable[str],
    *,
    preset: str | TinyPreset = "weak",
    vocab_size: int = 2048,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Train a tokenizer on ``texts``, build a tiny model and save both to ``out_dir`` with ``save_pretrained``.

    The folder is written under a temporary name and renamed when complete, so an interrupted call never
    leaves a half-written model behind. A ``w2s_model.json`` beside the weights records how it was built.

    Returns:
        The model directory, loadable with :func:`load_model`.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is false.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True to replace it)")
    corpus = list(texts)
    tokenizer = train_tokenizer(corpus, vocab_size)
    model = build_tiny_model(preset, tokenizer, seed=seed)
    p = _preset(preset)
    meta = {
        "preset": preset if isinstance(preset, str) else "custom",
        "shape": asdict(p),
        "seed": seed,
        "vocab_size": len(tokenizer),
        "parameters": count_parameters(model),
        "corpus_texts": len(corpus),
        "corpus_chars": sum(len(t) for t in corpus),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / TINY_MODEL_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(
        "built tiny %s model (%d parameters, vocab %d) in %s",
        meta["preset"],
        meta["parameters"],
        meta["vocab_size"],
        out,
    )
    return out


# ------------------------------------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    """A causal LM ready for use, with its tokenizer and where it runs."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    path: Path
    device: torch.device
    dtype: torch.dtype


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` becomes ``cuda`` when a GPU is visible, else ``cpu``; other values are checked and returned.

    Raises:
        ModelLoadError: a CUDA or MPS device is asked for but not available.
    """
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device '{device}' was asked for but no CUDA device is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"device '{device}' does not exist ({torch.cuda.device_count()} CUDA devices)"
            )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"device '{device}' was asked for but MPS is not available")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``"auto"`` is bfloat16 on a CUDA device that supports it and float32 elsewhere."""
    import torch

    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose auto, float32, bfloat16 or float16") from None


def check_model_dir(path: str | os.PathLike[str], *, what: str, why: str) -> Path:
    """``path`` as a local folder saved with ``save_pretrained`` (it holds a ``config.json``).

    Raises:
        ModelLoadError: ``path`` is not a local directory (the message names ``what`` and ends with ``why``), or
            has no ``config.json``.
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ModelLoadError(f"{what} '{path}' is not a local directory; {why}")
    if not (p / "config.json").is_file():
        raise ModelLoadError(f"{p}: no config.json here; not a saved Hugging Face model directory")
    return p


def load_model(
    path: str | os.PathLike[str], *, device: str = "auto", dtype: str = "auto", **model_kwargs: Any
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a local directory, on ``device`` in ``dtype``, in eval mode.

    The path is checked before anything heavy is imported, so a hub name fails at once. A tokenizer without
    a pad token gets ``pad = eos``.

    Args:
        path: a folder written by ``save_pretrained`` (model ``config.json`` + weights + tokenizer files).
        device: see :func:`resolve_device`.
        dtype: see :func:`resolve_dtype`.
        model_kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``attn_implementation``).

    Raises:
        ModelLoadError: the path is not a local model directory, its config.json is not a valid model config,
            or loading it failed (message names the path).
    """
    p = check_model_dir(
        path,
        what="model path",
        why="w2s-agents loads models only from local directories and downloads nothing (give a folder saved "
        "with save_pretrained, or build a tiny model with `w2s model tiny`)",
    )

    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from w2s_agents.log import progress_enabled

    if not progress_enabled():  # transformers' weight-loading bar follows the project's progress switch
        hf_logging.disable_progress_bar()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    try:
        config = AutoConfig.from_pretrained(p, local_files_only=True)
    except Exception as exc:  # not JSON, an unknown model_type, or a failed check of the architecture
        raise ModelLoadError(f"{p / 'config.json'}: not a valid model config: {_one_line(exc)}") from None
    tokenizer = load_tokenizer(p)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            p, config=config, local_files_only=True, dtype=dt, **model_kwargs
        )
    except (
        Exception
    ) as exc:  # a folder's files fail the loader in many ways (OSError, ValueError, hub checks)
        raise ModelLoadError(f"{p}: cannot load the model: {_one_line(exc)}") from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.to(dev)
    model.eval()
    logger.info(
        "loaded %s (%d parameters) on %s as %s", p, count_parameters(model), dev, str(dt).split(".")[-1]
    )
    return LoadedModel(model=model, tokenizer=tokenizer, path=p, device=dev, dtype=dt)


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tiktoken.model",
)
"""Files of which a model folder's tokenizer is made (one at least); :func:`load_tokenizer` looks for them."""


def load_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """The tokenizer of the local model folder ``path`` (``pad = eos`` when it has no pad token).

    Raises:
        ModelLoadError: the folder holds none of :data:`TOKENIZER_FILES` (the message lists them), or loading
            it failed (the loader's whole message, on one line).
    """
    p = Path(path)
    if not any((p / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(
            f"{p}: no tokenizer here (looked for {', '.join(TOKENIZER_FILES)}); save the model's tokenizer "
            "into the folder with tokenizer.save_pretrained"
        )
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
    except Exception as exc:  # e.g. huggingface_hub's StrictDataclassError on an invalid config.json
        raise ModelLoadError(f"{p}: cannot load the tokenizer: {_one_line(exc)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("%s: tokenizer has no pad token; using eos %r", p, tokenizer.eos_token)
    return tokenizer


def _one_line(exc: BaseException) -> str:
    """The whole message of ``exc`` on one line (a loader's message can run over several)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
