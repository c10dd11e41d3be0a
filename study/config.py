"""The study file: TOML in, frozen dataclasses out, validated before Ray starts.

Every table and key is checked: an unknown key is a typo until proven otherwise, so it is refused
with the list of known keys, and a value of the wrong type is refused by its field's name (never
left to fail later inside a comparison). Relative paths resolve against the study file's folder.
"""

from __future__ import annotations

import dataclasses
import itertools
import tomllib
import typing
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contract.config import (
    FLAT_KINDS,
    METHOD_KEYS,
    TRAIN_KEYS,
    TrainSpec,
    kind_of,
    method_keys,
    parse_targets,
)
from contract.errors import ConfigError
from contract.paths import tracking_store, writable_dir
from contract.schema import SEARCH_METRIC, SEARCH_MODE, Param, task_key
from search_spaces import get_space
from search_spaces.define_by_run import SAMPLERS
from trainables.datasets import DataSpec
from trainables.foundation import get_foundation
from trainables.models import get_backbone

DATASETS = ("nih", "chexpert", "rsna")


def _check(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: {message}")


@dataclass(frozen=True)
class FoundationRef:
    name: str
    checkpoint: str | None = None
    # the study's image size for this foundation (default: its native size); positional
    # embeddings are resized to it when the checkpoint loads, RoPE is built for it
    img_size: int | None = None
    # what this foundation's trials reserve, over [resources] (e.g. a bigger model at a
    # larger size wants a whole GPU where a small one shares it): ResourceSpec fields
    resources: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        try:
            entry = get_foundation(self.name)
        except ConfigError as exc:
            raise ConfigError(f"tasks.foundations.name: {exc}") from None
        patch = get_backbone(entry.backbone).patch_size
        _check(self.img_size is None or self.img_size >= patch and self.img_size % patch == 0,
               "tasks.foundations.img_size", f"{self.img_size} for {self.name!r}: give a "
               f"multiple of its patch size {patch} (its native size is "
               f"{get_backbone(entry.backbone).img_size})")

    @property
    def size(self) -> int:
        """The image size the study trains this foundation at."""
        return self.img_size or get_backbone(get_foundation(self.name).backbone).img_size


@dataclass(frozen=True)
class DatasetRef:
    name: str
    root: str
    splits: str = "medpeft"
    list_dir: str | None = None
    uncertainty: str = "ones"
    views: str = "all"
    val_fraction: float | None = None  # `patient` splits: share of non-test patients for val
    official_test: bool = True  # `patient` splits: the dataset's own test list where it has one

    def __post_init__(self) -> None:
        _check(self.name in DATASETS, "tasks.datasets.name",
               f"{self.name!r} is unknown: use one of {DATASETS}")


@dataclass(frozen=True)
class TaskSpec:
    foundation: FoundationRef
    dataset: DatasetRef
    label_fraction: float
    split_seed: int = 0

    def __post_init__(self) -> None:
        _check(0 < self.label_fraction <= 1, "tasks.label_fractions",
               f"{self.label_fraction} must be in (0, 1], e.g. 0.01 for 1% of the labels")

    def data_spec(self) -> DataSpec:
        """The `DataSpec` this task trains on (validated: a bad combination is a ConfigError)."""
        ds = self.dataset
        return DataSpec(dataset=ds.name, root=ds.root, splits=ds.splits,
                        label_fraction=self.label_fraction, split_seed=self.split_seed,
                        list_dir=ds.list_dir, uncertainty=ds.uncertainty, views=ds.views,
                        val_fraction=ds.val_fraction, official_test=ds.official_test)

    @property
    def key(self) -> str:
        """A stable, readable id: foundation-dataset-fraction-s<split seed>."""
        return task_key(self.foundation.name, self.dataset.name, self.label_fraction,
                        self.split_seed)


@dataclass(frozen=True)
class ArmSpec:
    name: str
    space: str
    trials: int
    fixed: tuple[tuple[str, Any], ...] = ()
    optimizer: str | None = None

    def __post_init__(self) -> None:
        try:
            get_space(self.space)
        except ConfigError as exc:
            raise ConfigError(f"arms.{self.name}.space: {exc}") from None
        _check(self.trials >= 1, f"arms.{self.name}.trials", "must be >= 1")
        _check(self.optimizer in (None, "sgd", "adamw"), f"arms.{self.name}.optimizer",
               "use 'sgd' or 'adamw' (or leave it out to follow the reference recipe)")

    @property
    def kind(self) -> str:
        return get_space(self.space).kind


@dataclass(frozen=True)
class SearchSpec:
    sampler: str = "tpe"
    seed: int = 0
    max_t: int = 10
    grace_period: int = 2
    reduction_factor: int = 2
    # One trial at a time, in the order the searcher asks for them: ASHA and the sampler then
    # see every result in the same order on every run, so a rerun picks the same configs.
    # Concurrent trials race (whichever reports first decides ASHA's rungs).
    sequential: bool = False
    # Most trials of one search running at once. The pool gives every search a share of the
    # cluster; a search running all its trials at once would ask its sampler for every config
    # before any result (random search). 4 keeps TPE learning (its first 10 trials are random
    # anyway, and its constant liar spreads concurrent asks) and, simulated on the paper's
    # grid, 4 fills 32 slots within 6% of the lower bound where 2 leaves 11% (see
    # benchmarks/study_pool.py).
    concurrency: int = 4

    def __post_init__(self) -> None:
        _check(self.sampler in SAMPLERS, "search.sampler", f"use one of {SAMPLERS}")
        _check(self.concurrency >= 1, "search.concurrency",
               "must be >= 1 (trials of one search running at once)")
        _check(self.max_t >= 1, "search.max_t", "must be >= 1 epoch")
        _check(1 <= self.grace_period <= self.max_t, "search.grace_period",
               "must be between 1 and max_t")
        _check(self.reduction_factor >= 2, "search.reduction_factor", "must be >= 2")


@dataclass(frozen=True)
class ResourceSpec:
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_concurrent_trials: int = 0  # 0: as many as the cluster can place at once
    # One-worker trials run in Ray Train's local mode inside the Tune trial; False runs them as
    # a one-worker Train worker group, as trials with several workers run (about 20 s slower).
    local_mode: bool = True

    def __post_init__(self) -> None:
        _check(self.num_workers >= 1, "resources.num_workers", "must be >= 1")
        _check(self.cpus_per_worker > 0, "resources.cpus_per_worker", "must be > 0")
        _check(self.gpus_per_worker >= 0, "resources.gpus_per_worker", "must be >= 0")
        _check(self.max_concurrent_trials >= 0, "resources.max_concurrent_trials",
               "must be >= 0 (0 = fit to the cluster)")

    @property
    def cpus_per_trial(self) -> float:
        return self.num_workers * self.cpus_per_worker


@dataclass(frozen=True)
class FinalSpec:
    seeds: int = 1

    def __post_init__(self) -> None:
        _check(self.seeds >= 0, "final.seeds", "must be >= 0 (0 skips the test phase)")


@dataclass(frozen=True)
class TrackingSpec:
    uri: str
    experiment: str


@dataclass(frozen=True)
class StudyConfig:
    name: str
    storage: Path
    tasks: tuple[TaskSpec, ...]
    arms: tuple[ArmSpec, ...]
    search: SearchSpec
    train: tuple[tuple[str, Any], ...]
    resources: ResourceSpec
    final: FinalSpec
    tracking: TrackingSpec
    cache_dir: Path
    checkpoints_to_keep: int = 2
    source: Path | None = field(default=None, compare=False)

    def resources_for(self, task: TaskSpec) -> ResourceSpec:
        """What the task's trials reserve: its foundation's resources over `[resources]`."""
        return dataclasses.replace(self.resources, **dict(task.foundation.resources))

    def resource_specs(self) -> list[ResourceSpec]:
        """Every distinct reservation the study's trials make."""
        return list(dict.fromkeys(self.resources_for(t) for t in self.tasks))


_SECTIONS = {"study", "tasks", "arms", "search", "train", "resources", "final", "tracking"}
# TOML value types per Python type (TOML has no null: `X | None` means X, see `kind_of`);
# an int is a valid float, a bool is never an int.
_TOML_KINDS: dict[type, tuple[type, ...]] = {str: (str,), int: (int,), float: (int, float),
                                             bool: (bool,)}


def _toml_kinds(kind: type) -> tuple[type, ...]:
    return _TOML_KINDS.get(kind, ())


# Every key list and type below derives from the trial contract (contract.config).
# [train]: the recipe's fields, except lr (searched), seed (the search's, then the final's) and
# optimizer (an arm's own: its lr range depends on it, so it is `arms.X.optimizer`).
_TRAIN_KEYS = set(TRAIN_KEYS) - {Param.LR, Param.SEED, Param.OPTIMIZER}
# arms.X.fixed: a training field, lr, or a method setting (the seed stays the study's).
_FIXABLE = (set(TRAIN_KEYS) - {Param.SEED, Param.OPTIMIZER}) | set(METHOD_KEYS)
_FIELD_KINDS = {name: _toml_kinds(FLAT_KINDS[name]) for name in TRAIN_KEYS}
_FIXED_KINDS = {name: _toml_kinds(FLAT_KINDS[name]) for name in (*TRAIN_KEYS, *METHOD_KEYS)}
# `[search] metric` and `mode` of older study files: only these values, which change nothing.
_FIXED_OBJECTIVE = {"metric": SEARCH_METRIC, "mode": SEARCH_MODE}


def _kinds(cls) -> dict[str, tuple[type, ...]]:
    """The TOML value types of a dataclass's fields."""
    hints = typing.get_type_hints(cls)
    return {f.name: _toml_kinds(kind_of(hints[f.name])) for f in dataclasses.fields(cls)}


def _known(table: dict, known: set[str], where: str) -> None:
    unknown = sorted(set(table) - known)
    _check(not unknown, where, f"unknown keys {unknown}; known keys: {sorted(known)}")


def _table(value: Any, where: str) -> dict:
    _check(isinstance(value, dict), where, f"expected a table, got {value!r}")
    return value


def _list(value: Any, where: str) -> list:
    _check(isinstance(value, list), where, f"expected a list, got {value!r}")
    return value


def _entries(value: Any, where: str, example: str) -> list:
    """A list that needs at least one entry: an empty one would make a study of no tasks."""
    _check(bool(_list(value, where)), where, f"needs at least one entry, e.g. {example}")
    return value


def _named(value: Any, where: str) -> str:
    """A name MLflow and the storage layout can use: a non-blank string."""
    _check(bool(_typed(value, str, where).strip()), where, "is blank: give a name")
    return value


def _typed_fields(kinds: dict[str, tuple[type, ...]], table: dict, where: str) -> None:
    """Each value of `table` has its key's type; `where` is the dotted prefix of the names."""
    for key, value in table.items():
        if kinds.get(key):
            _typed(value, kinds[key], f"{where}.{key}")


def _build(cls, table: dict, where: str):
    """Construct a dataclass from a TOML table, refusing unknown keys and wrong types."""
    _table(table, where)
    fields = dataclasses.fields(cls)
    _known(table, {f.name for f in fields}, where)
    _typed_fields(_kinds(cls), table, where.strip("[]"))
    try:
        return cls(**table)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _typed(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))
    names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
    _check(ok, where, f"expected {names}, got {value!r}")
    return value


def _path(base: Path, value: str | None, where: str) -> str | None:
    if value is None:
        return None
    _check(value.strip() != "", where, "is blank: give a path")
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def _objective(search: Any) -> Any:
    """[search] without `metric`/`mode`: the search's objective is not a setting. An older file
    that names the one objective still loads; any other value is refused."""
    if not isinstance(search, dict):
        return search  # _build says it is not a table
    for key, value in _FIXED_OBJECTIVE.items():
        _check(search.get(key, value) == value, f"search.{key}",
               f"the search always maximises validation macro AUROC ({SEARCH_METRIC}): "
               "remove the key")
    return {k: v for k, v in search.items() if k not in _FIXED_OBJECTIVE}


def _check_recipe(train: dict[str, Any], max_t: int, where: str) -> None:
    """`train` (the [train] table, with an arm's fixed values) makes a valid recipe."""
    try:
        TrainSpec(**{**train, "epochs": max_t})
    except ConfigError as exc:
        raise ConfigError(f"{where}.{exc}") from None  # TrainSpec says "field: problem"


def _not_optimizer(table: dict, where: str, arm: str) -> None:
    """The optimiser is an arm's choice (its lr range follows it), never a trial value."""
    _check(Param.OPTIMIZER not in table, f"{where}.{Param.OPTIMIZER}",
           f"set it per arm, e.g. [arms.{arm}] optimizer = "
           f"{table.get(Param.OPTIMIZER, 'adamw')!r}: the arm's lr range depends on it")


def _parse_arm(name: str, arm: Any, train: dict[str, Any], max_t: int) -> ArmSpec:
    where = f"arms.{name}"
    _known(_table(arm, where), {"space", "trials", "fixed", "optimizer"}, f"[{where}]")
    fixed = _table(arm.get("fixed", {}), f"{where}.fixed")
    _not_optimizer(fixed, f"{where}.fixed", name)
    _known(fixed, _FIXABLE, f"{where}.fixed")
    _typed_fields(_FIXED_KINDS, fixed, f"{where}.fixed")
    if "targets" in fixed:
        try:
            parse_targets(fixed["targets"])
        except ConfigError as exc:
            raise ConfigError(f"{where}.fixed.{exc}") from None  # "targets: problem"
    _check_recipe({**train, **{k: v for k, v in fixed.items() if k in _FIELD_KINDS}}, max_t,
                  f"{where}.fixed")
    spec = ArmSpec(name, _typed(arm.get("space", name), str, f"{where}.space"),
                   _typed(arm.get("trials", 4), int, f"{where}.trials"),
                   tuple(sorted(fixed.items())), arm.get("optimizer"))
    own = method_keys(spec.kind)
    foreign = sorted(set(fixed) & set(METHOD_KEYS) - set(own))
    _check(not foreign, f"{where}.fixed", f"{foreign} are settings of another method, not of "
           f"this arm's {spec.kind!r}: remove them (its own settings: "
           f"{', '.join(own) if own else 'none'})")
    return spec


def _foundation(table: Any, resources: dict[str, Any]) -> FoundationRef:
    """A foundation entry; its own `resources` (ResourceSpec fields) must make a valid
    reservation over the study's `[resources]`."""
    table = dict(_table(table, "tasks.foundations"))
    own = _table(table.pop("resources", {}), "tasks.foundations.resources")
    ref = _build(FoundationRef, table, "tasks.foundations")
    if own:
        _build(ResourceSpec, {**resources, **own}, "tasks.foundations.resources")
        ref = dataclasses.replace(ref, resources=tuple(sorted(own.items())))
    return ref


def parse_study(data: dict[str, Any], base: Path, source: Path | None = None) -> StudyConfig:
    """Validate a parsed TOML document. `base` anchors relative paths."""
    _known(data, _SECTIONS, "study file")
    head = _table(data.get("study", {}), "[study]")
    _known(head, {"name", "storage", "cache_dir", "checkpoints_to_keep"}, "[study]")
    name = _named(head.get("name", "study"), "study.name")
    storage = Path(_path(base, _typed(head.get("storage", "."), str, "study.storage"),
                         "study.storage"))
    # The image cache: under the study by default; on a cluster, any path every node can read
    # (shared storage), or a node-local path that each node fills once under the same key.
    cache_dir = Path(_path(storage, _typed(head.get("cache_dir", "cache"), str,
                                           "study.cache_dir"), "study.cache_dir"))

    # Ray Train keeps this many checkpoints per trial (the newest and, by default, one to fall
    # back on if the newest is damaged); a trial's best weights travel inside each of them.
    keep = _typed(head.get("checkpoints_to_keep", 2), int, "study.checkpoints_to_keep")
    _check(keep >= 1, "study.checkpoints_to_keep", "must be >= 1 (2 keeps a fallback)")

    tasks_table = data.get("tasks")
    _check(isinstance(tasks_table, dict), "[tasks]", "missing: give foundations, datasets and "
           "label_fractions")
    _known(tasks_table, {"foundations", "datasets", "label_fractions", "split_seeds"}, "[tasks]")
    resources_table = _table(data.get("resources", {}), "[resources]")
    foundations = [_foundation(f, resources_table)
                   for f in _entries(tasks_table.get("foundations", []), "tasks.foundations",
                                     '[{ name = "mrm", checkpoint = "MRM.pth" }]')]
    foundations = [dataclasses.replace(f, checkpoint=_path(base, f.checkpoint,
                                                           "tasks.foundations.checkpoint"))
                   for f in foundations]
    datasets = []
    for d in _entries(tasks_table.get("datasets", []), "tasks.datasets",
                      '[{ name = "nih", root = "data/nih" }]'):
        ref = _build(DatasetRef, d, "tasks.datasets")
        datasets.append(dataclasses.replace(
            ref, root=_path(base, ref.root, "tasks.datasets.root"),
            list_dir=_path(base, ref.list_dir, "tasks.datasets.list_dir")))
    fractions = [float(_typed(f, (int, float), "tasks.label_fractions"))
                 for f in _entries(tasks_table.get("label_fractions", [1.0]),
                                   "tasks.label_fractions", "[1.0] or [0.01, 0.1, 1.0]")]
    seeds = [_typed(s, int, "tasks.split_seeds")
             for s in _entries(tasks_table.get("split_seeds", [0]), "tasks.split_seeds",
                               "[0] or leave the key out")]
    tasks = tuple(TaskSpec(f, d, fr, s)
                  for f, d, fr, s in itertools.product(foundations, datasets, fractions, seeds))
    # A task's key names its Tune, Optuna and MLflow records: two tasks with one key would
    # share them.
    repeated = sorted(k for k, n in Counter(t.key for t in tasks).items() if n > 1)
    _check(not repeated, "[tasks]", f"task(s) {repeated} appear more than once (a task is "
           "foundation-dataset-fraction-seed): list each foundation, dataset, label fraction "
           "and split seed once")

    arms_table = _table(data.get("arms", {}), "[arms]")
    _check(bool(arms_table), "[arms]", "define at least one arm, e.g. [arms.lora] space='lora'")

    train = _table(data.get("train", {}), "[train]")
    _not_optimizer(train, "train", next(iter(arms_table), "NAME"))
    _known(train, _TRAIN_KEYS, "[train]")
    _typed_fields(_FIELD_KINDS, train, "train")
    search = _build(SearchSpec, _objective(data.get("search", {})), "[search]")
    _check_recipe(train, search.max_t, "train")  # defaults must make a valid recipe
    _check(search.grace_period >= train.get("warmup_epochs", 1), "search.grace_period",
           "must be >= train.warmup_epochs: ASHA must not judge trials still warming up")
    arms = [_parse_arm(name, arm, train, search.max_t) for name, arm in arms_table.items()]
    tracking = _table(data.get("tracking", {}), "[tracking]")
    _known(tracking, {"uri", "experiment"}, "[tracking]")
    _typed_fields({"uri": (str,), "experiment": (str,)}, tracking, "tracking")
    uri = tracking.get("uri") or f"sqlite:///{storage / 'mlflow.db'}"
    experiment = _named(tracking.get("experiment", name), "tracking.experiment")
    return StudyConfig(
        name=name, storage=storage, tasks=tasks, arms=tuple(arms),
        search=search, train=tuple(sorted(train.items())),
        resources=_build(ResourceSpec, resources_table, "[resources]"),
        final=_build(FinalSpec, data.get("final", {}), "[final]"),
        tracking=TrackingSpec(uri, experiment), cache_dir=cache_dir,
        checkpoints_to_keep=keep, source=source)


def load_study(path: Path) -> StudyConfig:
    """Read and validate a study file; every problem is a one-line ConfigError."""
    if path.is_dir():
        raise ConfigError(f"study file {path} is a folder: pass the path of a .toml file")
    if not path.is_file():
        raise ConfigError(f"study file {path} does not exist: pass the path of a .toml file")
    try:
        text = path.read_bytes().decode("utf-8")  # TOML is UTF-8 by definition
    except OSError as exc:
        raise ConfigError(f"study file {path} cannot be read ({exc.strerror or exc}): check "
                          "its permissions") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"study file {path} is not UTF-8 text (byte {exc.start} is "
                          f"{exc.object[exc.start:exc.start + 1]!r}): pass the .toml study "
                          "file, saved as UTF-8") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"study file {path} is not valid TOML: {exc}") from exc
    return parse_study(data, path.parent.resolve(), source=path.resolve())


def check_destinations(cfg: StudyConfig) -> None:
    """Everything a run writes can be written, checked before it writes anything: the storage,
    the image cache and a local tracking store (a server is asked when the run starts)."""
    writable_dir(cfg.storage, "study.storage")
    writable_dir(cfg.cache_dir, "study.cache_dir")
    tracking_store(cfg.tracking.uri, write=True)
