"""The reference study's published recipes (RL4M/MED-PEFT launch scripts), as data.

Used as the first trial of every search (`points_to_evaluate`), so a search starts from the
published configuration and has to beat it. Numbers from shared/reference/paper_presets.md.
"""

from __future__ import annotations

from dataclasses import dataclass

REFERENCE_BATCH = 64
FRACTIONS = (0.01, 0.1, 1.0)


@dataclass(frozen=True)
class Recipe:
    """One published configuration. `lr` is absolute: AdamW base lrs are already scaled."""

    optimizer: str
    lr: float
    epochs: int
    rank: int = 0
    alpha: float = 32.0
    lora_dropout: float = 0.1
    weight_decay: float = 0.0
    layer_decay: float = 1.0
    augmentation: str = "crop_flip"


def scaled_lr(blr: float, batch_size: int = REFERENCE_BATCH) -> float:
    """The reference AdamW convention: lr = blr * global batch / 256."""
    return blr * batch_size / 256


# MRM (SGD, momentum 0.9, no weight decay, plain groups): (lr, rank), 100 epochs.
_MRM_LORA = {
    "nih": ((0.05, 4), (0.05, 8), (0.2, 32)),
    "chexpert": ((0.02, 4), (0.05, 16), (0.01, 32)),
    "rsna": ((0.01, 4), (0.01, 32), (0.01, 32)),
}
# CXR-MAE (AdamW, wd 0.05, layer decay 0.65, random erasing): (epochs, blr, rank).
_CXRMAE_LORA = {
    "nih": ((400, 3e-3, 4), (200, 1e-3, 8), (100, 3e-3, 32)),
    "chexpert": ((400, 3e-3, 4), (100, 5e-3, 8), (100, 3e-3, 32)),
    "rsna": ((100, 3e-3, 4), (100, 5e-3, 8), (100, 5e-3, 32)),
}


def _fraction_index(label_fraction: float) -> int:
    """The reference publishes 1%, 10% and 100%; other fractions use the nearest one."""
    return min(range(3), key=lambda i: abs(FRACTIONS[i] - label_fraction))


def lora_recipe(foundation: str, dataset: str, label_fraction: float) -> Recipe | None:
    i = _fraction_index(label_fraction)
    if foundation == "mrm" and dataset in _MRM_LORA:
        lr, rank = _MRM_LORA[dataset][i]
        return Recipe("sgd", lr, 100, rank=rank)
    if foundation == "cxr_mae" and dataset in _CXRMAE_LORA:
        epochs, blr, rank = _CXRMAE_LORA[dataset][i]
        return Recipe("adamw", scaled_lr(blr), epochs, rank=rank, weight_decay=0.05,
                      layer_decay=0.65, augmentation="crop_flip_erase")
    return None


def fft_recipe(foundation: str) -> Recipe | None:
    """Published only for the 1% setting; used as the FFT starting point for every fraction."""
    if foundation == "mrm":
        return Recipe("sgd", 1e-2, 200)
    if foundation == "cxr_mae":
        return Recipe("adamw", scaled_lr(5e-4), 400, weight_decay=0.05, layer_decay=0.65,
                      augmentation="crop_flip_erase")
    return None


def default_optimizer(foundation: str) -> str:
    """The arm's optimiser family follows the reference recipe: SGD for MRM, AdamW otherwise."""
    return "sgd" if foundation == "mrm" else "adamw"


def demo_recipes() -> tuple[Recipe, Recipe]:
    """Starting points for the phantom demo's tiny ViT (no published recipe exists for it)."""
    return (Recipe("adamw", 2e-3, 8, rank=4, alpha=8.0, weight_decay=0.05, augmentation="none"),
            Recipe("adamw", 1e-3, 8, weight_decay=0.05, layer_decay=0.75, augmentation="none"))
