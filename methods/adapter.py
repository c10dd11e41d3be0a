"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP",
arXiv 1902.00751, section 2.1 and its figure 2), with the head and fc_norm: in every block, one
adapter after the attention sublayer and one after the MLP sublayer, each on the sublayer's
output before it is added back to the residual stream. An adapter maps h to
``h + up(GELU(down(h)))`` (down: D -> `adapter_bottleneck` m, up: m -> D, both with biases).
An adapter trains ``2 * D * m + m + D`` values, two per block.

As the paper does (its figure 2: the adapters, the layer normalisation parameters and the
classifier train), every LayerNorm's weight and bias trains too: norm1 and norm2 of each block,
the final norm where the model has one, and EVA's norm inside its SwiGLU MLP (2 x its width
values per norm).

`up` starts at zero (the paper draws both projections near zero; an exact zero makes the model
start as the foundation), `down`'s weight at torch's Linear default and its bias at zero. Where
the block has a layer scale (DINOv2's ls1/ls2, EVA's gamma), the adapter sits before it, on the
sublayer module's own output: the attention and MLP modules hold their adapter
(``blocks.<i>.attn.adapter``, ``blocks.<i>.mlp.adapter``) and a forward hook (a module
function) applies it, so the model stays the timm model and still copies and pickles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from contract.errors import ConfigError
from contract.fields import check_rank, flat_field, flat_key
from methods._base import LR, Method, Site, Trains, one_setting, register
from methods.vpt_deep import blocks_of

ADAPTER = "adapter"  # the child module an adapted sublayer holds
# Sizes within the paper's search (8, 64, 256 on BERT-Base's width 768).
BOTTLENECKS = (8, 16, 32, 64)


@dataclass(frozen=True)
class AdapterSpec:
    bottleneck: int = flat_field("adapter_bottleneck")

    def __post_init__(self) -> None:
        check_rank("adapter_bottleneck", self.bottleneck)


BOTTLENECK = flat_key(AdapterSpec, "bottleneck")


def bottleneck(like: Any, size: int, act: str, setting: str) -> Any:
    """down (width -> size), the activation `act` (a torch.nn class name), up (size ->
    width), as a Sequential with named children; `up` (weight and bias) and down's bias start
    at zero. `like`: the sublayer's output Linear, for width, device and dtype."""
    from collections import OrderedDict

    from torch import nn

    width = like.out_features
    if size > width:
        raise ConfigError(f"{setting} {size} is wider than the model width {width}; choose "
                          f"<= {width}")
    where = {"device": like.weight.device, "dtype": like.weight.dtype}
    down, up = nn.Linear(width, size, **where), nn.Linear(size, width, **where)
    for tensor in (down.bias, up.weight, up.bias):
        nn.init.zeros_(tensor)
    return nn.Sequential(OrderedDict(down=down, act=getattr(nn, act)(), up=up))


def after_sublayer(module: Any, args: tuple, output: Any) -> Any:
    """Forward hook: the adapter, with its own skip connection, on the sublayer's output."""
    return output + getattr(module, ADAPTER)(output)


def prepare(site: Site, spec: AdapterSpec) -> Trains:
    model = site.model
    for block in blocks_of(model, BOTTLENECK):
        for sublayer, output in ((block.attn, block.attn.proj), (block.mlp, block.mlp.fc2)):
            sublayer.add_module(ADAPTER, bottleneck(output, spec.bottleneck, "GELU", BOTTLENECK))
            sublayer.register_forward_hook(after_sublayer)
    trained = {n for n, _ in model.named_parameters() if f".{ADAPTER}." in n} | site.norm_params()
    return lambda name: site.head(name) or name in trained



METHOD = register(Method(
    "adapter", "additive", "Houlsby bottleneck adapters after attention and MLP, LayerNorms, "
    "head and fc_norm", prepare,
    spaces={"adapter": one_setting(BOTTLENECK, BOTTLENECKS)},
    spec=AdapterSpec,
    shown=(BOTTLENECK, LR), counted_at=AdapterSpec(8), counted_as="bottleneck 8",
    merges=False, source="Houlsby et al. 2019, arXiv 1902.00751"))
