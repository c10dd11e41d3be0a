"""AdaLoRA (Zhang et al. 2023, arXiv 2303.10512), HF peft's ``AdaLoraConfig``: each targeted
Linear adds ``alpha / init_rank * P diag(E) Q`` in SVD form, with left vectors P (peft's
``lora_B``, out x init_rank), singular values E (``lora_E``, init_rank x 1) and right vectors Q
(``lora_A``, init_rank x in), on q and v, with the head and fc_norm. A targeted Linear trains
``init_rank * (in + out) + init_rank`` values; the count is at the initial rank, since pruning
zeroes singular values in place and removes no parameter.

Two things run besides the forward, through the fit loop's hooks:

- `after_step`, after every optimiser step: peft's `RankAllocator` updates its importance EMAs
  (|weight x gradient|, smoothed and scaled by their uncertainty, beta1 = beta2 = 0.85) and zeroes
  the least important singular values down to a budget that falls cubically from
  ``init_rank`` to ``target_rank`` per layer on average (summed over the layers, so layers end
  with different ranks). peft's tuner object, which holds the allocator, is dropped by the
  injection; the allocator is built here and kept on the model as a plain attribute (not a
  submodule, so no state-dict key), so `copy.deepcopy(model)` carries it.
- `penalty`, added to the task loss: the orthogonality regulariser on P and Q, the mean over the
  adapted matrices of ``||Q Q^T - I||_F`` and ``||P^T P - I||_F`` times `orth_weight` (peft's and
  the authors' code's form; the paper writes the squared norms). 0.1, the authors' scripts'
  ``reg_orth_coef``, is the default (peft's own default is 0.5).

The schedule comes from the trial's optimiser steps T (known only at `after_step`): T/6 steps
before any pruning, the budget falling until step T - T/2, a fixed rank pattern for the last
T/2 steps, and a reallocation every T/300 steps (at least 1): the proportions of the authors'
README example (init_warmup 500, final_warmup 1500, mask_interval 10 of total_step 3000).
peft's defaults (no warm-up, no final phase) would never reach the final allocation in a loop
whose last step is T - 1. Without an `init_rank` it is 1.5 x `target_rank`, rounded up (12 ->
8 in that README and the authors' SQuAD script).

A resumed trial loses the allocator's state (a checkpoint holds the trainable tensors only):
its importance EMAs restart from zero, so allocations after the resume rank on fewer steps of
evidence, and one resumed after the final allocation allocates the target budget once more, from
its first step's importance, and keeps that pattern. It is not bit-identical to an uninterrupted
trial.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from contract.errors import ConfigError
from contract.fields import (
    check_fraction,
    check_positive,
    check_rank,
    flat_field,
    flat_key,
    require,
)
from methods._base import ALPHA_RATIOS, LR, RANKS, Method, Site, Trains, register, suggest_training
from methods._peft import ADAPTER, PEFT_TARGETS

if TYPE_CHECKING:
    from torch import Tensor, nn

# The proportions of the authors' README example (500, 1500 and 10 of 3000 steps).
WARMUP_FRACTION, FINAL_FRACTION, INTERVAL_STEPS = 1 / 6, 1 / 2, 300
ALLOCATOR = "_adalora_allocator"  # the model attribute that holds peft's RankAllocator
# peft's config refuses to be built without a total; the real one arrives with `after_step`.
PLACEHOLDER_TOTAL = 1


@dataclass(frozen=True)
class AdaloraSpec:
    """`alpha_ratio` records how a search chose alpha (alpha / init rank): logged, not used."""

    target_rank: int = flat_field("adalora_target_rank")
    alpha: float = flat_field("adalora_alpha")
    init_rank: int | None = flat_field("adalora_init_rank", default=None)
    orth_weight: float = flat_field("adalora_orth_weight", default=0.1)
    dropout: float = flat_field("adalora_dropout", default=0.0)
    alpha_ratio: float | None = flat_field("adalora_alpha_ratio", default=None)

    def __post_init__(self) -> None:
        check_rank("adalora_target_rank", self.target_rank)
        check_positive("adalora_alpha", self.alpha)
        if self.init_rank is not None:
            check_rank("adalora_init_rank", self.init_rank)
            require(self.target_rank <= self.init_rank, "adalora_target_rank",
                    f"{self.target_rank} above adalora_init_rank {self.init_rank}; choose a "
                    "target rank <= the initial rank")
        require(not isinstance(self.orth_weight, bool) and isinstance(self.orth_weight, int | float)
                and self.orth_weight >= 0, "adalora_orth_weight",
                f"must be a number >= 0, got {self.orth_weight!r}")
        check_fraction("adalora_dropout", self.dropout)

    @property
    def initial_rank(self) -> int:
        return self.init_rank if self.init_rank is not None else default_init_rank(self.target_rank)


def default_init_rank(target_rank: int) -> int:
    """The authors' examples start at 1.5 times the target rank."""
    return math.ceil(1.5 * target_rank)


TARGET_RANK, INIT_RANK, ALPHA, ALPHA_RATIO, DROPOUT = (flat_key(AdaloraSpec, f) for f in (
    "target_rank", "init_rank", "alpha", "alpha_ratio", "dropout"))


def schedule(total_steps: int) -> tuple[int, int, int]:
    """(tinit, tfinal, deltaT) of peft's budget schedule for a trial of `total_steps` optimiser
    steps numbered from 0: the final allocation (at step total - tfinal) is always reached,
    after at least one step of importance measured."""
    if total_steps < 2:
        raise ConfigError(f"adalora: {total_steps} optimiser step cannot allocate ranks; train "
                          "for at least 2 steps (more epochs or a smaller batch)")
    final = max(1, int(total_steps * FINAL_FRACTION))
    warmup = min(int(total_steps * WARMUP_FRACTION), total_steps - final - 1)
    return warmup, final, max(1, total_steps // INTERVAL_STEPS)


def prepare(site: Site, spec: AdaloraSpec) -> Trains:
    from peft import AdaLoraConfig, AdaLoraModel
    from peft.tuners.adalora import RankAllocator

    site.split_qkv()
    site.check_width(spec.initial_rank, INIT_RANK, PEFT_TARGETS)
    config = AdaLoraConfig(init_r=spec.initial_rank, target_r=spec.target_rank,
                           lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                           orth_reg_weight=spec.orth_weight, total_step=PLACEHOLDER_TOTAL,
                           target_modules=site.regex(PEFT_TARGETS))
    trains = site.inject_peft(AdaLoraModel, config, ("lora_A", "lora_B", "lora_E"))
    # object.__setattr__: an attribute of the model, never a submodule or state-dict entry.
    object.__setattr__(site.model, ALLOCATOR, RankAllocator(site.model, config, ADAPTER))
    return trains


def _allocator(model: nn.Module) -> Any:
    allocator = model.__dict__.get(ALLOCATOR)
    if allocator is None:
        raise ConfigError("adalora: the model has no rank allocator; build it with "
                          "apply_method(model, 'adalora', spec)")
    return allocator


def after_step(model: nn.Module, step: int, total_steps: int) -> None:
    """peft's `AdaLoraModel.update_and_allocate` for global step `step` (0-based) of
    `total_steps`, with the schedule derived from `total_steps`."""
    allocator = _allocator(model)
    if allocator.init_bgt == allocator.target_bgt:
        return  # target rank = initial rank: nothing to prune
    config = allocator.peft_config
    config.tinit, config.tfinal, config.deltaT = schedule(total_steps)
    config.total_step = total_steps
    fixed_from = total_steps - config.tfinal
    if step < fixed_from:
        allocator.update_and_allocate(model, step)
    elif step == fixed_from or config.rank_pattern is None:
        # The final allocation, to the target budget; or, in a trial resumed after it (the
        # pattern is not checkpointed), a fresh one from this step's importance.
        if not allocator.exp_avg_ipt:
            allocator.update_ipt(model)
        config.rank_pattern = allocator.mask_to_budget(model, allocator.target_bgt)
        allocator.reset_ipt()
    else:
        allocator.mask_using_rank_pattern(model, config.rank_pattern)


def penalty(model: nn.Module) -> Tensor:
    """orth_weight x the mean over the adapted matrices of ||Q Q^T - I||_F and ||P^T P - I||_F."""
    import torch
    from peft.tuners.adalora import AdaLoraLayer

    terms = []
    for module in model.modules():
        if isinstance(module, AdaLoraLayer) and ADAPTER in module.lora_A:
            right, left = module.lora_A[ADAPTER], module.lora_B[ADAPTER]
            for gram in (right @ right.T, left.T @ left):
                identity = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
                terms.append(torch.linalg.matrix_norm(gram - identity))
    return _allocator(model).peft_config.orth_reg_weight * torch.stack(terms).mean()


def space(trial: Any, optimizer: str, recipe: Any) -> dict[str, Any]:
    """The target rank over LoRA's ranks, starting at 1.5 times it; alpha as a multiple of the
    initial rank (the update is scaled by alpha / init rank, as LoRA's by alpha / rank)."""
    target = trial.suggest_categorical(TARGET_RANK, RANKS)
    ratio = trial.suggest_categorical(ALPHA_RATIO, ALPHA_RATIOS)
    suggest_training(trial, optimizer)
    trial.suggest_float(DROPOUT, 0.0, 0.2)
    init = default_init_rank(target)
    return {INIT_RANK: init, ALPHA: float(ratio * init)}


METHOD = register(Method(
    "adalora", "reparameterised",
    "peft AdaLoRA (SVD-form LoRA, singular values pruned to a budget) on q and v, head and "
    "fc_norm", prepare, spaces={"adalora": space}, spec=AdaloraSpec,
    shown=(TARGET_RANK, INIT_RANK, ALPHA, LR),
    counted_at=AdaloraSpec(target_rank=4, alpha=12.0, init_rank=6),
    counted_as="r6 -> 4 on q+v", merges=True, after_step=after_step, penalty=penalty,
    source="Zhang et al. 2023, arXiv 2303.10512; HF peft"))
