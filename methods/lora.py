"""LoRA (Hu et al. 2022, arXiv 2106.09685) as the reference study used it: loralib low-rank
adapters on the chosen targets, with the head and fc_norm.

The layer keeps its frozen weight W and adds ``scaling * B @ A``, with A (rank x in) and B
(out x rank); a targeted Linear trains ``rank * (in + out)`` values. Three published variants
are searched choices of the same arm, so the tuning decides:

- `lora_scaling`: "standard" (alpha / rank) or "rslora" (alpha / sqrt(rank); Kalajdzievski
  2023, arXiv 2312.03732);
- `lora_init`: "standard" (A Kaiming, B zero) or "pissa" (Meng et al. 2024, arXiv 2404.02948:
  A and B from the weight's top-`rank` singular vectors, and the frozen weight keeps the
  residual, so `W_res + scaling * B @ A` is the foundation's W at step 0 and merging gives back
  a plain weight);
- `loraplus_lr_ratio`: LoRA+ (Hayou et al. 2024, arXiv 2402.12354): B learns this many times
  faster than A (1: plain LoRA).

The loralib layers and the split of timm's fused qkv are `trainables.lora`'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from contract.fields import (
    canonical_targets,
    check_choice,
    check_fraction,
    check_positive,
    check_rank,
    flat_field,
    flat_key,
    join_targets,
    parse_targets,
)
from methods._base import (
    ALPHA_RATIOS,
    LR,
    RANKS,
    WEIGHT_DECAY,
    Method,
    Site,
    Trains,
    register,
    suggest_lr,
)
from methods.fft import around_recipe

SCALINGS = ("standard", "rslora")
INITS = ("standard", "pissa")


@dataclass(frozen=True)
class LoraSpec:
    """What to adapt and how strongly; ``targets`` is stored in canonical ``TARGETS`` order.

    `alpha_ratio` records how a search chose alpha (alpha / rank): logged, not used."""

    rank: int
    alpha: float
    dropout: float = flat_field("lora_dropout", default=0.0)
    targets: tuple[str, ...] = flat_field("targets", join_targets, parse_targets,
                                          default=("q", "v"))
    alpha_ratio: float | None = None
    scaling_rule: str = flat_field("lora_scaling", default="standard")
    init: str = flat_field("lora_init", default="standard")
    lr_ratio: float = flat_field("loraplus_lr_ratio", default=1.0)

    def __post_init__(self) -> None:
        check_rank("lora rank", self.rank)
        check_positive("lora alpha", self.alpha)
        check_fraction("lora dropout", self.dropout)
        check_choice("lora_scaling", self.scaling_rule, SCALINGS)
        check_choice("lora_init", self.init, INITS)
        check_positive("loraplus_lr_ratio", self.lr_ratio)
        object.__setattr__(self, "targets", canonical_targets(self.targets))

    @property
    def scaling(self) -> float:
        """The factor of the low-rank update: alpha / rank, or rsLoRA's alpha / sqrt(rank)."""
        if self.scaling_rule == "rslora":
            return self.alpha / math.sqrt(self.rank)
        return self.alpha / self.rank


RANK, ALPHA, ALPHA_RATIO = (flat_key(LoraSpec, f) for f in ("rank", "alpha", "alpha_ratio"))
TARGETS_KEY, DROPOUT = flat_key(LoraSpec, "targets"), flat_key(LoraSpec, "dropout")
SCALING, INIT, LR_RATIO = (flat_key(LoraSpec, f) for f in ("scaling_rule", "init", "lr_ratio"))
TARGET_SETS = ("q+v", "q+k+v", "q+k+v+proj", "q+k+v+proj+fc1+fc2")
LR_RATIOS = (1.0, 4.0, 16.0)  # LoRA+'s paper recommends about 16 for its tasks


def prepare(site: Site, spec: LoraSpec) -> Trains:
    return site.apply_lora(spec)


def lr_scales(spec: LoraSpec) -> Callable[[str], float]:
    """LoRA+: B's parameters (loralib's `lora_B`) at `lr_ratio` times the lr."""
    return lambda name: spec.lr_ratio if name.endswith(".lora_B") else 1.0


def space(trial: Any, optimizer: str, recipe: Any) -> dict[str, Any]:
    rank = trial.suggest_categorical(RANK, RANKS)
    ratio = trial.suggest_categorical(ALPHA_RATIO, ALPHA_RATIOS)
    trial.suggest_categorical(TARGETS_KEY, TARGET_SETS)
    suggest_lr(trial, optimizer)
    trial.suggest_float(WEIGHT_DECAY, 0.0, 0.1)
    trial.suggest_float(DROPOUT, 0.0, 0.2)
    trial.suggest_categorical(SCALING, SCALINGS)
    trial.suggest_categorical(INIT, INITS)
    trial.suggest_categorical(LR_RATIO, LR_RATIOS)
    return {ALPHA: float(ratio * rank)}


def paper_space(trial: Any, optimizer: str, recipe: Any) -> dict[str, Any]:
    """The reference recipe's neighbourhood: q+v, alpha fixed at 32, rank and lr searched."""
    rank = trial.suggest_categorical(RANK, (4, 8, 16, 32))
    around_recipe(trial, optimizer, recipe)
    alpha = recipe.alpha if recipe else 32.0
    return {ALPHA: alpha, ALPHA_RATIO: alpha / rank, TARGETS_KEY: "q+v",
            DROPOUT: recipe.lora_dropout if recipe else 0.1}


METHOD = register(Method(
    "lora", "reparameterised", "loralib adapters on the targets, head and fc_norm", prepare,
    spaces={"lora": space, "lora_paper": paper_space}, spec=LoraSpec,
    shown=(RANK, ALPHA, TARGETS_KEY, LR), shown_if_changed=(SCALING, INIT, LR_RATIO),
    # counted as the paper's LoRA: r4 on q and v
    counted_at=LoraSpec(4, 8.0, targets=("q", "v")), counted_as="r4 on q+v", merges=True,
    lr_scales=lr_scales, source="Hu et al. 2022, arXiv 2106.09685; loralib"))
