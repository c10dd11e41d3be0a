"""Named define-by-run search spaces for Optuna.

A space is a function `(trial, optimizer) -> constants`: it samples with `trial.suggest_*` (each
value becomes its own Tune config key, MLflow param and Optuna param) and returns the values it
derives (alpha from rank and alpha/rank). Learning-rate ranges depend on the arm's optimiser
family, which is fixed per arm, not searched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna

from contract.errors import ConfigError
from contract.schema import Param
from search_spaces.presets import Recipe

RANKS = (1, 2, 4, 8, 16, 32, 64)
ALPHA_RATIOS = (0.5, 1.0, 2.0, 4.0, 8.0)
TARGET_SETS = ("q+v", "q+k+v", "q+k+v+proj", "q+k+v+proj+fc1+fc2")
LR_RANGE = {"sgd": (1e-3, 0.5), "adamw": (1e-5, 3e-2)}
SpaceFn = Callable[[optuna.Trial, str, Recipe | None], dict[str, Any]]


def _lr(trial: optuna.Trial, optimizer: str) -> float:
    low, high = LR_RANGE[optimizer]
    return trial.suggest_float(Param.LR, low, high, log=True)


def lora(trial: optuna.Trial, optimizer: str, recipe: Recipe | None) -> dict[str, Any]:
    rank = trial.suggest_categorical(Param.RANK, RANKS)
    ratio = trial.suggest_categorical(Param.ALPHA_RATIO, ALPHA_RATIOS)
    trial.suggest_categorical(Param.TARGETS, TARGET_SETS)
    _lr(trial, optimizer)
    trial.suggest_float(Param.WEIGHT_DECAY, 0.0, 0.1)
    trial.suggest_float(Param.LORA_DROPOUT, 0.0, 0.2)
    return {Param.ALPHA: float(ratio * rank)}


def fft(trial: optuna.Trial, optimizer: str, recipe: Recipe | None) -> dict[str, Any]:
    _lr(trial, optimizer)
    trial.suggest_float(Param.LAYER_DECAY, 0.5, 1.0)
    trial.suggest_float(Param.WEIGHT_DECAY, 0.0, 0.1)
    return {}


def _around(trial: optuna.Trial, recipe: Recipe | None, optimizer: str) -> float:
    if recipe is None:
        return _lr(trial, optimizer)
    return trial.suggest_float(Param.LR, recipe.lr / 3, recipe.lr * 3, log=True)


def lora_paper(trial: optuna.Trial, optimizer: str, recipe: Recipe | None) -> dict[str, Any]:
    """The reference recipe's neighbourhood: q+v, alpha fixed at 32, rank and lr searched."""
    rank = trial.suggest_categorical(Param.RANK, (4, 8, 16, 32))
    _around(trial, recipe, optimizer)
    alpha = recipe.alpha if recipe else 32.0
    return {Param.ALPHA: alpha, Param.ALPHA_RATIO: alpha / rank, Param.TARGETS: "q+v",
            Param.LORA_DROPOUT: recipe.lora_dropout if recipe else 0.1}


def fft_paper(trial: optuna.Trial, optimizer: str, recipe: Recipe | None) -> dict[str, Any]:
    _around(trial, recipe, optimizer)
    if optimizer == "adamw":
        trial.suggest_categorical(Param.LAYER_DECAY, (0.55, 0.65, 0.75))
    return {}


def head_only(trial: optuna.Trial, optimizer: str, recipe: Recipe | None) -> dict[str, Any]:
    """linear_probe, bitfit, ln_tune, ia3: the methods with no settings of their own."""
    _lr(trial, optimizer)
    trial.suggest_float(Param.WEIGHT_DECAY, 0.0, 0.1)
    return {}


PARTIAL_BLOCKS = (1, 2, 4)  # within the depth of every registered ViT (the demo's is 4)


def partial(trial: optuna.Trial, optimizer: str, recipe: Recipe | None) -> dict[str, Any]:
    trial.suggest_categorical(Param.PARTIAL_BLOCKS, PARTIAL_BLOCKS)
    _lr(trial, optimizer)
    trial.suggest_float(Param.WEIGHT_DECAY, 0.0, 0.1)
    return {}


def dora(trial: optuna.Trial, optimizer: str, recipe: Recipe | None) -> dict[str, Any]:
    """DoRA on q and v, over LoRA's ranges (its rank, alpha / rank and dropout are its own)."""
    rank = trial.suggest_categorical(Param.DORA_RANK, RANKS)
    ratio = trial.suggest_categorical(Param.DORA_ALPHA_RATIO, ALPHA_RATIOS)
    _lr(trial, optimizer)
    trial.suggest_float(Param.WEIGHT_DECAY, 0.0, 0.1)
    trial.suggest_float(Param.DORA_DROPOUT, 0.0, 0.2)
    return {Param.DORA_ALPHA: float(ratio * rank)}


# VeRA's rank is that of its frozen random projections, not of a trained matrix: a target
# trains rank + width values, so ranks far above LoRA's stay cheap (peft's default is 256).
VERA_RANKS = (64, 128, 256, 512, 1024)


def vera(trial: optuna.Trial, optimizer: str, recipe: Recipe | None) -> dict[str, Any]:
    trial.suggest_categorical(Param.VERA_RANK, VERA_RANKS)
    _lr(trial, optimizer)
    trial.suggest_float(Param.WEIGHT_DECAY, 0.0, 0.1)
    return {}


@dataclass(frozen=True)
class Space:
    name: str
    kind: str  # the method the arm fine-tunes with (contract.config.METHOD_SPECS)
    fn: SpaceFn


SPACES = {s.name: s for s in (Space("lora", "lora", lora), Space("fft", "fft", fft),
                              Space("lora_paper", "lora", lora_paper),
                              Space("fft_paper", "fft", fft_paper),
                              Space("linear_probe", "linear_probe", head_only),
                              Space("bitfit", "bitfit", head_only),
                              Space("ln_tune", "ln_tune", head_only),
                              Space("partial", "partial", partial),
                              Space("dora", "dora", dora), Space("vera", "vera", vera),
                              Space("ia3", "ia3", head_only))}


def get_space(name: str) -> Space:
    if name not in SPACES:
        raise ConfigError(f"search space {name!r} is unknown: use one of {sorted(SPACES)}")
    return SPACES[name]


def preset_point(space: Space, recipe: Recipe | None, optimizer: str) -> dict[str, Any] | None:
    """The recipe as values of this space's sampled params, or None if it lies outside it."""
    if recipe is None:
        return None
    known = {Param.LR: recipe.lr, Param.RANK: recipe.rank, Param.TARGETS: "q+v",
             Param.WEIGHT_DECAY: recipe.weight_decay, Param.LORA_DROPOUT: recipe.lora_dropout,
             Param.LAYER_DECAY: recipe.layer_decay}
    if recipe.rank:
        known[Param.ALPHA_RATIO] = recipe.alpha / recipe.rank
    sampled = _distributions(space, optimizer, recipe)
    point = {name: known[name] for name in sampled if name in known}
    if set(point) != set(sampled):  # the recipe does not say (partial_blocks): no preset
        return None
    return point if _inside(space, point, recipe, optimizer) else None


def _inside(space: Space, point: dict[str, Any], recipe: Recipe, optimizer: str) -> bool:
    """True when every value of the point lies inside this space's distributions."""
    distributions = _distributions(space, optimizer, recipe)
    for name, value in point.items():
        dist = distributions.get(name)
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            ok = value in dist.choices
        elif isinstance(dist, optuna.distributions.FloatDistribution):
            ok = dist.low <= value <= dist.high
        else:
            ok = False
        if not ok:
            return False
    return True


def _distributions(space: Space, optimizer: str, recipe: Recipe | None) -> dict[str, Any]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    space.fn(trial, optimizer, recipe)
    return dict(trial.distributions)
