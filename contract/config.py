"""The typed trial contract: what one trial is, in one frozen dataclass, and its flat forms.

A trial is a `TrialSpec`: its task factors, its arm (name and kind), how it trains
(`TrainSpec`), its method's own settings (a dataclass of `methods/`, or None) and its run settings
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
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contract.errors import DIVERGED
from contract.fields import (  # noqa: F401 - TARGETS and the targets' forms: the contract's API
    TARGETS,
    flat_fields,
    join_targets,
    kind_of,
    parse_targets,
)
from contract.fields import require as _require
from contract.train import AUGMENTATIONS, OPTIMIZERS, TrainSpec  # noqa: F401 - the contract's API
from methods import REGISTRY

PHASES = ("search", "final")

# The methods an arm can fine-tune with (one module each in `methods/`), and the spec of each
# method's own settings (None: it has none).
METHOD_SPECS: dict[str, type | None] = {name: m.spec for name, m in REGISTRY.items()}
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
        others = {k for spec in _SPECS if spec is not wanted for k in flat_fields(spec)}
        given = sorted(set(flat) & others - set(flat_fields(wanted) if wanted else ()))
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


def flat_names(cls) -> tuple[str, ...]:
    """The flat keys of a spec's fields."""
    return tuple(flat_fields(cls))


def flat_defaults(cls) -> dict[str, Any]:
    """A spec's flat settings that have defaults, at them."""
    return {name: f.metadata["encode"](f.default) if f.metadata.get("encode") and (
        f.default is not None) else f.default
        for name, f in flat_fields(cls).items() if f.default is not dataclasses.MISSING}


def unflatten(cls, flat: Mapping[str, Any]):
    """One spec from the flat keys that are its fields (the others are ignored)."""
    kwargs = {}
    for name, f in flat_fields(cls).items():
        if name not in flat:
            continue
        decode = f.metadata.get("decode")
        value = flat[name]
        kwargs[f.name] = decode(value) if decode and value is not None else cast(
            FLAT_KINDS[name], value)
    missing = [name for name, f in flat_fields(cls).items() if f.name not in kwargs and
               f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    _require(not missing, "trial config", f"missing {missing} (needed by {cls.__name__})")
    return cls(**kwargs)


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
        for name, f in flat_fields(cls).items():
            out[name] = str if f.metadata.get("encode") else kind_of(hints[f.name])
    return out


# Every flat key of a trial and the type of its value (the MLflow param types derive from it).
FLAT_KINDS: dict[str, type] = _kinds(_TrialFactors, TaskFactors, TrainSpec, *_SPECS)
TRAIN_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrainSpec))
# The flat keys of every method's own settings (LoRA's, partial's, ...).
METHOD_KEYS: tuple[str, ...] = tuple(k for spec in _SPECS for k in flat_fields(spec))


def method_keys(kind: str) -> tuple[str, ...]:
    """The flat keys of one method's own settings (none for a method without settings)."""
    spec = METHOD_SPECS.get(kind)
    return tuple(flat_fields(spec)) if spec is not None else ()


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
