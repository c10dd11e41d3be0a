"""Full fine-tuning: every parameter trains, with layer-wise lr decay as the recipe says.

The reference arm every method is compared with. `fft_paper` searches the published recipe's
neighbourhood (its lr, and the MAE recipes' layer decays) instead of the whole range.
"""

from __future__ import annotations

from typing import Any

from methods._base import LAYER_DECAY, LR, WEIGHT_DECAY, Method, Site, Trains, register, suggest_lr


def prepare(site: Site, spec: None) -> Trains:
    return lambda name: True


def space(trial: Any, optimizer: str, recipe: Any) -> dict[str, Any]:
    suggest_lr(trial, optimizer)
    trial.suggest_float(LAYER_DECAY, 0.5, 1.0)
    trial.suggest_float(WEIGHT_DECAY, 0.0, 0.1)
    return {}


def around_recipe(trial: Any, optimizer: str, recipe: Any) -> float:
    """The lr within a factor of 3 of the recipe's (the whole range without one)."""
    if recipe is None:
        return suggest_lr(trial, optimizer)
    return trial.suggest_float(LR, recipe.lr / 3, recipe.lr * 3, log=True)


def paper_space(trial: Any, optimizer: str, recipe: Any) -> dict[str, Any]:
    around_recipe(trial, optimizer, recipe)
    if optimizer == "adamw":
        trial.suggest_categorical(LAYER_DECAY, (0.55, 0.65, 0.75))
    return {}


METHOD = register(Method(
    "fft", "full", "every parameter (layer-wise lr decay as the recipe says)", prepare,
    spaces={"fft": space, "fft_paper": paper_space}, shown=(LR, LAYER_DECAY), merges=True,
    source="the reference study's full fine-tuning (MAE recipe)"))
