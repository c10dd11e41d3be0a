"""Named define-by-run search spaces for Optuna: every method's (`methods/`), by name.

A space is a function `(trial, optimizer, recipe) -> constants`: it samples with
`trial.suggest_*` (each value becomes its own Tune config key, MLflow param and Optuna param)
and returns the values it derives (alpha from rank and alpha/rank). Learning-rate ranges depend
on the arm's optimiser family, which is fixed per arm, not searched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna

from contract.config import METHOD_SPECS, flat_defaults
from contract.errors import ConfigError
from contract.schema import Param
from methods import REGISTRY
from search_spaces.presets import Recipe

SpaceFn = Callable[[optuna.Trial, str, Recipe | None], dict[str, Any]]


@dataclass(frozen=True)
class Space:
    name: str
    kind: str  # the method the arm fine-tunes with (a `methods/` module)
    fn: SpaceFn


# Every method's spaces, its default first (it bears the method's name).
SPACES = {name: Space(name, method.name, fn) for method in REGISTRY.values()
          for name, fn in method.spaces.items()}


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
    spec = METHOD_SPECS[space.kind]
    # Settings a recipe does not speak of (LoRA's variants) at their defaults: the recipe's.
    known = {**(flat_defaults(spec) if spec else {}), **known}
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
