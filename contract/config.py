"""The typed trial contract: what one trial is, in one frozen dataclass, and its flat forms.

A trial is a `TrialSpec`: its task factors, its arm (name and kind), how it trains
(`TrainSpec`), its adapter (`LoraSpec`, or None for full fine-tuning) and its run settings
(`RunSettings`: data cache, storage, resources). Ray Tune and Optuna want one flat mapping
(every study factor its own key, so it is searched and logged as its own MLflow param):
`to_tune`/`from_tune` convert, and every key list and param type is derived from the fields
here, never written out elsewhere. Run settings never enter the flat form: they are the same
for every trial of a search and reach the trial through `tune.with_parameters`.

No torch here: analysis reads the param types without importing a model library.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contract.errors import DIVERGED, ConfigError

OPTIMIZERS = ("sgd", "adamw")
AUGMENTATIONS = ("none", "crop_flip", "crop_flip_erase")
PHASES = ("search", "final")
TARGETS: tuple[str, ...] = ("q", "k", "v", "proj", "fc1", "fc2")


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {message}")


@dataclass(frozen=True)
class TrainSpec:
    """How one model is optimised. `lr` is absolute (presets given as base lr are scaled first)."""

    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    layer_decay: float = 1.0
    epochs: int = 10
    warmup_epochs: int = 1
    batch_size: int = 64
    min_lr: float = 1e-6
    seed: int = 0
    augmentation: str = "none"
    drop_path: float = 0.0
    grad_clip: float = 0.0
    # Gradient-accumulation steps: each optimiser step still sees `batch_size` images, in this
    # many forward/backward passes of batch_size / accumulate (a large batch on one GPU).
    accumulate: int = 1

    def __post_init__(self) -> None:
        _require(self.optimizer in OPTIMIZERS, "optimizer", f"use one of {OPTIMIZERS}")
        _require(self.lr > 0, "lr", "must be > 0")
        _require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _require(0 < self.layer_decay <= 1, "layer_decay", "must be in (0, 1]; 1 means none")
        _require(self.epochs >= 1, "epochs", "must be >= 1")
        _require(0 <= self.warmup_epochs < self.epochs, "warmup_epochs",
                 "must be >= 0 and smaller than epochs")
        _require(self.batch_size >= 1, "batch_size", "must be >= 1")
        _require(0 <= self.min_lr < self.lr, "min_lr", "must be >= 0 and below lr")
        _require(self.augmentation in AUGMENTATIONS, "augmentation", f"use one of {AUGMENTATIONS}")
        _require(0 <= self.drop_path < 1, "drop_path", "must be in [0, 1)")
        _require(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables clipping)")
        _require(self.accumulate >= 1 and self.batch_size % self.accumulate == 0, "accumulate",
                 f"must be >= 1 and divide batch_size ({self.batch_size})")


def join_targets(targets: Iterable[str]) -> str:
    """('q', 'v') -> 'q+v': targets travel as one string so they log as one param."""
    return "+".join(targets)


def parse_targets(text: str | tuple[str, ...]) -> tuple[str, ...]:
    """'q+v' -> ('q', 'v')."""
    parts = tuple(text) if isinstance(text, tuple) else tuple(p for p in str(text).split("+") if p)
    unknown = [p for p in parts if p not in TARGETS]
    _require(bool(parts) and not unknown, "targets",
             f"{text!r} is not a '+'-joined subset of {TARGETS}")
    return parts


def _flat(name: str, encode: Callable[[Any], Any] | None = None,
          decode: Callable[[Any], Any] | None = None, **kwargs) -> Any:
    """A field whose flat (Tune config, MLflow param) key or form differs from its own."""
    return field(metadata={"flat": name, "encode": encode, "decode": decode}, **kwargs)


def _check_rank(name: str, value: object) -> None:
    """Ranks and counts: an int >= 1 (True is not 1)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an int >= 1, got {value!r}")


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"{name} must be a number > 0, got {value!r}")


def _check_dropout(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ConfigError(f"{name} must be a number in [0, 1), got {value!r}")


@dataclass(frozen=True)
class LoraSpec:
    """What to adapt and how strongly; ``targets`` is stored in canonical ``TARGETS`` order.

    `alpha_ratio` records how a search chose alpha (alpha / rank): logged, not used."""

    rank: int
    alpha: float
    dropout: float = _flat("lora_dropout", default=0.0)
    targets: tuple[str, ...] = _flat("targets", join_targets, parse_targets, default=("q", "v"))
    alpha_ratio: float | None = None

    def __post_init__(self) -> None:
        _check_rank("lora rank", self.rank)
        _check_positive("lora alpha", self.alpha)
        _check_dropout("lora dropout", self.dropout)
        object.__setattr__(self, "targets", _canonical_targets(self.targets))

    @property
    def scaling(self) -> float:
        """loralib's scaling of the low-rank update: alpha / rank."""
        return self.alpha / self.rank


def _canonical_targets(targets: Iterable[str]) -> tuple[str, ...]:
    """Validate targets and sort them into ``TARGETS`` order, so equal specs compare equal."""
    if isinstance(targets, str) or not isinstance(targets, Iterable):
        raise ConfigError(
            f"lora targets must be a list of names from {list(TARGETS)}, got {targets!r}"
        )
    targets = tuple(targets)
    if not targets:
        raise ConfigError(f"lora targets must not be empty; choose from {list(TARGETS)}")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ConfigError(f"unknown lora targets {unknown}; choose from {list(TARGETS)}")
    duplicates = sorted({t for t in targets if targets.count(t) > 1}, key=TARGETS.index)
    if duplicates:
        raise ConfigError(f"lora targets list {duplicates} more than once; list each target once")
    return tuple(t for t in TARGETS if t in targets)


@dataclass(frozen=True)
class PartialSpec:
    """Partial fine-tuning: the last `blocks` transformer blocks train (with head and fc_norm)."""

    blocks: int = _flat("partial_blocks")

    def __post_init__(self) -> None:
        _check_rank("partial_blocks", self.blocks)


@dataclass(frozen=True)
class DoraSpec:
    """DoRA (peft's LoRA with ``use_dora``): a rank-`rank` update of each target's direction and
    a trained magnitude per output. Targets are fixed (q and v, as the reference's LoRA), so the
    flat names are its own: a DoRA trial never reads LoRA's `rank`. `alpha_ratio` records how a
    search chose alpha (alpha / rank): logged, not used."""

    rank: int = _flat("dora_rank")
    alpha: float = _flat("dora_alpha")
    dropout: float = _flat("dora_dropout", default=0.0)
    alpha_ratio: float | None = _flat("dora_alpha_ratio", default=None)

    def __post_init__(self) -> None:
        _check_rank("dora_rank", self.rank)
        _check_positive("dora_alpha", self.alpha)
        _check_dropout("dora_dropout", self.dropout)


@dataclass(frozen=True)
class VeraSpec:
    """VeRA (peft's ``VeraConfig``): frozen random rank-`rank` projections shared by every
    target, and two trained scaling vectors per target (rank and output wide)."""

    rank: int = _flat("vera_rank")

    def __post_init__(self) -> None:
        _check_rank("vera_rank", self.rank)


# The methods an arm can fine-tune with, and the spec of each method's own settings (None: it
# has none). The torch half of each entry (how it changes the model) is `trainables.methods`.
METHOD_SPECS: dict[str, type | None] = {
    "fft": None,  # every parameter, layer-wise lr decay
    "lora": LoraSpec,  # loralib adapters, head and fc_norm
    "linear_probe": None,  # head and fc_norm
    "bitfit": None,  # biases, head and fc_norm
    "ln_tune": None,  # LayerNorm weights and biases, head and fc_norm
    "partial": PartialSpec,  # the last k blocks, head and fc_norm
    "dora": DoraSpec,  # peft DoRA on q and v, head and fc_norm
    "vera": VeraSpec,  # peft VeRA on q and v, head and fc_norm
    "ia3": None,  # peft (IA)3 scales on k, v and the MLP inner activation, head and fc_norm
}
KINDS = tuple(METHOD_SPECS)
_SPECS = tuple(dict.fromkeys(c for c in METHOD_SPECS.values() if c is not None))


@dataclass(frozen=True)
class TaskFactors:
    """Which task the trial belongs to: the study factors analysis groups by."""

    task: str
    foundation: str
    model: str  # the foundation's backbone architecture
    dataset: str
    label_fraction: float
    split_seed: int
    num_classes: int
    checkpoint: str | None = None  # the foundation weights (None: random init)
    img_size: int | None = None  # the study's image size (None: the backbone's native size)

    def __post_init__(self) -> None:
        _require(self.num_classes >= 1, "num_classes", "must be >= 1")
        _require(self.img_size is None or self.img_size >= 1, "img_size", "must be >= 1")
        _require(0 < self.label_fraction <= 1, "label_fraction", "must be in (0, 1]")


@dataclass(frozen=True)
class RunSettings:
    """Where a trial reads its data and writes its outputs, and what it runs on: the same for
    every trial of a search, so never searched, logged as params or hashed with the config.
    `predictions_path` may hold `{seed}` and `{trial_id}`."""

    cache_dir: str
    storage_path: str = ""
    checkpoints_to_keep: int = 2
    checkpoint_every: int = 1
    predictions_path: str | None = None
    patient_salt: str = ""
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    local_mode: bool = True

    def __post_init__(self) -> None:
        _require(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0 (0: never)")
        _require(self.checkpoints_to_keep >= 1, "checkpoints_to_keep", "must be >= 1")

    def trial_dir(self, trial_id: str) -> Path:
        """A trial's folder under the study's `train/`: its checkpoints and divergence marker
        (where a worker group's Ray Train run of the same name keeps its own)."""
        storage = self.storage_path or os.path.join(tempfile.gettempdir(), "cxr-train")
        return Path(storage) / f"train-{trial_id}"

    def for_trial(self, trial_id: str) -> RunSettings:
        """These settings with `{trial_id}` of `predictions_path` filled in (`{seed}` stays:
        the fit loop fills it from the trial's spec)."""
        if not self.predictions_path:
            return self
        return dataclasses.replace(self, predictions_path=self.predictions_path.replace(
            "{trial_id}", trial_id))

    def divergence_marker(self, trial_id: str) -> Path:
        """Where a diverged trial leaves its reason (a retry and the driver read it)."""
        return self.trial_dir(trial_id) / DIVERGED


@dataclass(frozen=True)
class TrialSpec:
    """One trial. The flat form is what Tune searches and MLflow logs, key for key."""

    arm: str
    kind: str
    task: TaskFactors
    train: TrainSpec
    method: Any = field(default=None, metadata={"spec": True})  # the kind's own spec, or None
    phase: str = "search"
    run: RunSettings = field(default_factory=lambda: RunSettings(""), compare=False,
                             metadata={"flat": None})

    def __post_init__(self) -> None:
        _require(self.kind in KINDS, "kind", f"use one of {KINDS}")
        _require(self.phase in PHASES, "phase", f"use one of {PHASES}")
        wanted = METHOD_SPECS[self.kind]
        _require(wanted is None and self.method is None or wanted is not None and isinstance(
            self.method, wanted), "kind", f"a {self.kind!r} trial takes "
            f"{wanted.__name__ if wanted else 'no method settings'}, got {self.method!r}")

    @property
    def lora(self) -> LoraSpec | None:
        """The LoRA settings of a LoRA trial, else None."""
        return self.method if isinstance(self.method, LoraSpec) else None

    def to_tune(self) -> dict[str, Any]:
        """The flat form: one key per study factor (the MLflow params of the trial's run)."""
        return flatten(self)

    @classmethod
    def from_tune(cls, flat: Mapping[str, Any], run: RunSettings | None = None) -> TrialSpec:
        """Validate a flat config. Unknown keys are refused (typos must not pass); values are
        cast to their field's type (Optuna and TOML hand ints where floats are meant)."""
        unknown = sorted(set(flat) - set(FLAT_KINDS))
        _require(not unknown, "trial config", f"unknown keys {unknown}; known: "
                 f"{sorted(FLAT_KINDS)}")
        own = unflatten(_TrialFactors, flat)
        _require(own.kind in KINDS, "kind", f"use one of {KINDS}")
        wanted = METHOD_SPECS[own.kind]
        others = {k for spec in _SPECS if spec is not wanted for k in _flat_names(spec)}
        given = sorted(set(flat) & others - set(_flat_names(wanted) if wanted else ()))
        _require(not given, "trial config", f"keys {given} belong to another method than "
                 f"the trial's {own.kind!r}")
        method = unflatten(wanted, flat) if wanted else None
        return cls(**dataclasses.asdict(own), task=unflatten(TaskFactors, flat),
                   train=unflatten(TrainSpec, flat), method=method, run=run or RunSettings(""))


@dataclass(frozen=True)
class _TrialFactors:
    """The TrialSpec's own scalar fields, for reading them from a flat config."""

    arm: str
    kind: str
    phase: str = "search"


def flatten(part: Any) -> dict[str, Any]:
    """A spec's flat form: nested specs inlined, run settings left out, fields renamed and
    encoded as their metadata says."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(type(part))
    for f in dataclasses.fields(part):
        value = getattr(part, f.name)
        if f.metadata.get("flat", f.name) is None:
            continue
        if dataclasses.is_dataclass(value):
            out.update(flatten(value))
        elif not (f.metadata.get("spec") or dataclasses.is_dataclass(kind_of(hints[f.name]))):
            # (an absent spec has no keys)
            encode = f.metadata.get("encode")
            out[f.metadata.get("flat", f.name)] = encode(value) if encode and value is not None \
                else value
    return out


def _flat_names(cls) -> dict[str, dataclasses.Field]:
    return {f.metadata.get("flat", f.name): f for f in dataclasses.fields(cls)}


def flat_names(cls) -> tuple[str, ...]:
    """The flat keys of a spec's fields."""
    return tuple(_flat_names(cls))


def smallest(cls) -> dict[str, Any]:
    """A spec's flat settings at their smallest: its defaults, and 1 for each required number
    (what a method's fixed values are checked within before any training)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for name, f in _flat_names(cls).items():
        if f.default is not dataclasses.MISSING:
            out[name] = f.metadata["encode"](f.default) if f.metadata.get("encode") and (
                f.default is not None) else f.default
        elif kind_of(hints[f.name]) in (int, float):
            out[name] = kind_of(hints[f.name])(1)
    return out


def unflatten(cls, flat: Mapping[str, Any]):
    """One spec from the flat keys that are its fields (the others are ignored)."""
    kwargs = {}
    for name, f in _flat_names(cls).items():
        if name not in flat:
            continue
        decode = f.metadata.get("decode")
        value = flat[name]
        kwargs[f.name] = decode(value) if decode and value is not None else cast(
            FLAT_KINDS[name], value)
    missing = [name for name, f in _flat_names(cls).items() if f.name not in kwargs and
               f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    _require(not missing, "trial config", f"missing {missing} (needed by {cls.__name__})")
    return cls(**kwargs)


def kind_of(hint: Any) -> type:
    """The value type of a field annotation: int for `int`, float for `float | None`, ..."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def cast(kind: type, value: Any) -> Any:
    """`value` (from Tune, TOML or MLflow's text) as `kind`: '4' is 4 for an int field."""
    if value is None or kind not in (bool, int, float, str):
        return value
    if kind is bool:
        return value if isinstance(value, bool) else str(value).lower() == "true"
    if kind is int and isinstance(value, str):
        return int(float(value))
    return kind(value)


def _kinds(*classes) -> dict[str, type]:
    out: dict[str, type] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for name, f in _flat_names(cls).items():
            out[name] = str if f.metadata.get("encode") else kind_of(hints[f.name])
    return out


# Every flat key of a trial and the type of its value (the MLflow param types derive from it).
FLAT_KINDS: dict[str, type] = _kinds(_TrialFactors, TaskFactors, TrainSpec, *_SPECS)
TRAIN_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrainSpec))
LORA_KEYS: tuple[str, ...] = tuple(_flat_names(LoraSpec))
# The flat keys of every method's own settings (LoRA's, partial's, ...).
METHOD_KEYS: tuple[str, ...] = tuple(k for spec in _SPECS for k in _flat_names(spec))


def method_keys(kind: str) -> tuple[str, ...]:
    """The flat keys of one method's own settings (none for a method without settings)."""
    spec = METHOD_SPECS.get(kind)
    return tuple(_flat_names(spec)) if spec is not None else ()


assert {f.name for f in dataclasses.fields(_TrialFactors)} == {
    f.name for f in dataclasses.fields(TrialSpec)
    if not f.metadata.get("spec")
    and not dataclasses.is_dataclass(kind_of(typing.get_type_hints(TrialSpec)[f.name]))}


def config_digest(config: Mapping[str, Any]) -> str:
    """A short stable id of a trial's flat config without its seed and phase: a search
    trial and the final runs that retrain its config share it."""
    text = json.dumps({k: config[k] for k in sorted(config) if k not in ("seed", "phase")},
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]
