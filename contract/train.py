"""How one model is optimised (`TrainSpec`): the training half of the trial contract.

Stdlib only, below the method files (`methods/`), which name its keys (`lr`, `weight_decay`) in
their search spaces.
"""

from __future__ import annotations

from dataclasses import dataclass

from contract.fields import require as _require

OPTIMIZERS = ("sgd", "adamw")
AUGMENTATIONS = ("none", "crop_flip", "crop_flip_erase")


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
