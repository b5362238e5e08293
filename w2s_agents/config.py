"""Typed configuration: dataclasses with defaults and help, loaded from YAML with dotted CLI overrides.

Each component owns a config dataclass whose every field has a default and a help string (declared with
:func:`option`) and whose ``__post_init__`` validates ranges. This module turns YAML files and ``key.sub=value``
overrides into those dataclasses, strictly:

* an unknown key fails, naming the key, where it was written (``file:line`` or the override) and the valid keys;
* a value of the wrong type fails, naming the key, the value and the expected type;
* the resolved config can be dumped back to YAML, hashed (stages are cached by that hash) and saved atomically
  next to a run's outputs.

Example::

    cfg = load_config(ExperimentConfig, "configs/quickstart.yaml", ["run.seed=3", "weak.tiny_preset=nano"])
    save_config(cfg, run_dir)

:class:`RunConfig` is the ``run:`` section shared by every job (``w2s run``, ``w2s rollout``): name, folder, seed.

Supported field types: ``bool``, ``int``, ``float``, ``str``, ``pathlib.Path``, ``Literal[...]``, ``X | None``,
``list[X]``, ``tuple[X, ...]``, ``dict[str, X]``, ``Any`` and nested config dataclasses.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from w2s_agents.atomic import atomic_write
from w2s_agents.errors import ConfigError

__all__ = [
    "RunConfig",
    "check",
    "config_hash",
    "config_to_dict",
    "describe_config",
    "dump_config",
    "from_dict",
    "load_config",
    "load_yaml",
    "option",
    "save_config",
]

T = TypeVar("T")

_MISSING = dataclasses.MISSING


def option(
    default: Any = _MISSING,
    help: str = "",
    *,
    default_factory: Any = _MISSING,
    omit_default: bool = False,
) -> Any:
    """Declare a config field with a default and a help string.

    Args:
        default: the default value (immutable values only; use ``default_factory`` for lists and dicts).
        help: one sentence shown by ``w2s config keys`` and written as documentation of the key.
        default_factory: a zero-argument callable producing the default (for mutable defaults).
        omit_default: leave the key out of :func:`config_to_dict` (so out of the saved config and of every hash
            of it) while it has its default, so that adding it to a section changes no existing hash.

    Returns:
        A :func:`dataclasses.field` carrying the help text in its metadata.
    """
    if not help:
        raise TypeError("every config option needs a help string")
    if default is not _MISSING and default_factory is not _MISSING:
        raise TypeError("give either default or default_factory, not both")
    metadata = {"help": help, "omit_default": omit_default}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check(condition: bool, key: str, message: str) -> None:
    """Raise :class:`ConfigError` ``"'key' message"`` unless ``condition`` holds (for ``__post_init__``)."""
    if not condition:
        raise ConfigError(f"'{key}' {message}")


# --------------------------------------------------------------------------------------------------- YAML


class _LinedDict(dict):
    """A dict loaded from YAML that remembers the line of each key (1-based)."""

    key_lines: dict[str, int]
    key_own: dict[str, bool]
    line: int


class _LineLoader(yaml.SafeLoader):
    """SafeLoader whose mappings remember the line numbers of their keys."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> _LinedDict:
    # keys written in this mapping (not brought in by a YAML merge key '<<', which they may override)
    own = {id(k) for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"}
    loader.flatten_mapping(node)
    out = _LinedDict()
    out.key_lines = {}
    out.key_own = {}
    out.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            raise ConfigError(
                f"{node.start_mark.name}:{key_node.start_mark.line + 1}: config keys must be strings, got {key!r}"
            )
        if key in out and id(key_node) in own and out.key_own.get(key, False):
            raise ConfigError(
                f"{node.start_mark.name}:{key_node.start_mark.line + 1}: duplicate config key '{key}'"
            )
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = key_node.start_mark.line + 1
        out.key_own[key] = id(key_node) in own
    return out


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping from ``path``, remembering the line of every key for error messages.

    Raises:
        ConfigError: the file is missing, empty (nothing but comments; ``{}`` is an empty mapping), is not
            valid YAML (with file:line), or is not a mapping.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {p}: {exc}") from None
    loader = _LineLoader(text)
    loader.name = str(p)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    finally:
        loader.dispose()
    if data is None:  # nothing but blanks and comments: most likely the wrong file, or one not saved yet
        raise ConfigError(
            f"{p}: the config file is empty (no keys); write the keys to set, or '{{}}' to take every default"
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"{p}:1: a config file must be a mapping of keys to values, got {type(data).__name__}"
        )
    return data


# ------------------------------------------------------------------------------------------- overrides


@dataclasses.dataclass(frozen=True)
class _Override:
    """A value given on the command line: kept as text until the target field's type is known."""

    text: str
    origin: str  # the whole "key=value" argument, for error messages


def _apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override '{item}': expected KEY=VALUE with a dotted key, e.g. run.seed=3")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = _LinedDict()
                child.key_lines, child.line = {}, 0
                node[part] = child
            node = child
        node[parts[-1]] = _Override(text.strip(), item)
        if isinstance(node, _LinedDict):
            node.key_lines.pop(parts[-1], None)
    return data


# ------------------------------------------------------------------------------------------- coercion


class _Where:
    """Where a value came from, rendered as a message prefix."""

    def __init__(self, source: str | None, line: int | None, override: str | None = None) -> None:
        self.source, self.line, self.override = source, line, override

    def __str__(self) -> str:
        if self.override is not None:
            return f"override '{self.override}': "
        if self.source and self.line:
            return f"{self.source}:{self.line}: "
        if self.source:
            return f"{self.source}: "
        return ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, Sequence):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return f"list of {len(args)} values ({', '.join(_type_name(a) for a in args)})"
    if origin in (dict, Mapping):
        return f"mapping of str to {_type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    if tp is Path:
        return "path"
    return getattr(tp, "__name__", str(tp))


def _fail(where: _Where, key: str, value: Any, tp: Any) -> typing.NoReturn:
    shown = value.text if isinstance(value, _Override) else value
    raise ConfigError(
        f"{where}config key '{key}': expected {_type_name(tp)}, got {shown!r} ({type(shown).__name__})"
    )


def _coerce(value: Any, tp: Any, key: str, where: _Where) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert it (list->tuple, str->Path, int->float)."""
    if isinstance(value, _Override):
        where = _Where(None, None, value.origin)
        if _accepts_str(tp) and value.text not in ("null", "~", ""):
            return _coerce(value.text, tp, key, where)
        try:
            parsed = yaml.safe_load(value.text) if value.text else None
        except yaml.YAMLError:
            _fail(where, key, value, tp)
        return _coerce(parsed, tp, key, where)

    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            _fail(where, key, value, tp)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except ConfigError:
                continue
        _fail(where, key, value, tp)
    if origin is typing.Literal:
        # compare types too: True == 1 must not select the literal 1
        if any(value == a and type(value) is type(a) for a in typing.get_args(tp)):
            return value
        _fail(where, key, value, tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        _fail(where, key, value, tp)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        _fail(where, key, value, tp)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        _fail(where, key, value, tp)
    if tp is str:
        if isinstance(value, str):
            return value
        _fail(where, key, value, tp)
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        _fail(where, key, value, tp)
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            _fail(where, key, value, tp)
        args = typing.get_args(tp)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                _fail(where, key, value, tp)
            return tuple(
                _coerce(v, a, f"{key}[{i}]", where) for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
        elem = args[0] if args else Any
        items = [_coerce(v, elem, f"{key}[{i}]", where) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, dict):
            _fail(where, key, value, tp)
        _, vt = typing.get_args(tp) or (str, Any)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                _fail(where, f"{key}.{k}", k, str)
            out[k] = _coerce(v, vt, f"{key}.{k}", _child_where(value, k, where))
        return out
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            _fail(where, key, value, tp)
        return _build(tp, value, key, where.source)
    raise TypeError(f"config key '{key}': unsupported annotation {tp!r}")


def _accepts_str(tp: Any) -> bool:
    if tp is str or tp is Path:
        return True
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_accepts_str(a) for a in typing.get_args(tp))
    return False


def _child_where(data: Mapping[str, Any], key: str, parent: _Where) -> _Where:
    lines = getattr(data, "key_lines", {})
    return _Where(parent.source, lines.get(key), None)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return _MISSING


def _build(cls: type[T], data: Mapping[str, Any], prefix: str, source: str | None, base: Any = None) -> T:
    """Build ``cls`` from ``data``; keys missing from ``data`` keep the values of ``base`` (an instance of
    ``cls``, e.g. a section's own default) or else the field defaults, so that setting one key of a section
    whose default differs from its class's defaults keeps the section's other values."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    if base is not None:
        kwargs = {name: getattr(base, name) for name in fields}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        where = _child_where(data, key, _Where(source, None))
        if isinstance(value, _Override):
            where = _Where(None, None, value.origin)
        if key not in fields:
            valid = sorted(fields)
            hint = difflib.get_close_matches(str(key), valid, n=1)
            did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
            section = f"'{prefix}'" if prefix else "the top level"
            raise ConfigError(
                f"{where}unknown config key '{full}'{did_you_mean}; valid keys of {section}: {', '.join(valid)}"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict) and not isinstance(value, _Override):
            default = getattr(base, key) if base is not None else _field_default(fields[key])
            kwargs[key] = _build(tp, value, full, source, default if isinstance(default, tp) else None)
            continue
        kwargs[key] = _coerce(value, tp, full, where)
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs and f.default is _MISSING and f.default_factory is _MISSING
    ]
    if missing:
        where = _Where(source, getattr(data, "line", None) or None)
        raise ConfigError(
            f"{where}missing required config key '{prefix + '.' if prefix else ''}{missing[0]}'"
        )
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        where = _Where(source, getattr(data, "line", None) or None)
        section = f"config section '{prefix}'" if prefix else "config"
        raise ConfigError(f"{where}{section}: {exc}") from None


def from_dict(cls: type[T], data: Mapping[str, Any], *, source: str | None = None) -> T:
    """Build the config dataclass ``cls`` from a mapping, validating every key and value.

    Args:
        cls: a dataclass whose fields are declared with :func:`option`.
        data: nested mapping (as loaded from YAML); missing keys take their defaults.
        source: where ``data`` came from (a file path), used in error messages.

    Raises:
        ConfigError: an unknown key, a wrong type, a missing required key or a failed range check.
    """
    return _build(cls, data, "", source)


def load_config(cls: type[T], path: str | os.PathLike[str] | None = None, overrides: Iterable[str] = ()) -> T:
    """Load ``cls`` from an optional YAML file and ``key.sub=value`` overrides (applied after the file).

    Values of overrides are parsed as YAML (``run.seed=3``, ``samplers=[0.7,1.0]``, ``weak.path=null``) except
    that a field typed ``str`` or ``Path`` takes the text as written.

    Raises:
        ConfigError: see :func:`from_dict`; errors name ``file:line`` or the offending override.
    """
    data: dict[str, Any] = load_yaml(path) if path is not None else {}
    _apply_overrides(data, overrides)
    return _build(cls, data, "", str(path) if path is not None else None)


# ------------------------------------------------------------------------------------------- output


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, JSON- and YAML-safe nested dict of a config dataclass (tuples as lists, paths as str); a key
    declared with ``option(omit_default=True)`` is left out while it has its default."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {
                f.name: plain(getattr(v, f.name))
                for f in dataclasses.fields(v)
                if not (f.metadata.get("omit_default") and getattr(v, f.name) == _default_of(f))
            }
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(cfg)


def _default_of(f: dataclasses.Field) -> Any:
    """The default value of a config field."""
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return f.default


def dump_config(cfg: Any) -> str:
    """The resolved config as YAML text, keys in declaration order."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)


def config_hash(cfg: Any) -> str:
    """A stable 16-hex-digit hash of the resolved config (independent of key order and formatting)."""
    canonical = json.dumps(config_to_dict(cfg), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def save_config(cfg: Any, directory: str | os.PathLike[str], name: str = "config.yaml") -> Path:
    """Write the resolved config as YAML into ``directory`` atomically (temp file + rename) and return its path."""
    target = Path(directory) / name
    with atomic_write(target) as fh:
        fh.write(f"# resolved w2s-agents config (hash {config_hash(cfg)})\n" + dump_config(cfg))
    return target


def describe_config(cls: type[Any], prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """Every leaf key of ``cls`` as ``(dotted key, type, default, help)``, nested sections flattened."""
    rows: list[tuple[str, str, Any, str]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe_config(tp, key + "."))
            continue
        if f.default is not _MISSING:
            default = f.default
        elif f.default_factory is not _MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        rows.append((key, _type_name(tp), config_to_dict(default), f.metadata.get("help", "")))
    return rows


# ------------------------------------------------------------------------------------------- sections


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Where a run writes and how it is seeded."""

    name: str = option("quickstart", "run name; outputs go to <out_dir>/<name>/")
    out_dir: Path = option(Path("runs"), "folder holding one sub-folder per run")
    seed: int = option(0, "seed of every random source of the run (derived per stage and episode)")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = option("INFO", "logging level")
    seeds: list[int] = option(
        default_factory=list,
        help="run the whole pipeline once per seed (in <run dir>/seed-<k>/) and report over all of them; "
        "empty: just 'seed'",
    )
    threads: int = option(0, "torch threads of the run (0: torch's default)")

    def __post_init__(self) -> None:
        check(all(s >= 0 for s in self.seeds), "seeds", f"must be non-negative, got {self.seeds}")
        check(len(set(self.seeds)) == len(self.seeds), "seeds", f"must not repeat, got {self.seeds}")
        check(self.threads >= 0, "threads", f"must be >= 0, got {self.threads}")
        check(
            re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name) is not None,
            "name",
            f"must be letters, digits, '.', '_' or '-' (it names a folder), got {self.name!r}",
        )
        check(self.seed >= 0, "seed", f"must be non-negative, got {self.seed}")

    @property
    def run_dir(self) -> Path:
        """The run's output folder."""
        return self.out_dir / self.name

    @property
    def seed_list(self) -> list[int]:
        """The run seeds: ``seeds``, or ``[seed]`` when it is empty."""
        return list(self.seeds) or [self.seed]
