"""LoKr (Yeh et al. 2024, LyCORIS, arXiv 2309.14859), HF peft's ``LoKrConfig``: the update of
each target is the Kronecker product of a small full factor and a rank-`rank` larger factor,
``(alpha / rank) * W1 kron (W2a W2b)``, on q and v, with the head and fc_norm.

peft splits each width into the two factors nearest its square root (768 = 24 * 32, 64 = 8 * 8),
smaller first: for out = a * b and in = c * d, W1 is a x c and W2 = W2a W2b is b x d, so a
targeted Linear trains ``a * c + rank * (b + d)`` values (24 * 24 + 4 * (32 + 32) = 832 at
ViT-B/16, rank 4). From ``rank >= max(b, d) / 2`` peft trains W2 in full instead (``a * c + b *
d`` values): at ViT-B/16 every rank from 16 up is the same full-factor arm.

peft zeroes W1 at the start, so the model starts as the foundation (and W2 moves from the second
step). The update is added to the frozen weight, so `export --merged` folds it exactly.
`alpha_ratio` records how a search chose alpha (alpha / rank): logged, not used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from contract.fields import check_positive, check_rank, flat_field, flat_key
from methods._base import LR, Method, Site, Trains, register, suggest_rank_alpha, suggest_training
from methods._peft import PEFT_TARGETS


@dataclass(frozen=True)
class LokrSpec:
    rank: int = flat_field("lokr_rank")
    alpha: float = flat_field("lokr_alpha")
    alpha_ratio: float | None = flat_field("lokr_alpha_ratio", default=None)

    def __post_init__(self) -> None:
        check_rank("lokr_rank", self.rank)
        check_positive("lokr_alpha", self.alpha)


RANK, ALPHA, ALPHA_RATIO = (flat_key(LokrSpec, f) for f in ("rank", "alpha", "alpha_ratio"))
# LoRA's ranks up to 16: W2 is 32 x 32 at width 768 and peft trains it in full from rank 16, so
# larger ranks would repeat that arm under other names.
RANK_CHOICES = (1, 2, 4, 8, 16)


def prepare(site: Site, spec: LokrSpec) -> Trains:
    from peft import LoKrConfig, LoKrModel

    site.split_qkv()
    site.check_width(spec.rank, RANK, PEFT_TARGETS)
    config = LoKrConfig(r=spec.rank, alpha=spec.alpha, target_modules=site.regex(PEFT_TARGETS))
    return site.inject_peft(LoKrModel, config, ("lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b"))


def space(trial: Any, optimizer: str, recipe: Any) -> dict[str, Any]:
    """LoKr on q and v, over LoRA's alpha ratios."""
    derived = suggest_rank_alpha(trial, RANK_CHOICES, RANK, ALPHA_RATIO, ALPHA)
    suggest_training(trial, optimizer)
    return derived


METHOD = register(Method(
    "lokr", "reparameterised",
    "peft LoKr (Kronecker product of a full and a low-rank factor) on q and v, head and "
    "fc_norm", prepare, spaces={"lokr": space}, spec=LokrSpec, shown=(RANK, ALPHA, LR),
    counted_at=LokrSpec(4, 8.0), counted_as="r4 on q+v", merges=True,
    source="Yeh et al. 2024 (LyCORIS), arXiv 2309.14859; HF peft"))
