"""(IA)3 as published (Liu et al. 2022, arXiv 2205.05638, section 3.3), HF peft's
``IA3Config``: learned vectors rescale the attention's keys and values and the feed-forward's
inner activation (the input of its second Linear), with the head and fc_norm. It trains one
value per output of k and v and one per input of fc2 in every block.
"""

from __future__ import annotations

from methods._base import Method, Site, Trains, register, train_only

SCALED, FEEDFORWARD = ("k", "v", "fc2"), ("fc2",)


def prepare(site: Site, spec: None) -> Trains:
    from peft import IA3Config, IA3Model

    from methods._peft import ADAPTER

    site.split_qkv()
    config = IA3Config(target_modules=site.regex(SCALED),
                       feedforward_modules=site.regex(FEEDFORWARD))
    trains = site.inject_peft(IA3Model, config, ("ia3_l",))
    # The scales start at 1 and are (out, 1) or (1, in) tensors, which timm's 1-d rule would
    # decay to 0.
    site.exclude_from_weight_decay((f"*.ia3_l.{ADAPTER}",))
    return trains


METHOD = register(Method(
    "ia3", "additive", "peft (IA)3 as published: scales on k, v and the MLP's inner activation, "
    "head and fc_norm", prepare, spaces={"ia3": train_only}, counted_as="k+v+fc2 input",
    merges=True, source="Liu et al. 2022, arXiv 2205.05638; HF peft"))
