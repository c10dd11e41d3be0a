"""Linear probing: only the new head and fc_norm train; the backbone is frozen."""

from __future__ import annotations

from methods._base import Method, Site, Trains, register, train_only


def prepare(site: Site, spec: None) -> Trains:
    return site.head


METHOD = register(Method("linear_probe", "selective", "head and fc_norm", prepare,
                         spaces={"linear_probe": train_only}, merges=True,
                         source="the frozen-feature baseline of the MAE paper (He et al. 2022)"))
