"""LoHa (Hyeon-Woo et al. 2022, FedPara, arXiv 2108.06098; as packaged in LyCORIS, Yeh et al.
2024, arXiv 2309.14859), HF peft's ``LoHaConfig``: the update of each target is the Hadamard
(elementwise) product of two rank-`rank` products, ``(alpha / rank) * (W1a W1b) * (W2a W2b)``,
so it reaches rank up to rank**2 for the values of two rank-`rank` LoRAs. On q and v, with the
head and fc_norm. A targeted Linear trains ``2 * rank * (in + out)`` values.

peft zeroes one factor (W2b) at the start, so the model starts as the foundation. The update is
added to the frozen weight, so `export --merged` folds it exactly.
`alpha_ratio` records how a search chose alpha (alpha / rank): logged, not used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from contract.fields import check_positive, check_rank, flat_field, flat_key
from methods._base import LR, Method, Site, Trains, register, suggest_rank_alpha, suggest_training
from methods._peft import PEFT_TARGETS


@dataclass(frozen=True)
class LohaSpec:
    rank: int = flat_field("loha_rank")
    alpha: float = flat_field("loha_alpha")
    alpha_ratio: float | None = flat_field("loha_alpha_ratio", default=None)

    def __post_init__(self) -> None:
        check_rank("loha_rank", self.rank)
        check_positive("loha_alpha", self.alpha)


RANK, ALPHA, ALPHA_RATIO = (flat_key(LohaSpec, f) for f in ("rank", "alpha", "alpha_ratio"))
# LoRA's ranks (`RANKS`) up to 32: the Hadamard product of two rank-r products has rank up to
# r**2, which already covers a 768-wide layer from r = 28, so r = 64 would only add values.
RANK_CHOICES = (1, 2, 4, 8, 16, 32)


def prepare(site: Site, spec: LohaSpec) -> Trains:
    from peft import LoHaConfig, LoHaModel

    site.split_qkv()
    site.check_width(spec.rank, RANK, PEFT_TARGETS)
    config = LoHaConfig(r=spec.rank, alpha=spec.alpha, target_modules=site.regex(PEFT_TARGETS))
    return site.inject_peft(LoHaModel, config,
                            ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))


def space(trial: Any, optimizer: str, recipe: Any) -> dict[str, Any]:
    """LoHa on q and v, over LoRA's alpha ratios."""
    derived = suggest_rank_alpha(trial, RANK_CHOICES, RANK, ALPHA_RATIO, ALPHA)
    suggest_training(trial, optimizer)
    return derived


METHOD = register(Method(
    "loha", "reparameterised",
    "peft LoHa (Hadamard product of two low-rank pairs) on q and v, head and fc_norm", prepare,
    spaces={"loha": space}, spec=LohaSpec, shown=(RANK, ALPHA, LR),
    counted_at=LohaSpec(4, 8.0), counted_as="r4 on q+v", merges=True,
    source="Hyeon-Woo et al. 2022 (FedPara), arXiv 2108.06098; LyCORIS; HF peft"))
