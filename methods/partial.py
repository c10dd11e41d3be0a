"""Partial fine-tuning: the last `partial_blocks` transformer blocks train, with the head and
fc_norm (the "partial-k" baseline of the MAE paper)."""

from __future__ import annotations

from dataclasses import dataclass

from contract.errors import ConfigError
from contract.fields import check_rank, flat_field, flat_key
from methods._base import LR, Method, Site, Trains, one_setting, register


@dataclass(frozen=True)
class PartialSpec:
    blocks: int = flat_field("partial_blocks")

    def __post_init__(self) -> None:
        check_rank("partial_blocks", self.blocks)


BLOCKS = flat_key(PartialSpec, "blocks")
BLOCK_CHOICES = (1, 2, 4)  # within the depth of every registered ViT (the demo's is 4)


def prepare(site: Site, spec: PartialSpec) -> Trains:
    blocks = getattr(site.model, "blocks", None)
    depth = len(blocks) if blocks is not None else 0
    if not 1 <= spec.blocks <= depth:
        raise ConfigError(f"partial_blocks {spec.blocks}: the model has {depth} blocks; use 1 "
                          f"to {depth}")
    last = tuple(f"blocks.{i}." for i in range(depth - spec.blocks, depth))
    return lambda name: site.head(name) or name.startswith(last)



METHOD = register(Method(
    "partial", "selective", "the last partial_blocks blocks, head and fc_norm", prepare,
    spaces={"partial": one_setting(BLOCKS, BLOCK_CHOICES)}, spec=PartialSpec, shown=(BLOCKS, LR),
    counted_at=PartialSpec(1), counted_as="1 block", merges=True,
    source="He et al. 2022 (MAE), partial fine-tuning"))
