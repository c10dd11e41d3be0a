"""FourierFT (Gao et al. 2024, arXiv 2405.03003), HF peft's ``FourierFTConfig``: the update of
each target is the real part of the inverse 2-D Fourier transform of a sparse spectrum, ``scaling
* Re(IDFT2(F))``, where F holds `frequencies` trained coefficients at fixed random entries and
zeros elsewhere. On q and v, with the head and fc_norm. A targeted Linear trains `frequencies`
values (at most in * out).

The entries are drawn from `LOCATION_SEED` (peft's default, written here so that a change of
peft's default cannot move them), not saved with the adapter: the adapter file loads into any
model built with the same seed (and torch). The coefficients start at zero (peft's
``init_weights=True``), so the model starts as its foundation, as with every other
reparameterised method here. The paper and peft's default draw them from a standard normal
instead: with torch's normalised inverse FFT that start moves each weight by about
``scaling * sqrt(frequencies) / (in * out)``, 0.016 at ViT-B/16 but 2.3 on the demo's 64 x 64
layers at scaling 300, which wrecked the demo foundation (test AUROC 0.577 against 0.82 for FFT
in the methods study with the normal start). The update is added to the frozen weight, so
`export --merged` folds it exactly. The coefficients are one
vector per layer, which timm's optimiser groups never decay (their 1-d rule).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from contract.errors import ConfigError
from contract.fields import check_positive, check_rank, flat_field, flat_key
from methods._base import LR, Method, Site, Trains, register, suggest_training
from methods._peft import PEFT_TARGETS
from methods._widths import shapes

LOCATION_SEED = 777


@dataclass(frozen=True)
class FourierftSpec:
    frequencies: int = flat_field("fourierft_frequencies")
    scaling: float = flat_field("fourierft_scaling")

    def __post_init__(self) -> None:
        check_rank("fourierft_frequencies", self.frequencies)
        check_positive("fourierft_scaling", self.scaling)


FREQUENCIES, SCALING = (flat_key(FourierftSpec, f) for f in ("frequencies", "scaling"))
# peft's docs: 1,000 frequencies about match LoRA r8 on RoBERTa, 3,000 LoRA r16 on ViT-L; its
# default scaling is 150, with 100 to 150 for RoBERTa and 300 for ViT-B/L classification. Up to
# 4,000 frequencies, so that every choice fits the demo backbones' 64 x 64 layers (4,096).
FREQUENCY_CHOICES = (1000, 2000, 4000)
SCALING_RANGE = (50.0, 500.0)


def prepare(site: Site, spec: FourierftSpec) -> Trains:
    from peft import FourierFTConfig, FourierFTModel

    site.split_qkv()
    for width_in, width_out in sorted(set(shapes(site, PEFT_TARGETS))):
        entries = width_in * width_out
        if spec.frequencies > entries:
            raise ConfigError(f"fourierft_frequencies {spec.frequencies} more than the {entries} "
                              f"entries of a {width_out} x {width_in} layer; choose <= {entries}")
    config = FourierFTConfig(n_frequency=spec.frequencies, scaling=spec.scaling,
                             random_loc_seed=LOCATION_SEED, init_weights=True,
                             target_modules=site.regex(PEFT_TARGETS))
    return site.inject_peft(FourierFTModel, config, ("fourierft_spectrum",))


def space(trial: Any, optimizer: str, recipe: Any) -> dict[str, Any]:
    trial.suggest_categorical(FREQUENCIES, FREQUENCY_CHOICES)
    trial.suggest_float(SCALING, *SCALING_RANGE, log=True)
    suggest_training(trial, optimizer)
    return {}


METHOD = register(Method(
    "fourierft", "reparameterised",
    "peft FourierFT (sparse spectral coefficients of the update) on q and v, head and fc_norm",
    prepare, spaces={"fourierft": space}, spec=FourierftSpec,
    shown=(FREQUENCIES, SCALING, LR), counted_at=FourierftSpec(1000, 300.0),
    counted_as="1,000 frequencies on q+v", merges=True,
    source="Gao et al. 2024, arXiv 2405.03003; HF peft"))
