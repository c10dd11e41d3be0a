"""AdaptFormer (Chen et al. 2022, "AdaptFormer: Adapting Vision Transformers for Scalable
Visual Recognition", arXiv 2205.13535, section 3.2, AdaptMLP), with the head and fc_norm: in
every block a bottleneck runs parallel to the MLP on the MLP's input (the output of norm2) and
its output, times a fixed scale s, is added to the MLP's:
``MLP(LN(x)) + s * up(ReLU(down(LN(x))))`` before the residual add. down: D ->
`adaptformer_bottleneck` m, up: m -> D, both with biases, so a block trains ``2 * D * m + m + D``
values. s (`adaptformer_scale`, the paper's 0.1) is a setting, not trained.

`up` starts at zero, so the model starts as the foundation; `down`'s weight at torch's Linear
default (as the paper's code draws it) and its bias at zero. The branch sits on the MLP
module's own output, before DINOv2's ls2 or EVA's gamma_2: the MLP holds it
(``blocks.<i>.mlp.adaptformer``) and a forward hook (a module function bound to s with
`functools.partial`) adds it, so the model stays the timm model and still copies and pickles.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from contract.fields import check_positive, check_rank, flat_field, flat_key
from methods._base import LR, Method, Site, Trains, register, suggest_training
from methods.adapter import BOTTLENECKS, bottleneck
from methods.vpt_deep import blocks_of

BRANCH = "adaptformer"  # the child module an adapted MLP holds
SCALES = (0.01, 0.1, 1.0)  # a decade either side of the paper's 0.1


@dataclass(frozen=True)
class AdaptFormerSpec:
    bottleneck: int = flat_field("adaptformer_bottleneck")
    scale: float = flat_field("adaptformer_scale", default=0.1)

    def __post_init__(self) -> None:
        check_rank("adaptformer_bottleneck", self.bottleneck)
        check_positive("adaptformer_scale", self.scale)


BOTTLENECK, SCALE = (flat_key(AdaptFormerSpec, f) for f in ("bottleneck", "scale"))


def beside_mlp(scale: float, mlp: Any, args: tuple, output: Any) -> Any:
    """Forward hook: the scaled branch on the MLP's input, added to the MLP's output."""
    return output + scale * getattr(mlp, BRANCH)(args[0])


def prepare(site: Site, spec: AdaptFormerSpec) -> Trains:
    model = site.model
    for block in blocks_of(model, BOTTLENECK):
        block.mlp.add_module(BRANCH, bottleneck(block.mlp.fc2, spec.bottleneck, "ReLU",
                                                BOTTLENECK))
        block.mlp.register_forward_hook(functools.partial(beside_mlp, spec.scale))
    trained = {n for n, _ in model.named_parameters() if f".{BRANCH}." in n}
    return lambda name: site.head(name) or name in trained


def space(trial: Any, optimizer: str, recipe: Any) -> dict[str, Any]:
    trial.suggest_categorical(BOTTLENECK, BOTTLENECKS)
    trial.suggest_categorical(SCALE, SCALES)
    suggest_training(trial, optimizer)
    return {}


METHOD = register(Method(
    "adaptformer", "additive", "AdaptFormer: a scaled bottleneck beside every MLP, head and "
    "fc_norm", prepare, spaces={"adaptformer": space}, spec=AdaptFormerSpec,
    shown=(BOTTLENECK, SCALE, LR), counted_at=AdaptFormerSpec(8), counted_as="bottleneck 8",
    merges=False, source="Chen et al. 2022, arXiv 2205.13535"))
