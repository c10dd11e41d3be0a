"""DoRA (Liu et al. 2024, arXiv 2402.09353), HF peft's LoRA with ``use_dora``: a rank-`rank`
update of each target's direction and a trained magnitude per output, on q and v, with the head
and fc_norm. A targeted Linear trains ``rank * (in + out) + out`` values.

Its flat names are its own (`dora_rank`...): a DoRA trial never reads LoRA's `rank`.
`alpha_ratio` records how a search chose alpha (alpha / rank): logged, not used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from contract.fields import check_fraction, check_positive, check_rank, flat_field, flat_key
from methods._base import (
    LR,
    RANKS,
    Method,
    Site,
    Trains,
    register,
    suggest_rank_alpha,
    suggest_training,
)
from methods._peft import PEFT_TARGETS


@dataclass(frozen=True)
class DoraSpec:
    rank: int = flat_field("dora_rank")
    alpha: float = flat_field("dora_alpha")
    dropout: float = flat_field("dora_dropout", default=0.0)
    alpha_ratio: float | None = flat_field("dora_alpha_ratio", default=None)

    def __post_init__(self) -> None:
        check_rank("dora_rank", self.rank)
        check_positive("dora_alpha", self.alpha)
        check_fraction("dora_dropout", self.dropout)


RANK, ALPHA, ALPHA_RATIO, DROPOUT = (flat_key(DoraSpec, f) for f in
                                     ("rank", "alpha", "alpha_ratio", "dropout"))


def prepare(site: Site, spec: DoraSpec) -> Trains:
    from peft import LoraConfig, LoraModel

    site.split_qkv()
    site.check_width(spec.rank, RANK, PEFT_TARGETS)
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        use_dora=True, target_modules=site.regex(PEFT_TARGETS))
    return site.inject_peft(LoraModel, config, ("lora_A", "lora_B", "lora_magnitude_vector"))


def space(trial: Any, optimizer: str, recipe: Any) -> dict[str, Any]:
    """DoRA on q and v, over LoRA's ranges."""
    derived = suggest_rank_alpha(trial, RANKS, RANK, ALPHA_RATIO, ALPHA)
    suggest_training(trial, optimizer)
    trial.suggest_float(DROPOUT, 0.0, 0.2)
    return derived


METHOD = register(Method(
    "dora", "reparameterised",
    "peft DoRA (low-rank direction + magnitude) on q and v, head and fc_norm", prepare,
    spaces={"dora": space}, spec=DoraSpec, shown=(RANK, ALPHA, LR),
    counted_at=DoraSpec(4, 8.0), counted_as="r4 on q+v", merges=True,
    source="Liu et al. 2024, arXiv 2402.09353; HF peft"))
