"""VeRA (Kopiczko et al. 2024, arXiv 2310.11454), HF peft's ``VeraConfig``: frozen random
rank-`rank` projections shared by every target, and two trained scaling vectors per target
(``rank + out`` values per targeted Linear), on q and v, with the head and fc_norm.

The frozen projections are drawn from `PROJECTION_SEED`, not saved with the adapter: the
adapter file (the trainable tensors) loads into any model built with the same seed (and torch).
"""

from __future__ import annotations

from dataclasses import dataclass

from contract.fields import check_rank, flat_field, flat_key
from methods._base import LR, Method, Site, Trains, one_setting, register
from methods._peft import PEFT_TARGETS

PROJECTION_SEED = 0


@dataclass(frozen=True)
class VeraSpec:
    rank: int = flat_field("vera_rank")

    def __post_init__(self) -> None:
        check_rank("vera_rank", self.rank)


RANK = flat_key(VeraSpec, "rank")
# A target trains rank + width values, so ranks far above LoRA's stay cheap (peft's default
# is 256).
RANK_CHOICES = (64, 128, 256, 512, 1024)


def prepare(site: Site, spec: VeraSpec) -> Trains:
    from peft import VeraConfig, VeraModel

    site.split_qkv()
    config = VeraConfig(r=spec.rank, target_modules=site.regex(PEFT_TARGETS),
                        projection_prng_key=PROJECTION_SEED)
    return site.inject_peft(VeraModel, config, ("vera_lambda_b", "vera_lambda_d"))



METHOD = register(Method(
    "vera", "reparameterised", "peft VeRA scaling vectors on q and v, head and fc_norm",
    prepare, spaces={"vera": one_setting(RANK, RANK_CHOICES)}, spec=VeraSpec, shown=(RANK, LR),
    # counted at peft's default rank
    counted_at=VeraSpec(256), counted_as="r256 on q+v", merges=True,
    source="Kopiczko et al. 2024, arXiv 2310.11454; HF peft"))
