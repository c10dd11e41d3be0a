"""HRA (Yuan et al. 2024, arXiv 2405.17484), HF peft's ``HRAConfig``: each target's weight is
multiplied by a chain of `rank` trained Householder reflections, ``W H_1 ... H_rank`` with
``H_i = I - 2 u_i u_i^T / |u_i|^2``, an orthogonal update that is also a rank-`rank` change of
W. On q and v, with the head and fc_norm. A targeted Linear trains ``rank * in`` values (one
vector u_i of the input width per reflection).

peft starts the vectors in equal pairs, whose reflections cancel, so the model starts as the
foundation: hence an even rank (peft warns and starts elsewhere for an odd one; this refuses
it). A reflection depends only on the direction of u_i, so weight decay would only shrink the
norms it divides by: the vectors are kept out of it. `export --merged` folds the chain into W.
"""

from __future__ import annotations

from dataclasses import dataclass

from contract.errors import ConfigError
from contract.fields import check_rank, flat_field, flat_key
from methods._base import LR, Method, Site, Trains, one_setting, register
from methods._peft import ADAPTER, PEFT_TARGETS


@dataclass(frozen=True)
class HraSpec:
    rank: int = flat_field("hra_rank")

    def __post_init__(self) -> None:
        check_rank("hra_rank", self.rank)
        if self.rank % 2:
            raise ConfigError(f"hra_rank must be even (the reflections start as pairs that "
                              f"cancel), got {self.rank}")


RANK = flat_key(HraSpec, "rank")
# Even ranks from 2 to 32 around peft's default of 8.
RANK_CHOICES = (2, 4, 8, 16, 32)


def prepare(site: Site, spec: HraSpec) -> Trains:
    from peft import HRAConfig, HRAModel

    site.split_qkv()
    site.check_width(spec.rank, RANK, PEFT_TARGETS)
    config = HRAConfig(r=spec.rank, target_modules=site.regex(PEFT_TARGETS))
    trains = site.inject_peft(HRAModel, config, ("hra_u",))
    site.exclude_from_weight_decay((f"*.hra_u.{ADAPTER}",))
    return trains



METHOD = register(Method(
    "hra", "reparameterised",
    "peft HRA (a chain of Householder reflections of the weight) on q and v, head and fc_norm",
    prepare, spaces={"hra": one_setting(RANK, RANK_CHOICES)}, spec=HraSpec, shown=(RANK, LR),
    counted_at=HraSpec(8), counted_as="r8 on q+v", merges=True,
    source="Yuan et al. 2024, arXiv 2405.17484; HF peft"))
