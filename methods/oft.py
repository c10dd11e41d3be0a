"""OFT (Qiu et al. 2023, arXiv 2306.07280), HF peft's ``OFTConfig``: each target's input is
rotated by a trained block-diagonal orthogonal matrix before the frozen weight, ``W R``, so the
angles between the weight's neurons (its hyperspherical energy) are kept. On q and v, with the
head and fc_norm. Each block of `block_size` is the Cayley transform of a skew-symmetric matrix,
whose upper triangle trains: a targeted Linear trains ``in / block_size`` blocks of
``block_size * (block_size - 1) / 2`` values, ``in * (block_size - 1) / 2`` in all.

The Cayley transform is the exact one of the paper (``use_cayley_neumann=False``): peft's
default truncates it to a Neumann series (OFTv2, Qiu et al. 2025, arXiv 2506.19847), cheaper but
only near-orthogonal once the rotation grows. The skew parts start at zero (R = I), so the model
starts as the foundation; `export --merged` folds R into the weight (W R is a plain weight).
Weight decay pulls the skew parts toward zero, i.e. R toward I, as it pulls LoRA toward no
update, so they are decayed as any weight.
"""

from __future__ import annotations

from dataclasses import dataclass

from contract.errors import ConfigError
from contract.fields import check_rank, flat_field, flat_key
from methods._base import LR, Method, Site, Trains, one_setting, register
from methods._peft import PEFT_TARGETS
from methods._widths import check_divides


@dataclass(frozen=True)
class OftSpec:
    block_size: int = flat_field("oft_block_size")

    def __post_init__(self) -> None:
        check_rank("oft_block_size", self.block_size)
        if self.block_size < 2:
            raise ConfigError("oft_block_size must be >= 2 (a 1 x 1 rotation trains nothing), "
                              f"got {self.block_size}")


BLOCK_SIZE = flat_key(OftSpec, "block_size")
# Powers of two from 8 to 64 around peft's default block of 32 (its docs give 4 to 16 as
# examples; 4 trains under a tenth of 32's values): each divides every registered backbone's
# width (64 to 768).
BLOCK_CHOICES = (8, 16, 32, 64)


def prepare(site: Site, spec: OftSpec) -> Trains:
    from peft import OFTConfig, OFTModel

    site.split_qkv()
    check_divides(site, spec.block_size, BLOCK_SIZE, PEFT_TARGETS)
    # r=0: the blocks are set by their size (peft takes one of the two)
    config = OFTConfig(r=0, oft_block_size=spec.block_size, use_cayley_neumann=False,
                       target_modules=site.regex(PEFT_TARGETS))
    return site.inject_peft(OFTModel, config, ("oft_R",))



METHOD = register(Method(
    "oft", "reparameterised",
    "peft OFT (block-diagonal orthogonal rotation of the input) on q and v, head and fc_norm",
    prepare,
    spaces={"oft": one_setting(BLOCK_SIZE, BLOCK_CHOICES)},
    spec=OftSpec, shown=(BLOCK_SIZE, LR),
    counted_at=OftSpec(32), counted_as="block 32 on q+v", merges=True,
    source="Qiu et al. 2023, arXiv 2306.07280; HF peft"))
