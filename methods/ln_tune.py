"""LN-tuning (Qi et al. 2022): the weights and biases of every LayerNorm train, with the head
and fc_norm. Which modules are norms is asked of the module types, not their names."""

from __future__ import annotations

from methods._base import Method, Site, Trains, register, train_only


def prepare(site: Site, spec: None) -> Trains:
    norms = site.norm_params()
    return lambda name: site.head(name) or name in norms


METHOD = register(Method("ln_tune", "selective", "LayerNorm weights and biases, head and fc_norm",
                         prepare, spaces={"ln_tune": train_only}, merges=True,
                         source="Qi et al. 2022, arXiv 2211.09359"))
