"""Task suites: named sets of tasks with train / valid / test splits.

A TextWorld suite (:class:`TextWorldSuite`) is a game recipe (:class:`GameSpec` without a seed) and a number of
games per split; game ``i`` of a split is generated with seed ``seed + SPLIT_SEED_OFFSET[split] + i``, so the
splits come from disjoint seed ranges and the same suite always gives the same games. Its task ids are
``"<suite>/<split>/<index>"``, e.g. ``"tw-simple/train/0"``.

A ScienceWorld suite (:class:`ScienceWorldSuite`) is a set of ScienceWorld tasks with the variation splits that
the ``scienceworld`` package defines (its dev split is this project's ``valid``); task ids are
``"<task>/<variation>"``, e.g. ``"boil/3"``.

A TextWorld-Express suite (:class:`TextWorldExpressSuite`) is one of its games with generation parameters; task
``i`` of a split plays the game with the ``i``-th seed of the package's split (train 0.., valid 10000..,
test 20000..); task ids are ``"<suite>/<split>/<index>"``, e.g. ``"twx-coin/train/0"``.

A plugin suite (:class:`EnvSuite`) names the tasks of any registered env, e.g. one of a third-party package.
Packages declare theirs in the ``w2s_agents.suites`` entry-point group (:data:`SUITE_ENTRY_POINT_GROUP`), named
by the suite, whose value is an :class:`EnvSuite` (or a function returning one)::

    [project.entry-points."w2s_agents.suites"]
    acme-lab = "acme_envs.lab:LAB_SUITE"

Suites are looked up by name (:func:`get_suite`), registered ones first, then the installed plugins;
:func:`register_suite` adds one (e.g. a small suite for tests).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from w2s_agents.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "CHALLENGES",
    "SPLITS",
    "SPLIT_SEED_OFFSET",
    "SUITE_ENTRY_POINT_GROUP",
    "TWX_GAMES",
    "TWX_SPLIT_SEEDS",
    "EnvSuite",
    "GameSpec",
    "ScienceWorldSuite",
    "Suite",
    "TextWorldExpressSuite",
    "TextWorldSuite",
    "get_suite",
    "parse_textworld_task",
    "register_suite",
    "suite_names",
]

SPLITS: tuple[str, ...] = ("train", "valid", "test")
SPLIT_SEED_OFFSET: Mapping[str, int] = {"train": 0, "valid": 1_000_000, "test": 2_000_000}
"""Game ``i`` of a split has seed ``suite.seed + SPLIT_SEED_OFFSET[split] + i``; a split holds < 1e6 games."""

CHALLENGES: Mapping[str, Mapping[str, Any]] = {
    # TextWorld's challenge settings with this project's defaults (see `tw-make <challenge> --help`).
    "tw-simple": {"rewards": "dense", "goal": "detailed", "test": False},
    "tw-coin_collector": {"level": 1},
    "tw-treasure_hunter": {"level": 1},
    "tw-cooking": {
        "recipe": 1,
        "take": 1,
        "go": 1,
        "open": False,
        "cook": False,
        "cut": False,
        "drop": False,
        "recipe_seed": 0,
        "split": "train",
    },
    # A random world and quest from TextWorld's generic generator.
    "custom": {"world_size": 3, "nb_objects": 5, "quest_length": 3, "quest_breadth": 1},
}
"""Game recipes: challenge name -> its settings and their default values."""


@dataclass(frozen=True)
class GameSpec:
    """Everything that determines one generated TextWorld game; its :meth:`key` names the cached files.

    Raises:
        ConfigError: an unknown challenge, an unknown setting or a setting of the wrong type.
    """

    challenge: str
    """One of :data:`CHALLENGES` (``tw-simple``, ``tw-coin_collector``, ``tw-treasure_hunter``, ``tw-cooking``,
    ``custom``)."""
    seed: int
    settings: Mapping[str, Any] = field(default_factory=dict)
    """Challenge settings; missing ones take the defaults of :data:`CHALLENGES` (filled in on creation)."""

    def __post_init__(self) -> None:
        if self.challenge not in CHALLENGES:
            raise ConfigError(
                f"unknown TextWorld challenge {self.challenge!r}; valid: {', '.join(sorted(CHALLENGES))}"
            )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(f"game seed must be a non-negative integer, got {self.seed!r}")
        object.__setattr__(self, "settings", _check_settings(self.challenge, self.settings))

    def key(self) -> str:
        """A 16-hex-digit hash of the spec and of the TextWorld version (games differ between versions)."""
        import textworld

        canonical = json.dumps(
            {
                "challenge": self.challenge,
                "seed": self.seed,
                "settings": dict(self.settings),
                "textworld": textworld.__version__,
            },
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def _check_settings(challenge: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(settings, Mapping):
        raise ConfigError(
            f"settings of challenge {challenge} must be a mapping, got {type(settings).__name__}"
        )
    defaults = CHALLENGES[challenge]
    out = dict(defaults)
    for key, value in settings.items():
        if key not in defaults:
            raise ConfigError(
                f"unknown setting {key!r} for TextWorld challenge {challenge}; valid: {', '.join(defaults)}"
            )
        want = type(defaults[key])
        if type(value) is not want:
            raise ConfigError(
                f"setting {key!r} of TextWorld challenge {challenge} must be {want.__name__}, got {value!r}"
            )
        out[key] = value
    _check_limits(challenge, out)
    return dict(sorted(out.items()))


_COIN_COLLECTOR_LEVELS = ((1, 100), (101, 150), (201, 233))
"""Levels TextWorld 1.7 makes: level ``L`` has ``((L - 1) // 100 + 1) * ((L - 1) % 100 + 1)`` rooms, at most 100."""

_CHOICES: Mapping[tuple[str, str], tuple[Any, ...]] = {
    ("tw-simple", "rewards"): ("dense", "balanced", "sparse"),
    ("tw-simple", "goal"): ("detailed", "brief", "none"),
    ("tw-cooking", "go"): (1, 6, 9, 12),
    ("tw-cooking", "split"): SPLITS,
}
"""Settings with a fixed set of values (TextWorld 1.7's challenge definitions)."""


def _check_limits(challenge: str, settings: Mapping[str, Any]) -> None:
    """Check ``settings`` (complete, types checked) against the limits of TextWorld 1.7's generators, so that a
    game that cannot be made is refused before any generation starts."""

    def refuse(key: str, limit: str) -> ConfigError:
        return ConfigError(
            f"setting {key!r} of TextWorld challenge {challenge} must be {limit}, got {settings[key]!r}"
        )

    def in_range(key: str, low: int, high: int | None, why: str = "") -> None:
        value = settings[key]
        if value < low or (high is not None and value > high):
            bounds = f"in {low}..{high}" if high is not None else f">= {low}"
            raise refuse(key, bounds + (f" ({why})" if why else ""))

    for (name, key), choices in _CHOICES.items():
        if name == challenge and settings[key] not in choices:
            raise refuse(key, "one of " + ", ".join(map(str, choices)))
    if challenge == "tw-coin_collector":
        level = settings["level"]
        if not any(low <= level <= high for low, high in _COIN_COLLECTOR_LEVELS):
            ranges = ", ".join(f"{low}..{high}" for low, high in _COIN_COLLECTOR_LEVELS)
            raise refuse("level", f"in {ranges} (TextWorld 1.7 makes games of at most 100 rooms)")
    elif challenge == "tw-treasure_hunter":
        in_range("level", 1, 30)
    elif challenge == "tw-cooking":
        in_range("recipe", 1, 5, "ingredients of the recipe")
        in_range("take", 0, settings["recipe"], "at most the recipe's ingredients")
        in_range("recipe_seed", 0, None)
        if settings["recipe_seed"] > 0 and settings["take"] == 0:
            raise refuse("take", ">= 1 when recipe_seed > 0 (a sampled recipe needs ingredients to find)")
    elif challenge == "custom":
        in_range("world_size", 1, 100, "rooms; TextWorld 1.7 makes games of at most 100 rooms")
        in_range("nb_objects", 0, None)
        in_range("quest_length", 1, None)
        in_range("quest_breadth", 1, settings["quest_length"], "at most quest_length")


@dataclass(frozen=True)
class TextWorldSuite:
    """A named set of generated TextWorld games with train / valid / test splits.

    For ``tw-cooking`` the game's own ``split`` setting follows the suite split (the cooking challenge keeps
    disjoint ingredients and recipes per split), unless :attr:`food_split` names one pool for every split.
    """

    name: str
    challenge: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    sizes: Mapping[str, int] = field(default_factory=lambda: {"train": 100, "valid": 20, "test": 50})
    """Number of games per split."""
    seed: int = 0
    """First seed of the train split (see :data:`SPLIT_SEED_OFFSET`)."""
    description: str = ""
    env_id: str = "w2s/TextWorld-v0"
    food_split: str | None = None
    """``tw-cooking`` only: the cooking challenge's split whose ingredients and recipes the games of every suite
    split draw from (held-out games then differ in layout, recipe and ingredient choice, not in vocabulary);
    ``None``: each suite split draws from its own pool."""

    def __post_init__(self) -> None:
        _check_name(self.name)
        GameSpec(self.challenge, 0, self.settings)  # validates challenge and settings
        _check_sizes(self.name, self.sizes)
        if self.food_split is not None:
            if self.challenge != "tw-cooking":
                raise ConfigError(f"suite {self.name}: food_split applies to tw-cooking only")
            if self.food_split not in SPLITS:
                raise ConfigError(
                    f"suite {self.name}: food_split must be one of {', '.join(SPLITS)}, got {self.food_split!r}"
                )

    def game_spec(self, split: str, index: int) -> GameSpec:
        """The spec of game ``index`` of ``split``.

        Raises:
            ConfigError: an unknown split or an index outside the split.
        """
        size = _split_size(self.name, self.sizes, split)
        if not 0 <= index < size:
            raise ConfigError(f"suite {self.name} split {split} has games 0..{size - 1}, not {index}")
        settings = dict(self.settings)
        if self.challenge == "tw-cooking":
            settings["split"] = self.food_split or split
        return GameSpec(self.challenge, self.seed + SPLIT_SEED_OFFSET[split] + index, settings)

    def task_ids(self, split: str) -> list[str]:
        """Task ids of ``split`` in order (``<suite>/<split>/<index>``)."""
        return [f"{self.name}/{split}/{i}" for i in range(_split_size(self.name, self.sizes, split))]


@dataclass(frozen=True)
class ScienceWorldSuite:
    """A set of ScienceWorld tasks; split ``s`` holds, for each task, the first ``sizes[s]`` variations of the
    package's split (all of them when ``sizes[s]`` is ``None``)."""

    name: str
    tasks: tuple[str, ...] = ()
    """ScienceWorld task names; empty means all 30 tasks."""
    sizes: Mapping[str, int | None] = field(
        default_factory=lambda: {"train": None, "valid": None, "test": None}
    )
    simplifications: str = "easy"
    """ScienceWorld simplification string passed to ``load`` (``"easy"`` or a comma list, ``""`` for none)."""
    description: str = ""
    env_id: str = "w2s/ScienceWorld-v0"

    def __post_init__(self) -> None:
        _check_name(self.name)
        object.__setattr__(self, "tasks", tuple(self.tasks))
        _check_sizes(self.name, self.sizes, allow_none=True)


TWX_GAMES: tuple[str, ...] = (
    "cookingworld",
    "twc",
    "coin",
    "mapreader",
    "arithmetic",
    "sorting",
    "simonsays",
    "peckingorder",
)
"""The games of TextWorld-Express 1.x (``TextWorldExpressEnv.getGameNames()``)."""

TWX_SPLIT_SEEDS: Mapping[str, int] = {"train": 0, "valid": 10_000, "test": 20_000}
"""First seed of each split of TextWorld-Express games (its train / dev / test seeds); a split holds 1000."""


@dataclass(frozen=True)
class TextWorldExpressSuite:
    """One TextWorld-Express game with generation parameters; task ``i`` of a split is the game with seed
    ``TWX_SPLIT_SEEDS[split] + i`` in that fold (the package's own train / dev / test seeds)."""

    name: str
    game: str
    """One of :data:`TWX_GAMES`."""
    params: Mapping[str, int] = field(default_factory=dict)
    """Generation parameters (``numLocations``, ``includeDoors``, ...), passed as ``"key=value,..."``."""
    sizes: Mapping[str, int] = field(default_factory=lambda: {"train": 100, "valid": 20, "test": 50})
    """Number of tasks per split (at most 1000)."""
    description: str = ""
    env_id: str = "w2s/TextWorldExpress-v0"

    def __post_init__(self) -> None:
        _check_name(self.name)
        if self.game not in TWX_GAMES:
            raise ConfigError(
                f"suite {self.name}: unknown TextWorld-Express game {self.game!r}; valid: {', '.join(TWX_GAMES)}"
            )
        for key, value in self.params.items():
            if not (isinstance(key, str) and key.isidentifier()) or type(value) is not int:
                raise ConfigError(
                    f"suite {self.name}: TextWorld-Express parameter {key!r} must be a name with an integer "
                    f"value, got {value!r}"
                )
        _check_sizes(self.name, self.sizes)
        for split, size in self.sizes.items():
            if size > 1000:
                raise ConfigError(
                    f"suite {self.name}: split {split} has 1000 TextWorld-Express seeds, not {size}"
                )
        object.__setattr__(self, "params", dict(sorted(self.params.items())))

    @property
    def game_params(self) -> str:
        """The parameters as TextWorld-Express's ``load`` takes them (``"numLocations=3,includeDoors=0"``)."""
        return ",".join(f"{k}={v}" for k, v in self.params.items())

    def seed(self, split: str, index: int) -> int:
        """The game seed of task ``index`` of ``split``.

        Raises:
            ConfigError: an unknown split or an index outside the split.
        """
        size = _split_size(self.name, self.sizes, split)
        if not 0 <= index < size:
            raise ConfigError(f"suite {self.name} split {split} has tasks 0..{size - 1}, not {index}")
        return TWX_SPLIT_SEEDS[split] + index

    def task_ids(self, split: str) -> list[str]:
        """Task ids of ``split`` in order (``<suite>/<split>/<index>``)."""
        return [f"{self.name}/{split}/{i}" for i in range(_split_size(self.name, self.sizes, split))]


@dataclass(frozen=True)
class EnvSuite:
    """Tasks of any registered env (e.g. a plugin's): the env id and the task ids of each split.

    Without explicit ``tasks`` for a split, its tasks are those the env lists (``env.task_ids(split)``).
    The env gives the expert demos through its ``expert_plan`` (``w2s run``'s demos stage needs them).
    """

    name: str
    env_id: str
    """A registered env id (``w2s envs``), e.g. ``"acme/Lab-v0"``."""
    tasks: Mapping[str, Sequence[str]] = field(default_factory=dict)
    """Task ids per split (``train`` / ``valid`` / ``test``); a split left out takes the env's own list."""
    description: str = ""

    def __post_init__(self) -> None:
        _check_name(self.name)
        if not isinstance(self.env_id, str) or "/" not in self.env_id:
            raise ConfigError(f"suite {self.name}: env_id must be a registered env id, got {self.env_id!r}")
        tasks: dict[str, tuple[str, ...]] = {}
        for split, ids in self.tasks.items():
            if split not in SPLITS:
                raise ConfigError(f"suite {self.name}: unknown split {split!r}; valid: {', '.join(SPLITS)}")
            if isinstance(ids, str) or not all(isinstance(t, str) and t for t in ids):
                raise ConfigError(f"suite {self.name}: tasks of split {split} must be a list of task ids")
            tasks[split] = tuple(ids)
        object.__setattr__(self, "tasks", tasks)

    def task_ids(self, split: str, env: Any = None) -> list[str]:
        """Task ids of ``split``: the suite's own, else ``env.task_ids(split)`` (``env``: a TextEnv of the suite's
        env, or ``None`` to get the ids from the suite alone).

        Raises:
            ConfigError: an unknown split, or the split's ids come from the env and ``env`` is ``None``.
        """
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        if split in self.tasks:
            return list(self.tasks[split])
        if env is None:
            raise ConfigError(
                f"suite {self.name}: the {split} tasks come from env {self.env_id}; pass the env"
            )
        return list(env.task_ids(split))


Suite = TextWorldSuite | ScienceWorldSuite | TextWorldExpressSuite | EnvSuite


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or "/" in name or name.strip() != name:
        raise ConfigError(f"suite name must be a non-empty string without '/' or spaces, got {name!r}")


def _check_sizes(name: str, sizes: Mapping[str, Any], *, allow_none: bool = False) -> None:
    for split, size in sizes.items():
        if split not in SPLITS:
            raise ConfigError(f"suite {name}: unknown split {split!r}; valid: {', '.join(SPLITS)}")
        if size is None and allow_none:
            continue
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < 1_000_000:
            raise ConfigError(
                f"suite {name}: size of split {split} must be an integer in [0, 1e6), got {size!r}"
            )


def _split_size(name: str, sizes: Mapping[str, int], split: str) -> int:
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    return sizes.get(split, 0)


_SUITES: dict[str, Suite] = {}


def register_suite(suite: Suite, *, replace: bool = False) -> Suite:
    """Make ``suite`` available by name to :func:`get_suite` and to the envs' task ids.

    Raises:
        ConfigError: a different suite of that name exists and ``replace`` is false.
    """
    old = _SUITES.get(suite.name)
    if old is not None and old != suite and not replace:
        raise ConfigError(f"a different suite named {suite.name!r} is already registered")
    _SUITES[suite.name] = suite
    return suite


def get_suite(name: str) -> Suite:
    """The suite called ``name``: a registered one, else an installed plugin's (entry-point group
    :data:`SUITE_ENTRY_POINT_GROUP`, loaded and registered on first use).

    Raises:
        ConfigError: no such suite (the message lists the known ones), or the plugin that declares it cannot be
            loaded or does not give a suite of that name.
    """
    suite = _SUITES.get(name)
    if suite is None:
        suite = _plugin_suite(name)
    if suite is None:
        raise ConfigError(f"unknown task suite {name!r}; registered: {', '.join(suite_names())}")
    return suite


def suite_names() -> list[str]:
    """Names of the registered suites and of the installed plugins' suites, sorted."""
    return sorted(set(_SUITES) | {ep.name for ep in _suite_entry_points()})


SUITE_ENTRY_POINT_GROUP = "w2s_agents.suites"
"""Package entry-point group through which third-party task suites plug in (name = suite name)."""


def _suite_entry_points() -> list[Any]:
    from importlib import metadata

    return list(metadata.entry_points(group=SUITE_ENTRY_POINT_GROUP))


def _plugin_suite(name: str) -> Suite | None:
    """Load, check and register the plugin suite ``name``; ``None`` when no installed package declares it."""
    eps = [ep for ep in _suite_entry_points() if ep.name == name]
    if not eps:
        return None
    ep = eps[0]
    dist = getattr(ep, "dist", None)
    where = f"entry point {name} = {ep.value!r} of {dist.name if dist is not None else 'a plugin'}"
    if len(eps) > 1:
        logger.warning("task suite %s is declared by %d installed packages; using %s", name, len(eps), where)
    try:
        obj = ep.load()
        suite = obj() if callable(obj) and not isinstance(obj, type) else obj
    except Exception as exc:  # a broken plugin gets one line naming it, not a traceback
        raise ConfigError(f"task suite {name!r}: cannot load {where}: {type(exc).__name__}: {exc}") from None
    if not isinstance(suite, (TextWorldSuite, ScienceWorldSuite, TextWorldExpressSuite, EnvSuite)):
        raise ConfigError(f"task suite {name!r}: {where} gives {type(suite).__name__}, not an EnvSuite")
    if suite.name != name:
        raise ConfigError(f"task suite {name!r}: {where} gives a suite named {suite.name!r}")
    return register_suite(suite)


def parse_textworld_task(task_id: str) -> tuple[TextWorldSuite, str, int]:
    """Split a TextWorld task id ``<suite>/<split>/<index>`` into (suite, split, index).

    Raises:
        ConfigError: the id is malformed, names an unknown or non-TextWorld suite, or is out of range.
    """
    parts = task_id.split("/")
    if len(parts) != 3 or not parts[2].isdigit():
        tw = [n for n in suite_names() if isinstance(_SUITES[n], TextWorldSuite)]
        raise ConfigError(
            f"bad TextWorld task id {task_id!r}: expected <suite>/<split>/<index> (e.g. tw-simple/train/0) "
            f"with suite one of {', '.join(tw)}, or the path of a .z8 game file"
        )
    suite = get_suite(parts[0])
    if not isinstance(suite, TextWorldSuite):
        raise ConfigError(f"suite {parts[0]!r} is not a TextWorld suite")
    index = int(parts[2])
    suite.game_spec(parts[1], index)  # validates split and range
    return suite, parts[1], index


for _suite in (
    TextWorldSuite("tw-simple", "tw-simple", description="TextWorld's simple house game, dense rewards"),
    TextWorldSuite(
        "tw-coin_collector", "tw-coin_collector", {"level": 5}, description="find the coin (level 5)"
    ),
    TextWorldSuite(
        "tw-treasure_hunter", "tw-treasure_hunter", {"level": 5}, description="find the object (level 5)"
    ),
    TextWorldSuite(
        "tw-cooking",
        "tw-cooking",
        {"recipe": 2, "take": 2, "go": 6, "open": True, "cut": True, "cook": True},
        description="cook a two-ingredient recipe in a six-room house",
    ),
    TextWorldSuite(
        "tw-cooking-fetch",
        "tw-cooking",
        {"recipe": 2, "take": 2, "go": 6},
        description="read the recipe, fetch its two ingredients in a six-room house, prepare and eat the meal; "
        "every split draws its food from the challenge's train pool",
        food_split="train",
    ),
    TextWorldSuite(
        "tw-custom",
        "custom",
        {"world_size": 5, "nb_objects": 10, "quest_length": 5},
        description="random five-room worlds with quests of length 5",
    ),
    ScienceWorldSuite("sciworld", description="all 30 ScienceWorld tasks, the package's variation splits"),
    ScienceWorldSuite(
        "sciworld-small",
        sizes={"train": 10, "valid": 3, "test": 5},
        description="all 30 ScienceWorld tasks, at most 10 / 3 / 5 variations each",
    ),
    ScienceWorldSuite(
        "sciworld-find",
        tasks=("find-living-thing", "find-non-living-thing", "find-plant", "find-animal"),
        sizes={"train": 15, "valid": 5, "test": 10},
        description="ScienceWorld's four find tasks (find a thing, focus on it, put it in a box): 6-16 expert "
        "steps; 15 / 5 / 10 variations each",
    ),
    TextWorldExpressSuite(
        "twx-coin",
        "coin",
        {"numLocations": 5, "includeDoors": 1, "numDistractorItems": 0},
        description="TextWorld-Express coin collector: find the coin in five rooms with doors",
    ),
    TextWorldExpressSuite(
        "twx-cookingworld",
        "cookingworld",
        {"numLocations": 3, "numIngredients": 2, "numDistractorItems": 2, "includeDoors": 0},
        description="TextWorld-Express cooking: a two-ingredient recipe in three rooms",
    ),
    TextWorldExpressSuite(
        "twx-mapreader",
        "mapreader",
        {"numLocations": 8, "maxDistanceApart": 3},
        description="TextWorld-Express map reader: fetch the coin with the help of a map",
    ),
    TextWorldExpressSuite(
        "twx-sorting", "sorting", description="TextWorld-Express sorting: put objects in a box by quantity"
    ),
    TextWorldExpressSuite(
        "twx-arithmetic",
        "arithmetic",
        description="TextWorld-Express arithmetic: solve a sum, put the matching quantity in a box",
    ),
):
    register_suite(_suite)
