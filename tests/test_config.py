"""Config system: strict keys and types, overrides, errors that name key and place, saving and hashing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from w2s_agents.config import (
    check,
    config_hash,
    describe_config,
    from_dict,
    load_config,
    load_yaml,
    option,
    save_config,
)
from w2s_agents.errors import ConfigError
from w2s_agents.pipeline.experiment import ExperimentConfig, load_experiment, prepare_run_dir


@dataclass(frozen=True)
class Sampler:
    temperature: float = option(1.0, "softmax temperature")
    top_p: float = option(1.0, "nucleus mass")

    def __post_init__(self) -> None:
        check(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class Section:
    lr: float = option(1e-5, "learning rate")
    steps: int = option(10, "number of steps")
    mode: Literal["generate", "choose"] = option("generate", "action mode")
    name: str = option("x", "a name")
    out: Path = option(Path("runs"), "a folder")
    tags: tuple[str, ...] = option((), "labels")
    samplers: list[Sampler] = option(default_factory=list, help="sampling settings")
    weights: dict[str, float] = option(default_factory=dict, help="per-source weights")
    limit: int | None = option(None, "optional cap")
    flag: bool = option(False, "a switch")


@dataclass(frozen=True)
class Root:
    train: Section = option(default_factory=Section, help="training")
    seed: int = option(0, "seed")


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_yaml_values_are_typed_and_nested(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        "seed: 3\ntrain:\n  lr: 1e-4\n  steps: 7\n  mode: choose\n  tags: [a, b]\n"
        "  samplers:\n    - {temperature: 0.7, top_p: 0.95}\n    - {temperature: 1}\n"
        "  weights: {weak: 0.5}\n  limit: 4\n  flag: true\n  out: /tmp/x\n",
    )
    cfg = load_config(Root, p)
    assert cfg.seed == 3
    assert cfg.train.lr == pytest.approx(1e-4)  # YAML reads "1e-4" as a string; the float field converts it
    assert cfg.train.steps == 7 and cfg.train.mode == "choose" and cfg.train.flag is True
    assert cfg.train.tags == ("a", "b")
    assert cfg.train.samplers == [Sampler(0.7, 0.95), Sampler(1.0, 1.0)]
    assert isinstance(cfg.train.samplers[1].temperature, float)
    assert cfg.train.weights == {"weak": 0.5}
    assert cfg.train.limit == 4
    assert cfg.train.out == Path("/tmp/x")


def test_unknown_key_names_key_line_and_valid_keys(tmp_path: Path) -> None:
    p = write(tmp_path, "seed: 1\ntrain:\n  lr: 0.1\n  stesp: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(Root, p)
    msg = str(err.value)
    assert f"{p}:4:" in msg
    assert "unknown config key 'train.stesp'" in msg
    assert "did you mean 'steps'" in msg
    assert "flag, limit, lr, mode, name, out, samplers, steps, tags, weights" in msg
    assert "\n" not in msg


def test_unknown_top_level_key(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"c.yaml:2: unknown config key 'sede'.*valid keys of the top level: seed, train"
    ):
        load_config(Root, write(tmp_path, "seed: 1\nsede: 2\n"))


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("train:\n  steps: ten\n", "c.yaml:2: config key 'train.steps': expected int, got 'ten' (str)"),
        ("train:\n  steps: 2.5\n", "config key 'train.steps': expected int, got 2.5 (float)"),
        ("train:\n  flag: 1\n", "config key 'train.flag': expected bool, got 1 (int)"),
        ("train:\n  lr: fast\n", "config key 'train.lr': expected float, got 'fast' (str)"),
        (
            "train:\n  mode: walk\n",
            "config key 'train.mode': expected one of 'generate', 'choose', got 'walk'",
        ),
        ("train:\n  samplers: 3\n", "config key 'train.samplers': expected list of mapping (Sampler), got 3"),
        ("train:\n  samplers:\n    - {temperature: hot}\n", "config key 'train.samplers[0].temperature'"),
        ("train: 5\n", "config key 'train': expected mapping (Section), got 5 (int)"),
        ("train:\n  limit: [1]\n", "config key 'train.limit': expected int or null, got [1]"),
        ("train:\n  name: 12\n", "config key 'train.name': expected str, got 12 (int)"),
    ],
)
def test_wrong_type_names_key_value_and_expected_type(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(Root, write(tmp_path, text))
    assert fragment in str(err.value)


def test_post_init_check_names_section_and_key(tmp_path: Path) -> None:
    p = write(tmp_path, "train:\n  samplers:\n    - {top_p: 1.5}\n")
    with pytest.raises(
        ConfigError, match=r"config section 'train.samplers\[0\]': 'top_p' must be in \(0, 1\], got 1.5"
    ):
        load_config(Root, p)


def test_overrides_are_typed_by_target_field() -> None:
    cfg = load_config(
        Root,
        None,
        [
            "seed=5",
            "train.lr=3e-4",
            "train.name=123",
            "train.tags=[x, y]",
            "train.limit=null",
            "train.flag=true",
        ],
    )
    assert cfg.seed == 5 and cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.name == "123"  # a str field takes the text as written
    assert cfg.train.tags == ("x", "y") and cfg.train.limit is None and cfg.train.flag is True


def test_override_applies_after_file(tmp_path: Path) -> None:
    p = write(tmp_path, "seed: 1\ntrain:\n  steps: 3\n")
    cfg = load_config(Root, p, ["train.steps=9"])
    assert cfg.seed == 1 and cfg.train.steps == 9


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("seed=abc", "override 'seed=abc': config key 'seed': expected int, got 'abc' (str)"),
        ("train.nope=1", "override 'train.nope=1': unknown config key 'train.nope'"),
        ("seed", "override 'seed': expected KEY=VALUE"),
        ("train..lr=1", "expected KEY=VALUE with a dotted key"),
    ],
)
def test_bad_override_errors(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(Root, None, [override])
    assert fragment in str(err.value)


def test_invalid_yaml_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"c.yaml:2: invalid YAML"):
        load_config(Root, write(tmp_path, "seed: 1\n\tbad: 2\n"))
    with pytest.raises(ConfigError, match=r"must be a mapping"):
        load_config(Root, write(tmp_path, "- 1\n- 2\n", "l.yaml"))
    with pytest.raises(ConfigError, match=r"d.yaml:2: duplicate config key 'seed'"):
        load_config(Root, write(tmp_path, "seed: 1\nseed: 2\n", "d.yaml"))
    with pytest.raises(ConfigError, match=r"config file not found: .*missing.yaml"):
        load_config(Root, tmp_path / "missing.yaml")


def test_empty_file_is_refused_and_an_empty_mapping_gives_defaults(tmp_path: Path) -> None:
    for text in ("", "# nothing\n", "\n  \n"):
        with pytest.raises(ConfigError, match=r"c\.yaml: the config file is empty \(no keys\)"):
            load_config(Root, write(tmp_path, text))
    assert load_config(Root, write(tmp_path, "# every default, on purpose\n{}\n")) == Root()


def test_missing_required_key() -> None:
    @dataclass(frozen=True)
    class Needs:
        path: str = option(help="required path")

    with pytest.raises(ConfigError, match="missing required config key 'path'"):
        from_dict(Needs, {})


def test_save_reload_and_hash(tmp_path: Path) -> None:
    cfg = load_config(Root, None, ["seed=4", "train.samplers=[{temperature: 0.5}]", "train.tags=[a]"])
    path = save_config(cfg, tmp_path / "run")
    assert path.name == "config.yaml"
    assert config_hash(cfg) in path.read_text()
    again = load_config(Root, path)
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)
    assert config_hash(load_config(Root, None, ["seed=5"])) != config_hash(cfg)
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp file left


def test_load_yaml_records_key_lines(tmp_path: Path) -> None:
    data = load_yaml(write(tmp_path, "a: 1\nb:\n  c: 2\n"))
    assert data.key_lines == {"a": 1, "b": 2}
    assert data["b"].key_lines == {"c": 3}


def test_option_requires_help() -> None:
    with pytest.raises(TypeError):
        option(1)


def test_describe_config_lists_every_leaf_with_help() -> None:
    rows = describe_config(ExperimentConfig)
    keys = [r[0] for r in rows]
    assert "run.seed" in keys and "weak.path" in keys and "strong.tiny_preset" in keys
    assert all(help_text for *_, help_text in rows)


def test_every_shipped_config_loads(repo_root: Path) -> None:
    from w2s_agents.rollout import load_job
    from w2s_agents.trainers import TrainJobConfig

    files = sorted((repo_root / "configs").glob("*.yaml"))
    assert files, "configs/ holds no YAML"
    for f in files:
        # each with the loader of the command it is for: rollout-* `w2s rollout`, train-* `w2s train`
        if f.name.startswith("rollout-"):
            load_job(f)
        elif f.name.startswith("train-"):
            load_config(TrainJobConfig, f)
        else:
            load_experiment(f)


def test_quickstart_yaml_is_the_embedded_default(repo_root: Path) -> None:
    assert (
        load_experiment(repo_root / "configs" / "quickstart.yaml")
        == load_experiment(None)
        == ExperimentConfig()
    )


def test_experiment_checks_and_run_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config section 'run': 'name' must be letters"):
        load_experiment(None, ["run.name=../escape"])
    with pytest.raises(ConfigError, match=r"'device' must be auto, cpu, cuda, cuda:N or mps"):
        load_experiment(None, ["weak.device=gpu0"])
    cfg = load_experiment(None, [f"run.out_dir={tmp_path}", "run.name=demo", "run.seed=2"])
    run_dir = prepare_run_dir(cfg)
    assert run_dir == tmp_path / "demo"
    assert load_experiment(run_dir / "config.yaml") == cfg


@dataclass(frozen=True)
class Inner:
    a: int = option(1, "a")
    b: int = option(2, "b")


@dataclass(frozen=True)
class Outer:
    x: Inner = option(default_factory=lambda: Inner(a=10, b=20), help="x")
    y: Inner = option(default_factory=Inner, help="y")


def test_setting_one_key_keeps_the_other_values_of_a_sections_own_default(tmp_path):
    from w2s_agents.config import load_config

    cfg = load_config(Outer, None, ["x.a=5"])
    assert cfg.x == Inner(a=5, b=20)  # b keeps the section's default 20, not the class default 2
    path = tmp_path / "c.yaml"
    path.write_text("x:\n  b: 7\ny:\n  a: 3\n")
    cfg = load_config(Outer, path)
    assert cfg.x == Inner(a=10, b=7) and cfg.y == Inner(a=3, b=2)


def test_yaml_merge_keys_may_be_overridden(tmp_path):
    from w2s_agents.config import load_config

    path = tmp_path / "m.yaml"
    path.write_text("x: &base\n  a: 4\n  b: 5\ny:\n  <<: *base\n  b: 6\n")
    cfg = load_config(Outer, path)
    assert cfg.x == Inner(a=4, b=5) and cfg.y == Inner(a=4, b=6)
    path.write_text("y:\n  <<: {a: 1}\n  b: 6\n  b: 7\n")
    with pytest.raises(ConfigError, match=r"m\.yaml:4: duplicate config key 'b'"):
        load_config(Outer, path)


def test_quickstart_eval_rollout_config_plays_as_the_default_eval(repo_root: Path) -> None:
    """configs/rollout-quickstart-eval.yaml stays the default experiment's evaluation: suite, step limit,
    sampler, the agent keys that change a choice, and the first 20 valid task ids of the default's suite."""
    from w2s_agents.rollout import load_job
    from w2s_agents.rollout.job import resolve_tasks

    job = load_job(repo_root / "configs" / "rollout-quickstart-eval.yaml")
    default = ExperimentConfig()
    assert job.rollout.suite == default.tasks.suite
    assert job.rollout.max_steps == default.tasks.max_steps
    assert [(s.temperature, s.top_p) for s in job.rollout.samplers] == [
        (s.temperature, s.top_p) for s in default.eval.samplers
    ]
    assert job.rollout.seeds == default.eval.seeds
    for key in ("mode", "prompt_admissible", "prompt_grammar", "length_normalize", "bare_action"):
        assert getattr(job.agent, key) == getattr(default.agent, key), key
    assert job.agent.max_context_tokens >= default.agent.max_context_tokens
    ids = resolve_tasks(job.rollout)
    assert job.rollout.split == "valid" and ids == [f"{default.tasks.suite}/valid/{i}" for i in range(20)]
