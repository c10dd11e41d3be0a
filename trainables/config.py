"""Typed trial configuration: the flat dict of a Tune trial stops here.

A trial's config is a flat mapping (every study factor its own key, so it can be logged as its own
MLflow param and searched by Optuna). `TrialConfig.from_flat` validates it once and turns it into
frozen dataclasses; nothing below this module sees a dict.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from trainables.errors import ConfigError
from trainables.lora import TARGETS, LoraSpec

OPTIMIZERS = ("sgd", "adamw")
AUGMENTATIONS = ("none", "crop_flip", "crop_flip_erase")
PHASES = ("search", "final")


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field}: {message}")


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


@dataclass(frozen=True)
class ModelSpec:
    """Which backbone, which foundation weights, how many outputs."""

    foundation: str
    checkpoint: str | None
    num_classes: int

    def __post_init__(self) -> None:
        _require(self.num_classes >= 1, "num_classes", "must be >= 1")


@dataclass(frozen=True)
class RunSpec:
    """Where the trial reads its data cache and writes its outputs."""

    cache_dir: str
    phase: str = "search"
    predictions_path: str | None = None
    checkpoint_every: int = 1
    patient_salt: str = ""

    def __post_init__(self) -> None:
        _require(self.phase in PHASES, "phase", f"use one of {PHASES}")
        _require(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0 (0: never)")


@dataclass(frozen=True)
class TrialConfig:
    arm: str
    model: ModelSpec
    train: TrainSpec
    run: RunSpec
    lora: LoraSpec | None = None

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> TrialConfig:
        """Validate a Tune trial's flat config. Unknown keys are refused (typos must not pass)."""
        known = flat_keys()
        unknown = sorted(set(flat) - known)
        _require(not unknown, "trial config", f"unknown keys {unknown}; known: {sorted(known)}")
        train = TrainSpec(**{f.name: _cast(f, flat[f.name]) for f in dataclasses.fields(TrainSpec)
                             if f.name in flat})
        model = ModelSpec(foundation=str(flat["foundation"]), checkpoint=flat.get("checkpoint"),
                          num_classes=int(flat["num_classes"]))
        run = RunSpec(**{f.name: flat[f.name] for f in dataclasses.fields(RunSpec)
                         if f.name in flat})
        lora = None
        if flat.get("rank"):
            lora = LoraSpec(rank=int(flat["rank"]), alpha=float(flat["alpha"]),
                            dropout=float(flat.get("lora_dropout", 0.0)),
                            targets=parse_targets(flat.get("targets", "q+v")))
        return cls(arm=str(flat["arm"]), model=model, train=train, run=run, lora=lora)


FLAT_EXTRA_KEYS = frozenset({
    "arm", "foundation", "checkpoint", "num_classes", "rank", "alpha", "alpha_ratio",
    "lora_dropout", "targets", "task", "dataset", "label_fraction", "split_seed", "model",
})


def flat_keys() -> frozenset[str]:
    names = {f.name for f in dataclasses.fields(TrainSpec)} | {
        f.name for f in dataclasses.fields(RunSpec)}
    return frozenset(names) | FLAT_EXTRA_KEYS


def _cast(field: dataclasses.Field, value: Any) -> Any:
    """Optuna and TOML hand us ints where floats are meant and vice versa; cast by annotation."""
    kind = {"float": float, "int": int, "str": str}.get(str(field.type))
    return kind(value) if kind else value


def parse_targets(text: str | tuple[str, ...]) -> tuple[str, ...]:
    """'q+v' -> ('q', 'v'): targets travel as one '+'-joined string so they log as one param."""
    parts = tuple(text) if isinstance(text, tuple) else tuple(p for p in str(text).split("+") if p)
    unknown = [p for p in parts if p not in TARGETS]
    _require(bool(parts) and not unknown, "targets",
             f"{text!r} is not a '+'-joined subset of {TARGETS}")
    return parts
