"""The widths of the Linears a method adapts, for the tuners whose blocks or frequencies must
fit them (OFT and BOFT split a layer's input into blocks; FourierFT picks entries of its weight).
peft itself would round a block size that does not divide a width to a nearby one (OFT) or
refuse it deep inside the injection (BOFT); these checks refuse it first, in one line."""

from __future__ import annotations

from contract.errors import ConfigError
from methods._base import Site


def shapes(site: Site, targets: tuple[str, ...]) -> list[tuple[int, int]]:
    """(in, out) of each targeted Linear of the split model."""
    layers = [site.model.get_submodule(name) for name in site.module_names(targets)]
    return [(m.in_features, m.out_features) for m in layers]


def check_divides(site: Site, size: int, setting: str, targets: tuple[str, ...]) -> None:
    """Refuse a block `size` that does not divide the input width of every targeted Linear."""
    for width in sorted({i for i, _ in shapes(site, targets)}):
        if width % size:
            raise ConfigError(f"{setting} {size} does not divide layer width {width}; choose a "
                              f"divisor of {width}")
