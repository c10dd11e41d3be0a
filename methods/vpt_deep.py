"""VPT-Deep (Jia et al. 2022, "Visual Prompt Tuning", arXiv 2203.12119, section 3.2):
`vpt_deep_tokens` (P) learned prompt tokens enter the input of every transformer block and their
outputs are dropped after it, with the head and fc_norm; the backbone stays frozen. The i-th
block sees ``[prefix, P_i, patches]`` (prefix: the class and register tokens, which keep their
place in front) and hands on ``[prefix, patches]``. It trains P * D values per block (D: the
model width), none in the layers themselves.

The prompts are the paper's (no projection, no prompt dropout), drawn uniform in
``+-sqrt(6 / (fan_in + D))`` with fan_in the patch embedding's (channels x patch area), as
VPT's code draws them: a Xavier range as if prompts were patch embeddings. A prompt has no
position: it gets no absolute position embedding, and in EVA's attention (rotary embeddings,
applied to the tokens after its prefix) the prompts join the unrotated prefix, so the patches
keep exactly their rotations (`treat_as_prefix`).

The prompts live on the blocks (``blocks.<i>.vpt_prompt``), and forward hooks (module functions
bound with `functools.partial`) insert and drop them, so the model stays the timm model (its
layer groups put block i's prompt with block i) and still copies and pickles. `vpt_shallow`
uses the same hooks once.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from contract.errors import ConfigError
from contract.fields import check_rank, flat_field, flat_key
from methods._base import LR, Method, Site, Trains, one_setting, register

PROMPT = "vpt_prompt"  # the parameter a prompted block holds
# Prompt lengths within the range the paper searches (1 to 200).
TOKEN_CHOICES = (1, 5, 10, 50, 100)


@dataclass(frozen=True)
class VptDeepSpec:
    tokens: int = flat_field("vpt_deep_tokens")

    def __post_init__(self) -> None:
        check_rank("vpt_deep_tokens", self.tokens)


TOKENS = flat_key(VptDeepSpec, "tokens")


def blocks_of(model: Any, setting: str) -> list[Any]:
    """The model's transformer blocks, and a check that it is a ViT whose token sequence the
    prompts can join: prefix tokens counted, a patch embedding to size the prompts."""
    blocks = list(getattr(model, "blocks", ()))
    if not blocks or not hasattr(model, "num_prefix_tokens") or not hasattr(model, "patch_embed"):
        raise ConfigError(f"{setting}: {type(model).__name__} has no timm ViT blocks, prefix "
                          "tokens and patch embedding to prompt; use a registered ViT backbone")
    return blocks


def new_prompt(model: Any, tokens: int) -> Any:
    """(1, tokens, D) prompts in the Xavier range of the patch embedding (VPT's init)."""
    import torch

    embed = model.patch_embed.proj.weight
    width = embed.shape[0]
    bound = math.sqrt(6.0 / (embed[0].numel() + width))
    values = torch.empty(1, tokens, width, device=embed.device, dtype=embed.dtype)
    return torch.nn.Parameter(values.uniform_(-bound, bound))


def insert_prompts(prefix: int, block: Any, args: tuple) -> tuple:
    """Forward pre-hook: the block's prompts between the prefix tokens and the patches."""
    import torch

    x = args[0]
    prompts = getattr(block, PROMPT).expand(x.shape[0], -1, -1)
    return (torch.cat((x[:, :prefix], prompts, x[:, prefix:]), dim=1), *args[1:])


def drop_prompts(prefix: int, tokens: int, block: Any, args: tuple, output: Any) -> Any:
    """Forward hook: the block's output without the `tokens` prompt positions."""
    import torch

    return torch.cat((output[:, :prefix], output[:, prefix + tokens:]), dim=1)


def treat_as_prefix(blocks: list[Any], prefix: int) -> None:
    """Attention that positions the tokens after its prefix (EVA's rotary embeddings) counts
    the prompts into its prefix, so the rotations meet exactly the patches they were made for.
    timm's plain Attention has no such count and needs none."""
    for block in blocks:
        if hasattr(block.attn, "num_prefix_tokens"):
            block.attn.num_prefix_tokens = prefix


def prompted(model: Any) -> set[str]:
    return {name for name, _ in model.named_parameters() if name.rpartition(".")[2] == PROMPT}


def add_prompts(site: Site, tokens: int, setting: str,
                spans: Callable[[list[Any]], list[tuple[Any, Any]]]) -> Trains:
    """`tokens` prompts for each (first, last) pair of blocks `spans` picks: inserted before
    `first` (which holds them), dropped after `last`; what trains: the prompts, head and
    fc_norm."""
    model = site.model
    blocks = blocks_of(model, setting)
    prefix = model.num_prefix_tokens
    for first, last in spans(blocks):
        first.register_parameter(PROMPT, new_prompt(model, tokens))
        first.register_forward_pre_hook(functools.partial(insert_prompts, prefix))
        last.register_forward_hook(functools.partial(drop_prompts, prefix, tokens))
    treat_as_prefix(blocks, prefix + tokens)
    prompts = prompted(model)
    return lambda name: site.head(name) or name in prompts


def prepare(site: Site, spec: VptDeepSpec) -> Trains:
    return add_prompts(site, spec.tokens, TOKENS, lambda blocks: [(b, b) for b in blocks])


METHOD = register(Method(
    "vpt_deep", "prompt", "VPT-Deep: learned prompt tokens at every block's input, head and "
    "fc_norm", prepare,
    spaces={"vpt_deep": one_setting(TOKENS, TOKEN_CHOICES)},
    spec=VptDeepSpec, shown=(TOKENS, LR),
    counted_at=VptDeepSpec(10), counted_as="10 tokens", merges=False,
    source="Jia et al. 2022, arXiv 2203.12119 (VPT-Deep)"))
