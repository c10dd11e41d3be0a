"""BitFit (Ben Zaken et al. 2022, arXiv 2106.10199): every bias term trains, with the head and
fc_norm; the weights stay frozen."""

from __future__ import annotations

from methods._base import Method, Site, Trains, register, train_only


def prepare(site: Site, spec: None) -> Trains:
    return lambda name: site.head(name) or name.endswith(".bias")


METHOD = register(Method("bitfit", "selective", "every bias, head and fc_norm", prepare,
                         spaces={"bitfit": train_only}, merges=True,
                         source="Ben Zaken et al. 2022, arXiv 2106.10199"))
