"""BOFT (Liu et al. 2024, arXiv 2311.06243), HF peft's ``BOFTConfig``: OFT's orthogonal rotation
of each target's input, built as the product of `butterfly_factors` sparse orthogonal factors
(each block-diagonal with blocks of `block_size`, between butterfly permutations, as in the
Cooley-Tukey FFT), so a few small blocks mix every input; and a trained scale per output. On q
and v, with the head and fc_norm. peft keeps each block as a full ``block_size x block_size``
matrix and rotates by the Cayley transform of its skew-symmetric part, so a targeted Linear
trains ``butterfly_factors * (in / block_size) * block_size**2 + out`` values, i.e.
``butterfly_factors * in * block_size + out`` (the diagonal and one triangle of each block are
redundant: they do not change the output).

peft builds more than one factor only with its compiled CUDA kernel for the block-diagonal
(``fbd_cuda``, compiled with ninja and nvcc on first use); without it, peft silently uses one
factor, which makes this OFT with a scale and changes the adapter's shapes by machine. So
`prepare` gives peft that kernel's two calls written in torch (the block-diagonal and its
gradient), unless the compiled one is already loaded: the same values on every machine, no
compile, and the settings as written. The rotations start at I and the scales at 1, so the model
starts as the foundation; `export --merged` folds both into the weight. The scales are kept out
of weight decay, which would pull them (and so q and v) toward 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from contract.errors import ConfigError
from contract.fields import check_rank, flat_field, flat_key
from methods._base import LR, Method, Site, Trains, register, suggest_training
from methods._peft import ADAPTER, PEFT_TARGETS
from methods._widths import shapes


@dataclass(frozen=True)
class BoftSpec:
    block_size: int = flat_field("boft_block_size")
    butterfly_factors: int = flat_field("boft_butterfly_factors")

    def __post_init__(self) -> None:
        check_rank("boft_block_size", self.block_size)
        check_rank("boft_butterfly_factors", self.butterfly_factors)
        if self.block_size < 2 or (self.butterfly_factors > 1 and self.block_size % 2):
            raise ConfigError(f"boft_block_size must be >= 2, and even with more than one "
                              f"butterfly factor; got {self.block_size}")

    @property
    def span(self) -> int:
        """How many inputs the factors mix together: each factor doubles the first's block."""
        return self.block_size * 2 ** (self.butterfly_factors - 1)


BLOCK_SIZE, BUTTERFLY_FACTORS = (flat_key(BoftSpec, f) for f in
                                 ("block_size", "butterfly_factors"))
# peft's example block sizes (4, 8, 16) and one to three factors (one is OFT with a scale, the
# baseline the factors are judged against): every pair spans at most 64 inputs, which divides
# every registered backbone's width (64 to 768).
BLOCK_CHOICES = (4, 8, 16)
FACTOR_CHOICES = (1, 2, 3)


class _BlockDiagonal:
    """peft's ``fbd_cuda`` calls in torch: (factors, blocks, b, b) -> each factor's
    block-diagonal matrix, and a gradient of those back to the blocks. The blocks are the
    diagonal of a (factors, blocks, b, blocks, b) grid, so each way is one copy, not a loop."""

    @staticmethod
    def forward(blocks):
        factors, count, size, _ = blocks.shape
        grid = blocks.new_zeros(factors, count, size, count, size)
        grid.diagonal(dim1=1, dim2=3).copy_(blocks.permute(0, 2, 3, 1))
        return [grid.reshape(factors, count * size, count * size)]

    @staticmethod
    def backward(grad, blocks):
        factors, count, size, _ = blocks.shape
        grid = grad.reshape(factors, count, size, count, size)
        return [grid.diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)]


def _keep_butterfly_factors() -> None:
    """Give peft the block-diagonal kernel it needs for more than one factor (see above)."""
    from peft.tuners.boft import layer

    if not layer._FBD_CUDA:
        layer._FBD_CUDA = _BlockDiagonal()


def prepare(site: Site, spec: BoftSpec) -> Trains:
    from peft import BOFTConfig, BOFTModel

    site.split_qkv()
    for width in sorted({i for i, _ in shapes(site, PEFT_TARGETS)}):
        if width % spec.span:
            raise ConfigError(
                f"boft_block_size {spec.block_size} with boft_butterfly_factors "
                f"{spec.butterfly_factors} spans {spec.span} inputs, which does not divide layer "
                f"width {width}; choose block_size * 2**(factors - 1) dividing {width}")
    _keep_butterfly_factors()
    config = BOFTConfig(boft_block_size=spec.block_size,
                        boft_n_butterfly_factor=spec.butterfly_factors,
                        target_modules=site.regex(PEFT_TARGETS))
    trains = site.inject_peft(BOFTModel, config, ("boft_R", "boft_s"))
    site.exclude_from_weight_decay((f"*.boft_s.{ADAPTER}",))
    return trains


def space(trial: Any, optimizer: str, recipe: Any) -> dict[str, Any]:
    trial.suggest_categorical(BLOCK_SIZE, BLOCK_CHOICES)
    trial.suggest_categorical(BUTTERFLY_FACTORS, FACTOR_CHOICES)
    suggest_training(trial, optimizer)
    return {}


METHOD = register(Method(
    "boft", "reparameterised",
    "peft BOFT (butterfly-factored orthogonal rotation of the input, output scales) on q and v, "
    "head and fc_norm", prepare, spaces={"boft": space}, spec=BoftSpec,
    shown=(BLOCK_SIZE, BUTTERFLY_FACTORS, LR),
    counted_at=BoftSpec(4, 2), counted_as="block 4, 2 factors on q+v", merges=True,
    source="Liu et al. 2024, arXiv 2311.06243; HF peft"))
