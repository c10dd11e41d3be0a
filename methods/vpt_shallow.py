"""VPT-Shallow (Jia et al. 2022, "Visual Prompt Tuning", arXiv 2203.12119, section 3.2):
`vpt_shallow_tokens` (P) learned prompt tokens are inserted once, before the first transformer
block, after the class and register tokens; they pass through every block like the other
tokens and are dropped after the last, before the final norm and the pooling, with the head
and fc_norm trained and the backbone frozen. It trains P * D values in all (D: the width).

The prompts, their init, how they join EVA's rotary attention and the hooks that insert and
drop them are VPT-Deep's (`methods.vpt_deep`); the one prompt tensor lives on the first block
(``blocks.0.vpt_prompt``), whose input it is.
"""

from __future__ import annotations

from dataclasses import dataclass

from contract.fields import check_rank, flat_field, flat_key
from methods._base import LR, Method, Site, Trains, one_setting, register
from methods.vpt_deep import TOKEN_CHOICES, add_prompts


@dataclass(frozen=True)
class VptShallowSpec:
    tokens: int = flat_field("vpt_shallow_tokens")

    def __post_init__(self) -> None:
        check_rank("vpt_shallow_tokens", self.tokens)


TOKENS = flat_key(VptShallowSpec, "tokens")


def prepare(site: Site, spec: VptShallowSpec) -> Trains:
    return add_prompts(site, spec.tokens, TOKENS, lambda blocks: [(blocks[0], blocks[-1])])


METHOD = register(Method(
    "vpt_shallow", "prompt", "VPT-Shallow: learned prompt tokens before the first block, head "
    "and fc_norm", prepare,
    spaces={"vpt_shallow": one_setting(TOKENS, TOKEN_CHOICES)},
    spec=VptShallowSpec,
    shown=(TOKENS, LR), counted_at=VptShallowSpec(10), counted_as="10 tokens", merges=False,
    source="Jia et al. 2022, arXiv 2203.12119 (VPT-Shallow)"))
